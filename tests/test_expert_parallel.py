"""Expert parallelism: dispatch and combine against a dense per-expert loop (two processes
simulated in this one), the plan's constraints, and the DeepSeek debug model (MLA + MoE with a
shared expert + MTP, aux-free bias, balance loss) on 2 processes with ep=2 and FSDP over the
other parameters, against one process: losses, final weights and router biases."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from tessera.components.moe.expert_parallel import (
    combine,
    expert_parallel_faults,
    local_experts,
    plan_dispatch,
    reduce_expert_gradients,
)
from tessera.components.moe.experts import GroupedExperts
from tessera.components.moe.moe import MoE
from tessera.components.moe.router import Router
from tessera.components.train.divergence import clip_gradients
from tests.conftest import ROOT

E, EP, D, H, K = 8, 2, 16, 12, 2


def dense_loop(x, indices, weights, keep, experts):
    """sum_k keep * w_k * SwiGLU_{e_k}(x) token by token."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(indices.shape[1]):
            if keep is not None and not keep[n, k]:
                continue
            e = indices[n, k]
            h = F.silu(x[n] @ experts.w_gate[e].T) * (x[n] @ experts.w_up[e].T)
            out[n] += weights[n, k] * (h @ experts.w_down[e].T)
    return out


def test_a_process_no_token_is_routed_to_gets_zero_expert_gradients():
    """Small evaluation batches can leave a process's experts without rows: they still run
    (on padding), return no rows, and get gradients of zero, not None (its optimizer then
    steps them as one process would)."""
    torch.manual_seed(0)
    local = E // EP
    weights = [torch.randn(local, *shape, requires_grad=True) for shape in ((H, D), (H, D), (D, H))]
    rows = torch.zeros(0, D, requires_grad=True)  # as the dispatch all-to-all delivers them
    out = local_experts(rows, torch.zeros(EP, local, dtype=torch.int64), *weights)
    assert out.shape == (0, D)
    out.sum().backward()
    for weight in weights:
        assert weight.grad is not None and torch.count_nonzero(weight.grad) == 0
    # the received rows stay in the graph: their all-to-all's backward (which the peers wait in) runs
    assert rows.grad is not None and rows.grad.shape == (0, D)


def test_dispatch_and_combine_on_two_simulated_processes_equal_a_dense_loop():
    torch.manual_seed(0)
    experts = GroupedExperts(n_experts=E, dim=D, hidden_dim=H)
    tokens = [9, 5]  # the processes hold different numbers of tokens
    xs = [torch.randn(n, D) for n in tokens]
    indices = [torch.randn(n, E).topk(K, dim=-1).indices for n in tokens]
    indices[1][:, 0] = 0  # process 1 sends most of its rows to process 0: uneven splits
    weights = [torch.rand(n, K) for n in tokens]
    keeps = [None, torch.rand(tokens[1], K) > 0.3]  # process 1 drops some assignments (capacity)
    plans = [plan_dispatch(i, w, k, n_experts=E, ep=EP) for i, w, k in zip(indices, weights, keeps)]
    assert plans[1].splits[0] != plans[1].splits[1]

    # the all-to-all by hand: process q receives from each source p the rows for q's experts
    local = E // EP
    sent = [x.index_select(0, p.token).split(p.splits) for x, p in zip(xs, plans)]
    returned = [[None] * EP for _ in range(EP)]
    for q in range(EP):
        rows = torch.cat([sent[p][q] for p in range(EP)])
        counts = torch.stack([plans[p].counts.view(EP, local)[q] for p in range(EP)])
        shard = [w[q * local:(q + 1) * local] for w in (experts.w_gate, experts.w_up, experts.w_down)]
        out = local_experts(rows, counts, *shard).split(counts.sum(1).tolist())
        for p in range(EP):
            returned[p][q] = out[p]
    with torch.no_grad():
        for p in range(EP):
            got = combine(torch.cat(returned[p]), plans[p], tokens[p])
            torch.testing.assert_close(got, dense_loop(xs[p], indices[p], weights[p], keeps[p], experts),
                                       rtol=1e-5, atol=1e-6)


def moe(n_experts: int, **router) -> MoE:
    return MoE(dim=D, router=Router(dim=D, n_experts=n_experts, top_k=2, **router),
               experts=GroupedExperts(n_experts=n_experts, dim=D, hidden_dim=H))


def test_expert_parallel_faults_name_the_constraint():
    assert expert_parallel_faults(moe(8), 2) == [] and expert_parallel_faults(moe(8), 8) == []
    (fault,) = expert_parallel_faults(moe(8), 3)
    assert "ep=3 does not divide its 8 routed experts" in fault
    # groups must not straddle processes: 4 groups on 2 processes (2 each) or on 8 (2 per group)
    assert expert_parallel_faults(moe(24, n_groups=4, topk_groups=2), 2) == []
    assert expert_parallel_faults(moe(24, n_groups=4, topk_groups=2), 8) == []
    (fault,) = expert_parallel_faults(moe(24, n_groups=4, topk_groups=2), 6)
    assert "4 groups (router.n_groups) do not align with ep=6" in fault
    v2 = moe(8)
    v2.device_balance_alpha, v2.n_devices = 0.05, 4
    (fault,) = expert_parallel_faults(v2, 2)
    assert "n_devices=4" in fault and "set n_devices=2" in fault
    assert expert_parallel_faults(v2, 4) == []


STEPS = 3
RUN = """
import json, sys
import torch, torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from tessera.components.moe.experts import GroupedExperts
from tessera.components.moe.expert_parallel import apply_expert_parallel, expert_parameters
from tessera.components.parallel.mesh import _parallel_dims
from tessera.components.parallel.sharding import materialize_sharded
from tests.test_expert_parallel import build, train

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


class ThroughDDP(torch.nn.Module):  # model.losses called through DDP, as components/parallel/ddp.py does
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
    def record(model):
        flows.extend([m.expert_parallel.sent, m.expert_parallel.received]
                     for m in model.modules() if isinstance(m, GroupedExperts))
    result = train(model if dense == "fsdp" else ThroughDDP(model), rank, 2, after_forward=record)
    dcp.save(model.state_dict(), checkpoint_id=f"{folder}/{label}-dcp")  # each process writes its shards
    full = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in model.state_dict().items()}
    if rank == 0:
        save_file(full, f"{folder}/{label}.safetensors")
        print("RESULT", label, json.dumps(result), flush=True)
    # a file, not stdout: two processes' long lines interleave on a shared pipe
    with open(f"{folder}/flows-{label}-{rank}.json", "w") as out:
        json.dump(flows, out)
from tessera.components.parallel.process_group import leave_process_group
leave_process_group()  # barrier first: a rank tearing gloo down alone can abort
"""


def build():
    """The DeepSeek debug model on the meta device (fp32, as the recipe configures it)."""
    from tessera.cli import resolve
    from tessera.components.train.launch import build_model_on_meta
    from tessera.recipes.deepseek_pretrain import recipe

    config, _ = resolve(recipe, ["debug"])
    return build_model_on_meta(config.model)


def train(model, rank: int, world: int, after_forward=lambda model: None) -> tuple[list[float], list[float]]:
    """STEPS AdamW steps on a fixed random batch of 4 sequences (process `rank` of `world`
    takes rows rank::world, as the data loaders do) with gradient clipping and the routers'
    bias update; returns each step's total loss averaged over the processes and its gradient
    norm before clipping (Adam would hide wrongly scaled gradients; the norm does not)."""
    import torch.distributed as dist

    from tessera.components.moe.router import Router

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


@pytest.mark.slow
def test_deepseek_debug_model_with_expert_parallel_beside_fsdp_or_ddp_trains_like_one_process(tmp_path):
    """ep=2 (each process 4 of the 8 experts, tokens exchanged) with FSDP or DDP over the other
    parameters, and ep=1 with the experts replicated on both processes (gradients averaged over
    the replica mesh) with FSDP; DCP checkpoints saved under each load into one process."""
    import torch.distributed.checkpoint as dcp

    (tmp_path / "run.py").write_text(RUN)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(tmp_path / "run.py"), str(tmp_path)], text=True,
                          capture_output=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    lines = done.stdout.splitlines()
    results = {line.split()[1]: json.loads(line.split(" ", 2)[2]) for line in lines if line.startswith("RESULT")}
    flows = {(label, rank): json.loads((tmp_path / f"flows-{label}-{rank}.json").read_text())
             for label in results for rank in (0, 1)}
    assert set(results) == {"ep2", "replicas2", "ep2_ddp"}, done.stdout[-2000:]

    torch.manual_seed(0)
    model = build()
    model.to_empty(device="cpu")
    model.init_weights()
    expected_losses, expected_norms = train(model, 0, 1)
    state = model.state_dict()
    biases = [name for name in state if name.endswith("expert_bias")]
    assert len(biases) == 4 and all(state[name].abs().sum() > 0 for name in biases)  # 3 layers + MTP, updated
    for label, (losses, norms) in results.items():
        assert losses == pytest.approx(expected_losses, rel=1e-5, abs=1e-6), label
        assert norms == pytest.approx(expected_norms, rel=1e-5), label
        got = load_file(tmp_path / f"{label}.safetensors")
        loaded = {k: torch.zeros_like(v) for k, v in state.items()}
        dcp.load(loaded, checkpoint_id=str(tmp_path / f"{label}-dcp"))  # no process group: one process
        assert set(got) == set(state)
        for name, value in state.items():  # a step moves weights by ~1e-2; Adam turns summation-order
            # noise in the ~0 gradient of a rare token's embedding row into ~2e-6
            torch.testing.assert_close(got[name], value, rtol=1e-4, atol=1e-5, msg=f"{label}: {name}")
            torch.testing.assert_close(loaded[name], got[name], rtol=0, atol=0, msg=f"{label} (DCP): {name}")
    # ep=2: the all-to-all moved uneven row counts: some process received a different count than it sent
    ep2 = [flows[label, rank] for label in ("ep2", "ep2_ddp") for rank in (0, 1)]
    assert any(sent != received for per_rank in ep2 for sent, received in per_rank)
    assert all(sent[0] > 0 and sent[1] > 0 for per_rank in ep2 for sent, _ in per_rank)  # both ways
