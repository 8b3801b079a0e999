"""The `mesh` parallel plan: every data-parallel layout (DDP, ZeRO-1, FSDP, HSDP) trains the
llama and DeepSeek debug models exactly as one process does, checkpoints move between
layouts, and plans that cannot run fail before training with the constraint they break.

Each process count is launched once (torchrun, 1 thread per rank) and runs its layouts in
sequence inside one script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import fiddle as fdl
import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from tessera.cli import resolve
from tessera.components.interfaces import CommHook, PeriodicSync
from tessera.components.parallel.mesh import Mesh, MeshError
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.launch import launch
from tessera.recipes import deepseek_pretrain, llama_pretrain
from tessera.registry.errors import ConfigError
from tests.conftest import ROOT

RECIPES = {"llama": llama_pretrain.recipe, "deepseek": deepseek_pretrain.recipe}
STEPS = 4
ARGS = ["debug", "batch_size=8", "seq_len=32", "precision=@fp32", "compute.threads=1", "progress=None",
        "validation.batches=2", f"steps={STEPS}", "scheduler.total_steps=6", "scheduler.warmup_steps=2",
        # Rows of tokens absent from a batch get gradients of ~1e-9 that differ with summation
        # order; Adam's default eps (1e-8) would blow those up to full-size steps of either sign.
        "optimizer.eps=1e-5"]
EXTRA = {"llama": ["model.layers[*].attention.dropout=0.0"], "deepseek": []}

RUN = """
import copy, json, os, sys
import fiddle as fdl
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from tessera.components.parallel.process_group import leave_process_group
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.launch import build_model_on_meta
from tessera.recipes import deepseek_pretrain, llama_pretrain
from tessera.cli import resolve
import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from tessera.components.interfaces import CommHook, PeriodicSync
from tessera.registry import COMM_HOOK, PERIODIC_SYNC


@COMM_HOOK.register("test_fp16")
class TorchFp16(CommHook):  # torch's fp16 compression hook, counting the bytes it all-reduces
    def register(self, ddp, process_group):
        def hook(group, bucket):
            self.bytes_sent += bucket.buffer().numel() * 2
            return default_hooks.fp16_compress_hook(group, bucket)
        ddp.register_comm_hook(process_group, hook)


@PERIODIC_SYNC.register("test_mean")
class MeanEveryStep(PeriodicSync):  # averages the replicas' weights after every step
    def __init__(self):
        self.seen = []
    def after_step(self, model, step, process_group):
        size = dist.get_world_size(process_group)
        with torch.no_grad():
            for param in model.parameters():
                dist.all_reduce(param, group=process_group)
                param /= size
        self.seen.append([step, size])


recipes = {"llama": llama_pretrain.recipe, "deepseek": deepseek_pretrain.recipe}
for job in json.loads(open(sys.argv[1]).read()):
    config, _ = resolve(recipes[job["recipe"]], job["args"])
    config.metrics = None
    config.checkpoint = None if job["folder"] is None else fdl.Config(
        Checkpointer, folder=job["folder"], every=2, keep=5, resume=True)
    run = copy.copy(config)
    run.model = build_model_on_meta(config.model)  # as `launch` does, without leaving the process group
    train = fdl.build(run)
    result = train()
    plan = train.keywords["parallel"]
    stats = {"params": sum(p.numel() for p in result.model.parameters()),
             "bytes": getattr(plan.comm_hook, "bytes_sent", None), "seen": getattr(plan.periodic_sync, "seen", None)}
    # every process's whole tensors (a pipeline stage holds only its own): the test merges them
    full = get_model_state_dict(result.model, options=StateDictOptions(full_state_dict=True))
    save_file({k: v.clone() for k, v in full.items()}, job["weights"] + "." + os.environ["RANK"])
    dist.barrier()
    if os.environ["RANK"] == "0":
        print("RESULT", job["label"], json.dumps(result.losses), flush=True)
        print("STATS", job["label"], json.dumps(stats), flush=True)
leave_process_group()
"""


def args(recipe: str, *extra: str) -> list[str]:
    return [*ARGS, *EXTRA[recipe], *extra]


def one_process(recipe: str, folder, *extra: str):
    config, _ = resolve(RECIPES[recipe], args(recipe, *extra))
    config.checkpoint = None if folder is None else fdl.Config(Checkpointer, folder=str(folder), every=2, keep=5,
                                                               resume=True)
    return launch(config)


def torchrun(processes: int, tmp, jobs: list[dict]) -> dict[str, tuple]:
    """Run `jobs` ({label, recipe, plan, folder, extra}) in sequence on `processes` processes;
    returns each label's per-step losses, final full weights and stats (parameter count,
    bytes the comm hook sent, (step, group size) the periodic sync saw)."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec = [{"label": j["label"], "recipe": j["recipe"], "folder": j.get("folder"),
             "weights": str(tmp / f"{j['label']}.safetensors"),
             "args": args(j["recipe"], f"parallel={j['plan']}", *j.get("extra", ()))} for j in jobs]
    (tmp / "jobs.json").write_text(json.dumps(spec))
    (tmp / "run.py").write_text(RUN)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(processes), str(tmp / "run.py"), str(tmp / "jobs.json")], text=True,
                          capture_output=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = {}
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            _, label, losses = line.split(" ", 2)
            results[label] = (json.loads(losses), merged_weights(tmp / f"{label}.safetensors", processes))
    for line in done.stdout.splitlines():
        if line.startswith("STATS "):
            _, label, stats = line.split(" ", 2)
            results[label] += (json.loads(stats),)
    assert set(results) == {j["label"] for j in jobs}, done.stdout[-2000:]
    return results


def merged_weights(path, processes: int) -> dict[str, torch.Tensor]:
    """The whole model's weights from each process's file `path.<rank>`; a tensor that several
    processes hold (replicas, or a sharded one gathered) must be the same on all of them."""
    merged: dict[str, torch.Tensor] = {}
    for rank in range(processes):
        for name, value in load_file(f"{path}.{rank}").items():
            if name in merged:
                torch.testing.assert_close(value, merged[name], rtol=0, atol=0, msg=f"rank {rank} disagrees: {name}")
            merged[name] = value
    return merged


def without_last_checkpoint(source, target):
    """A copy of checkpoint folder `source` whose newest checkpoint (step STEPS) is removed,
    so a run resumed from it trains steps 3..STEPS."""
    shutil.copytree(source, target)
    shutil.rmtree(target / f"step-{STEPS:08d}")
    return str(target)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One process (the reference), then 2 processes (DDP, ZeRO-1, FSDP, and ZeRO-1 resuming
    the reference's checkpoint), then 4 (HSDP 2x2, and HSDP resuming the FSDP checkpoint)."""
    tmp = tmp_path_factory.mktemp("mesh")
    out: dict[str, tuple[list[float], dict[str, torch.Tensor]]] = {}
    for recipe in RECIPES:
        result = one_process(recipe, tmp / f"one-{recipe}")
        out[f"one-{recipe}"] = (result.losses, {k: v.detach().clone() for k, v in result.model.state_dict().items()})
    two = []
    for recipe in RECIPES:
        two += [{"label": f"ddp-{recipe}", "recipe": recipe, "plan": "@mesh(dp_replicate=2)",
                 "extra": ["step.micro_batch_size=2"]},  # two micro-batches: the first under no_sync
                {"label": f"zero1-{recipe}", "recipe": recipe, "plan": "@mesh(dp_replicate=2,zero1=True)"},
                {"label": f"fsdp-{recipe}", "recipe": recipe, "plan": "@mesh(dp_shard=2)"}]
    two[1]["folder"] = str(tmp / "zero1-llama")  # checkpoints for 2 -> 1
    two[2]["folder"] = str(tmp / "fsdp-llama")   # checkpoints for FSDP -> HSDP
    two += [{"label": "hook-llama", "recipe": "llama", "plan": "@mesh(dp_replicate=2)",
             "extra": ["parallel.comm_hook=@test_fp16"]},
            {"label": "sync-llama", "recipe": "llama", "plan": "@mesh(dp_replicate=2)",
             "extra": ["parallel.periodic_sync=@test_mean"]}]
    two.append({"label": "ep-deepseek", "recipe": "deepseek", "plan": "@mesh(dp_shard=2,ep=2)"})
    two += [{"label": f"tp-{recipe}", "recipe": recipe, "plan": "@mesh(tp=2)"} for recipe in RECIPES]
    two += [{"label": f"pp-{recipe}", "recipe": recipe, "plan": "@mesh(pp=2,n_microbatches=4)"} for recipe in RECIPES]
    two += [{"label": "ep_ddp-deepseek", "recipe": "deepseek", "plan": "@mesh(dp_replicate=2,ep=2)"},  # fused AdamW
            {"label": "pp_noeval-llama", "recipe": "llama", "plan": "@mesh(pp=2,n_microbatches=4)",
             "extra": ["validation.batches=0"]}]
    two.append({"label": "one-then-zero1", "recipe": "llama", "plan": "@mesh(dp_replicate=2,zero1=True)",
                "folder": without_last_checkpoint(tmp / "one-llama", tmp / "one-then-zero1")})
    out.update(torchrun(2, tmp / "two", two))
    four = [{"label": f"hsdp-{recipe}", "recipe": recipe, "plan": "@mesh(dp_replicate=2,dp_shard=2)"}
            for recipe in RECIPES]
    four.append({"label": "fsdp-then-hsdp", "recipe": "llama", "plan": "@mesh(dp_replicate=2,dp_shard=2)",
                 "folder": without_last_checkpoint(tmp / "fsdp-llama", tmp / "fsdp-then-hsdp")})
    four += [{"label": f"fsdp_pp-{recipe}", "recipe": recipe, "plan": "@mesh(dp_shard=2,pp=2,n_microbatches=2)"}
             for recipe in RECIPES]
    four += [{"label": f"tp_pp-{recipe}", "recipe": recipe, "plan": "@mesh(tp=2,pp=2,n_microbatches=2)"}
             for recipe in RECIPES]
    four.append({"label": "fsdp_pp_bf16-llama", "recipe": "llama", "plan": "@mesh(dp_shard=2,pp=2,n_microbatches=2)",
                 "extra": ["precision=@bf16_params"]})
    four += [{"label": label, "recipe": "deepseek", "plan": plan} for label, plan in COMPOSITIONS.items()]
    four[-1]["folder"] = str(tmp / "ep_ddp_zero1")  # ZeRO-1 beside expert parallelism -> one process
    four.append({"label": "one-then-ep_zero1", "recipe": "deepseek", "plan": COMPOSITIONS["ep_ddp_zero1-deepseek"],
                 "folder": without_last_checkpoint(tmp / "one-deepseek", tmp / "one-then-ep_zero1")})
    out.update(torchrun(4, tmp / "four", four))
    resumed = one_process("llama", without_last_checkpoint(tmp / "zero1-llama", tmp / "zero1-then-one"))
    out["zero1-then-one"] = (resumed.losses, dict(resumed.model.state_dict()))
    resumed = one_process("deepseek", without_last_checkpoint(tmp / "ep_ddp_zero1", tmp / "ep_zero1-then-one"))
    out["ep_zero1-then-one"] = (resumed.losses, dict(resumed.model.state_dict()))
    return out


def assert_same_run(got: tuple, expected: tuple, label: str) -> None:
    assert len(got[0]) == STEPS, label
    assert got[0] == pytest.approx(expected[0], rel=1e-5, abs=1e-5), label
    assert set(got[1]) == set(expected[1]), label
    for name, value in expected[1].items():
        torch.testing.assert_close(got[1][name], value, rtol=1e-4, atol=1e-6, msg=f"{label}: {name}")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("layout", ["ddp", "zero1", "fsdp", "hsdp"])
def test_every_data_parallel_layout_trains_as_one_process(runs, layout, recipe):
    reference = runs[f"one-{recipe}"]
    assert reference[0][-1] < reference[0][0]  # the reference trains
    assert_same_run(runs[f"{layout}-{recipe}"], reference, f"{layout}-{recipe}")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_tensor_parallel_trains_as_one_process(runs, recipe):
    """tp=2 through the recipe's own data and trainer: both ranks read the same batches, heads,
    hidden widths and vocabulary are split, norms sequence-parallel; the run equals one process."""
    assert_same_run(runs[f"tp-{recipe}"], runs[f"one-{recipe}"], f"tp-{recipe}")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_pipeline_parallel_trains_as_one_process(runs, recipe):
    """pp=2 (1F1B, 4 micro-batches) through the recipe's trainer: losses (MoE balance and MTP
    terms included), and the weights of both stages, equal one process's."""
    assert_same_run(runs[f"pp-{recipe}"], runs[f"one-{recipe}"], f"pp-{recipe}")


COMPOSITIONS = {
    # ep=2 of dp_shard=4: each expert's weights on 2 processes (their gradients averaged), the
    # rest FSDP-sharded 4 ways
    "fsdp_ep-deepseek": "@mesh(dp_shard=4,ep=2)",
    # DeepSeek-V3's plan in miniature (PP16 x EP64 x ZeRO-1 DP): ep carved out of the replicas
    "pp_ep_zero1-deepseek": "@mesh(dp_replicate=2,pp=2,ep=2,zero1=True,n_microbatches=2)",
    # torchtitan's: pipeline stages, experts over ep of the FSDP processes
    "pp_ep_fsdp-deepseek": "@mesh(dp_shard=2,pp=2,ep=2,n_microbatches=2)",
    # experts over ep of 4 DDP replicas (2 copies of each), ZeRO-1 over the dense parameters
    "ep_ddp_zero1-deepseek": "@mesh(dp_replicate=4,ep=2,zero1=True)",
}


@pytest.mark.slow
@pytest.mark.parametrize("label", ["fsdp_pp-llama", "fsdp_pp-deepseek", "tp_pp-llama", "tp_pp-deepseek",
                                   *COMPOSITIONS])
def test_compositions_train_as_one_process(runs, label):
    """4 processes, fp32: losses over every step and the final weights of the whole model
    (each process's stages merged, experts and FSDP shards gathered) equal one process's."""
    reference = runs[f"one-{label.split('-')[1]}"]
    assert_same_run(runs[label], reference, label)


@pytest.mark.slow
def test_expert_parallel_beside_plain_ddp_and_a_pipeline_without_validation(runs):
    """EP beside DDP with the default (fused where possible) AdamW over experts (DTensors) and
    replicated weights (plain); a pipelined run with eval_batches=0."""
    assert_same_run(runs["ep_ddp-deepseek"], runs["one-deepseek"], "ep_ddp-deepseek")
    assert runs["pp_noeval-llama"][0] == pytest.approx(runs["one-llama"][0], rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_bf16_weights_train_under_fsdp_x_pp(runs):
    """bf16 weights (FSDP's mixed precision: fp32 shards, bf16 gathered copies) under FSDP x PP
    follow the fp32 single-process run to bf16's accuracy; casting FSDP's shards in place (as a
    plain model's bf16 policy does) instead froze the weights."""
    losses, weights, _ = runs["fsdp_pp_bf16-llama"]
    reference, start = runs["one-llama"][0], runs["one-llama"][0][0]
    assert losses == pytest.approx(reference, rel=2e-3)
    assert reference[-1] < start - 0.1  # a frozen model would stay ~0.1 above the reference by the end


@pytest.mark.slow
def test_expert_parallel_beside_fsdp_trains_as_one_process(runs):
    """ep=2: each process holds 4 of the 8 routed experts per MoE layer (all-to-all dispatch),
    FSDP2 shards the rest; losses, weights (experts gathered) and the routers' aux-free bias
    equal the single-process run's."""
    reference = runs["one-deepseek"]
    assert any("expert_bias" in name for name in reference[1])
    assert_same_run(runs["ep-deepseek"], reference, "ep-deepseek")


@pytest.mark.slow
@pytest.mark.parametrize("label", ["zero1-then-one", "one-then-zero1", "fsdp-then-hsdp"])
def test_checkpoints_resume_exactly_under_another_layout(runs, label):
    assert_same_run(runs[label], runs["one-llama"], label)  # 2 -> 1, 1 -> 2, FSDP -> HSDP


@pytest.mark.slow
def test_zero1_beside_expert_parallelism_resumes_in_one_process(runs):
    """Dense ZeRO-1 partitions and the experts' own optimizer state, saved from 4 processes,
    load into one process's AdamW and continue exactly; and the other way round."""
    for label in ("ep_zero1-then-one", "one-then-ep_zero1"):
        assert_same_run(runs[label], runs["one-deepseek"], label)


@pytest.mark.slow
def test_ddp_registers_the_comm_hook_and_periodic_sync_replaces_ddp(runs):
    losses, _, stats = runs["hook-llama"]
    reference = runs["one-llama"][0]
    assert losses == pytest.approx(reference, rel=1e-3)  # fp16 gradients: close, not equal
    assert losses != pytest.approx(reference, rel=1e-7, abs=0)  # ... because the hook compressed them
    assert stats["bytes"] == STEPS * stats["params"] * 2  # every gradient, every step, in 2 bytes
    losses, _, stats = runs["sync-llama"]
    assert stats["seen"] == [[step, 2] for step in range(1, STEPS + 1)]  # after each step, over both replicas
    assert stats["bytes"] is None and losses[-1] < losses[0]


# -- plans that cannot run ---------------------------------------------------------------------

class _Hook(CommHook):
    def register(self, ddp, process_group) -> None:
        pass


class _Sync(PeriodicSync):
    def after_step(self, model, step, process_group) -> None:
        pass


def test_degrees_that_do_not_multiply_to_the_world_size_fail_before_any_process_group(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with torch.device("meta"):
        model = torch.nn.Linear(2, 2)
    for plan, words in [(Mesh(dp_replicate=2), ["multiply to 2", "3 processes", "--nproc-per-node 2"]),
                        (Mesh(dp_replicate=2, dp_shard=-1), ["dp_shard=-1", "does not divide the 3 processes"])]:
        with pytest.raises(MeshError) as err:
            plan.apply(model)
        for word in words:
            assert word in str(err.value)
    assert not dist.is_initialized()
    assert Mesh(dp_replicate=3, dp_shard=-1).degrees(6)["dp_shard"] == 2


@pytest.mark.parametrize("plan, words", [
    ("@mesh(dp_replicate=2,tp=2)", ["tp == 1 or", "without dp_replicate"]),
    ("@mesh(dp_shard=2,ep=2,zero1=True)", ["zero1 needs replicated parameters"]),
    ("@mesh(dp_replicate=0)", ["degrees >= 1"]),
    ("@mesh(dp_shard=2,zero1=True)", ["zero1 needs replicated parameters", "already shards the optimizer state"]),
])
def test_bad_plans_fail_validation_naming_the_constraint(plan, words):
    with pytest.raises(ConfigError) as err:
        resolve(llama_pretrain.recipe, ["debug", f"parallel={plan}"])
    text = str(err.value)
    assert "parallel" in text
    for word in words:
        assert word in text


def test_hooks_and_periodic_sync_need_replicated_parameters():
    with pytest.raises(ValueError, match="comm_hook needs DDP.*reduce-scatters the gradients"):
        Mesh(dp_replicate=2, dp_shard=2, comm_hook=_Hook())  # HSDP
    with pytest.raises(ValueError, match="comm_hook needs DDP"):
        Mesh(dp_shard=-1, comm_hook=_Hook())
    with pytest.raises(ValueError, match="comm_hook needs DDP.*across dp_replicate > 1 replicas"):
        Mesh(comm_hook=_Hook())  # one replica: nothing to communicate
    with pytest.raises(ValueError, match="periodic_sync needs replicated parameters"):
        Mesh(dp_shard=2, periodic_sync=_Sync())
    with pytest.raises(ValueError, match="periodic_sync excludes comm_hook and zero1"):
        Mesh(dp_replicate=2, periodic_sync=_Sync(), zero1=True)
    Mesh(dp_replicate=2, comm_hook=_Hook())  # DDP with a hook is fine


@pytest.mark.parametrize("preset, world, degrees", [
    # V3 §3.2: 2,048 GPUs, PP16 (DualPipe) x EP64 x ZeRO-1 data parallelism, no TP
    ("deepseek_v3", 2048, dict(dp_replicate=128, dp_shard=1, tp=1, pp=16, ep=64)),
    # V2 §3.1.3: PP16 x EP8 x ZeRO-1 (128 GPUs chosen: the paper gives no count)
    ("deepseek_v2", 128, dict(dp_replicate=8, dp_shard=1, tp=1, pp=16, ep=8)),
])
def test_full_size_presets_carry_their_papers_plans(preset, world, degrees):
    """The presets' `parallel` is the paper's layout as a runnable plan, and the full-size
    model (on the meta device) satisfies it: 256 (160) experts split over ep, group-limited
    routing's groups aligned with whole processes, 61 (60) layers over the pipeline stages."""
    from tessera.components.train.launch import build_model_on_meta

    config = deepseek_pretrain.recipe.config(preset)
    plan = fdl.build(config.parallel)
    assert isinstance(plan, Mesh) and plan.zero1
    model = build_model_on_meta(config.model)
    assert plan.check(model, world) == degrees
    with pytest.raises(MeshError, match=f"multiply to {world} .* but the run has 1 process"):
        plan.check(model, 1)  # launched without torchrun: says how many processes the plan needs
