"""The DeepSeek debug model under expert parallelism, for tests/test_expert_parallel.py: `build` and
`train` (shared with the test's single-process reference), and, run on 2
processes, ep=2 beside FSDP or DDP and ep=1 with the experts replicated, each trained with
`train`; rank 0 writes `result-<label>.json` ([losses, norms]) and `<label>.safetensors` (the
whole final state); every rank writes its DCP shards (`<label>-dcp`) and the all-to-all's row
counts (`flows-<label>-<rank>.json`) into FOLDER.

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/expert_parallel.py FOLDER
"""

from __future__ import annotations

import functools
import json
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from tessera.cli import resolve
from tessera.components.moe.expert_parallel import apply_expert_parallel, expert_parameters, reduce_expert_gradients
from tessera.components.moe.experts import GroupedExperts
from tessera.components.moe.router import Router
from tessera.components.parallel.mesh import _parallel_dims
from tessera.components.parallel.process_group import leave_process_group
from tessera.components.parallel.sharding import materialize_sharded
from tessera.components.train.divergence import clip_gradients
from tessera.components.train.launch import build_model_on_meta
from tessera.recipes.deepseek_pretrain import recipe

STEPS = 3


def build():
    """The DeepSeek debug model on the meta device (fp32, as the recipe configures it)."""
    config, _ = resolve(recipe, ["debug"])
    return build_model_on_meta(config.model)


def train(model, rank: int, world: int, after_forward=lambda model: None) -> tuple[list[float], list[float]]:
    """STEPS AdamW steps on a fixed random batch of 4 sequences (process `rank` of `world`
    takes rows rank::world, as the data loaders do) with gradient clipping and the routers'
    bias update; returns each step's total loss averaged over the processes and its gradient
    norm before clipping (Adam would hide wrongly scaled gradients; the norm does not)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, eps=1e-5)
    generator = torch.Generator().manual_seed(1)
    losses, norms = [], []
    for _ in range(STEPS):
        batch = torch.randint(model.vocab_size, (4, 33), generator=generator)[rank::world]
        terms = model.losses(batch[:, :-1], batch[:, 1:])
        after_forward(model)
        loss = torch.stack(list(terms.values())).sum()
        loss.backward()
        reduce_expert_gradients(model)  # the experts' copies average their gradients, as the mesh plan does
        # one norm per device mesh (FSDP's and the experts'), as the trainer clips
        norms.append(clip_gradients(list(model.named_parameters()), 1.0)[0].item())
        optimizer.step()
        optimizer.zero_grad()
        for module in model.modules():
            if isinstance(module, Router):
                module.after_optimizer_step()
        total = loss.detach().clone()
        if world > 1:
            dist.all_reduce(total)
        losses.append(total.item() / world)
    return losses, norms


class ThroughDDP(torch.nn.Module):
    """`model.losses` called through DDP (the experts' parameters ignored), as
    components/parallel/ddp.py does."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        names = [f"model.{n}" for n, p in model.named_parameters() if p in expert_parameters(model)]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(self, names)
        object.__setattr__(self, "ddp", DistributedDataParallel(self, forward_sync_buffers=False))  # no cycle
        self.vocab_size = model.vocab_size

    def forward(self, tokens, targets):
        return self.model.losses(tokens, targets)

    def losses(self, tokens, targets):
        return self.ddp(tokens, targets)


def record_flows(flows: list, model) -> None:
    """Append the (sent, received) row counts of every experts module's last all-to-all."""
    flows.extend([m.expert_parallel.sent, m.expert_parallel.received]
                 for m in model.modules() if isinstance(m, GroupedExperts))


def main() -> None:
    """The three layouts, one after another in the same processes."""
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    folder = sys.argv[1]
    dims = _parallel_dims(dict(dp_replicate=1, dp_shard=2, tp=1, pp=1, ep=2), 2, "cpu")
    # ep=1 with the experts whole on both processes: their gradients averaged over the replica mesh
    replicated = init_device_mesh("cpu", (1, 2, 1), mesh_dim_names=("dp_replicate", "efsdp", "ep"))
    # DDP over the other parameters: torchtitan's ParallelDims carves ep out of dp_shard only, so a mesh of its own
    beside_ddp = init_device_mesh("cpu", (1, 2), mesh_dim_names=("efsdp", "ep"))
    layouts = {"ep2": (dims.get_mesh("ep"), dims.get_optional_mesh("efsdp"), "fsdp"),
               "replicas2": (replicated["ep"], replicated["dp_replicate", "efsdp"], "fsdp"),  # 2-D, as under HSDP
               "ep2_ddp": (beside_ddp["ep"], beside_ddp["efsdp"], "ddp")}
    for label, (ep_mesh, replica_mesh, dense) in layouts.items():
        torch.manual_seed(0)
        model = build()
        # the routers' loads summed over the data-parallel ("batch") group, as under pipeline parallelism
        load_group = dims.get_mesh("batch").get_group() if label == "ep2" else None
        apply_expert_parallel(model, ep_mesh, replica_mesh=replica_mesh, load_group=load_group)
        assert all(getattr(m, "load_group", load_group) is load_group for m in model.modules())
        ignored = expert_parameters(model)
        if dense == "fsdp":
            for unit in [*model.blocks(), model]:  # FSDP over the other parameters, as sharding.shard does
                fully_shard(unit, mesh=dims.get_mesh("fsdp"), ignored_params=ignored)
            register_fsdp_forward_method(model, "losses")
        materialize_sharded(model, "cpu")
        flows = []
        result = train(model if dense == "fsdp" else ThroughDDP(model), rank, 2,
                       after_forward=functools.partial(record_flows, flows))
        dcp.save(model.state_dict(), checkpoint_id=f"{folder}/{label}-dcp")  # each process writes its shards
        full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                for k, v in model.state_dict().items()}
        if rank == 0:
            save_file(full, f"{folder}/{label}.safetensors")
            with open(f"{folder}/result-{label}.json", "w") as out:  # not stdout: one pipe for both processes
                out.write(json.dumps(result))
        # a file, not stdout: two processes' long lines interleave on a shared pipe
        with open(f"{folder}/flows-{label}-{rank}.json", "w") as out:
            json.dump(flows, out)
    leave_process_group()  # barrier first: a rank tearing gloo down alone can abort


if __name__ == "__main__":
    main()
