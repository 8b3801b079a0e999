"""The `mesh` parallel plan: every data-parallel layout (DDP, ZeRO-1, FSDP, HSDP) trains the
llama and DeepSeek debug models exactly as one process does, checkpoints move between
layouts, and plans that cannot run fail before training with the constraint they break.

The layouts run in two launches of forked ranks (tests/helpers/forked_ranks.py, 1 thread per rank),
one on 2 processes and one on 4, each running its layouts in sequence (tests/helpers/workers/mesh.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fiddle as fdl
import pytest
import torch
import torch.distributed as dist

from tessera.cli import resolve
from tessera.components.interfaces import CommHook, PeriodicSync
from tessera.components.parallel.mesh import Mesh, MeshError
from tessera.components.train.checkpoint import Checkpointer
from tessera.components.train.launch import launch
from tessera.recipes import deepseek_pretrain, llama_pretrain
from tessera.registry.errors import ConfigError

from helpers.forked_ranks import run_ranks
from helpers.launch import worker
from helpers.worker_outputs import merged_weights

RECIPES = {"llama": llama_pretrain.recipe, "deepseek": deepseek_pretrain.recipe}
STEPS = 4
ARGS = ["batch_size=8", "seq_len=32", "precision=@fp32", "compute.threads=1", "progress=None",
        "validation.batches=2", f"steps={STEPS}", "scheduler.total_steps=6", "scheduler.warmup_steps=2",
        # Rows of tokens absent from a batch get gradients of ~1e-9 that differ with summation
        # order; Adam's default eps (1e-8) would blow those up to full-size steps of either sign.
        "optimizer.eps=1e-5"]
# DeepSeek from its AdamW preset: these tests check parallel layouts against one process, and
# ZeRO-1 (in the layouts) takes a single optimizer; Muon's layouts: tests/test_muon_sharded.py
EXTRA = {"llama": ["debug", "model.layers[*].attention.dropout=0.0"], "deepseek": ["debug_baseline"]}

def args(recipe: str, *extra: str) -> list[str]:
    return [*EXTRA[recipe], *ARGS, *extra]


def one_process(recipe: str, folder, *extra: str):
    config, _ = resolve(RECIPES[recipe], args(recipe, *extra))
    config.checkpoint = None if folder is None else fdl.Config(Checkpointer, folder=str(folder), every=2, keep=5,
                                                               resume=True)
    return launch(config)


def on_processes(processes: int, tmp, jobs: list[dict]) -> dict[str, tuple]:
    """Run `jobs` ({label, recipe, plan, folder, extra}) in sequence on `processes` processes
    (tests/helpers/workers/mesh.py); returns each label's per-step losses, final full weights
    and stats (parameter count, bytes the comm hook sent, (step, group size) the periodic sync saw)."""
    tmp.mkdir(parents=True, exist_ok=True)
    spec = [{"label": j["label"], "recipe": j["recipe"], "folder": j.get("folder"),
             "weights": str(tmp / f"{j['label']}.safetensors"),
             "args": args(j["recipe"], f"parallel={j['plan']}", *j.get("extra", ()))} for j in jobs]
    (tmp / "jobs.json").write_text(json.dumps(spec))
    done = run_ranks(worker("mesh"), str(tmp / "jobs.json"), processes=processes)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    results = {}
    for job in spec:
        written = json.loads(Path(job["weights"] + ".result.json").read_text())
        results[job["label"]] = (written["losses"], merged_weights(Path(job["weights"]), processes),
                                 written["stats"])
    return results


def without_last_checkpoint(source, target):
    """A copy of checkpoint folder `source` whose newest checkpoint (step STEPS) is removed,
    so a run resumed from it trains steps 3..STEPS."""
    shutil.copytree(source, target)
    shutil.rmtree(target / f"step-{STEPS:08d}")
    return str(target)


def job(label: str, plan: str, *extra: str, recipe: str | None = None, folder: str | None = None) -> dict:
    """A job of `label` (<layout>-<recipe> unless `recipe` is given) under `plan`."""
    return {"label": label, "recipe": recipe or label.split("-")[-1], "plan": plan, "extra": list(extra),
            "folder": folder}


def results(*groups: dict[str, tuple]) -> dict[str, tuple]:
    return {label: run for group in groups for label, run in group.items()}


# The runs are grouped by process count: one launch of 2 ranks and one of 4 (each rank sets up
# once, however many jobs it then runs); each launch is a module fixture, set up when the first
# test that needs it runs. Checkpoints pass between launches: the reference's to ZeRO-1 (1 -> 2)
# and to ZeRO-1 beside experts (1 -> 4), FSDP's to HSDP (2 -> 4), ZeRO-1's to one process
# (2 -> 1), and ZeRO-1 beside experts' to one process (4 -> 1).

@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("mesh")


@pytest.fixture(scope="module")
def reference(tmp):
    """One process per recipe (checkpointing every 2 steps): what every layout must equal."""
    out = {}
    for recipe in RECIPES:
        result = one_process(recipe, tmp / f"one-{recipe}")
        out[f"one-{recipe}"] = (result.losses, {k: v.detach().clone() for k, v in result.model.state_dict().items()})
    return out


def data_parallel_jobs(tmp) -> list[dict]:
    """DDP, ZeRO-1 and FSDP of both recipes, a comm hook and a periodic sync, and ZeRO-1
    resuming the reference's checkpoint (2 processes)."""
    jobs = []
    for recipe in RECIPES:
        jobs += [job(f"ddp-{recipe}", "@mesh(dp_replicate=2)", "step.micro_batch_size=2"),  # 2 micro-batches: 1 no_sync
                 job(f"zero1-{recipe}", "@mesh(dp_replicate=2,zero1=True)"),
                 job(f"fsdp-{recipe}", "@mesh(dp_shard=2)")]
    jobs[1]["folder"] = str(tmp / "zero1-llama")  # checkpoints for 2 -> 1
    jobs[2]["folder"] = str(tmp / "fsdp-llama")   # checkpoints for FSDP -> HSDP
    jobs += [job("hook-llama", "@mesh(dp_replicate=2)", "parallel.comm_hook=@test_fp16"),
             job("sync-llama", "@mesh(dp_replicate=2)", "parallel.periodic_sync=@test_mean"),
             job("one-then-zero1", "@mesh(dp_replicate=2,zero1=True)", recipe="llama",
                 folder=without_last_checkpoint(tmp / "one-llama", tmp / "one-then-zero1"))]
    return jobs


def model_parallel_jobs() -> list[dict]:
    """Expert (beside FSDP and DDP), tensor and pipeline parallelism (2 processes)."""
    return [job("ep-deepseek", "@mesh(dp_shard=2,ep=2)"),
            *(job(f"tp-{recipe}", "@mesh(tp=2)") for recipe in RECIPES),
            *(job(f"pp-{recipe}", "@mesh(pp=2,n_microbatches=4)") for recipe in RECIPES),
            job("ep_ddp-deepseek", "@mesh(dp_replicate=2,ep=2)"),  # fused AdamW
            job("pp_noeval-llama", "@mesh(pp=2,n_microbatches=4)", "validation.batches=0")]


def sharded_on_four_jobs(tmp) -> list[dict]:
    """HSDP 2x2 (and resuming the FSDP checkpoint of the 2-process launch), FSDP x PP (in fp32
    and bf16) (4 processes)."""
    return [*(job(f"hsdp-{recipe}", "@mesh(dp_replicate=2,dp_shard=2)") for recipe in RECIPES),
            job("fsdp-then-hsdp", "@mesh(dp_replicate=2,dp_shard=2)", recipe="llama",
                folder=without_last_checkpoint(tmp / "fsdp-llama", tmp / "fsdp-then-hsdp")),
            *(job(f"fsdp_pp-{recipe}", "@mesh(dp_shard=2,pp=2,n_microbatches=2)") for recipe in RECIPES),
            job("fsdp_pp_bf16-llama", "@mesh(dp_shard=2,pp=2,n_microbatches=2)", "precision=@bf16_params")]


def composed_on_four_jobs(tmp) -> list[dict]:
    """TP x PP, and DeepSeek's compositions with expert parallelism (ZeRO-1 beside experts
    checkpointing for one process, and resuming the reference's checkpoint) (4 processes)."""
    jobs = [*(job(f"tp_pp-{recipe}", "@mesh(tp=2,pp=2,n_microbatches=2)") for recipe in RECIPES),
            *(job(label, plan) for label, plan in COMPOSITIONS.items())]
    jobs[-1]["folder"] = str(tmp / "ep_ddp_zero1")  # ZeRO-1 beside expert parallelism -> one process
    jobs.append(job("one-then-ep_zero1", COMPOSITIONS["ep_ddp_zero1-deepseek"], recipe="deepseek",
                    folder=without_last_checkpoint(tmp / "one-deepseek", tmp / "one-then-ep_zero1")))
    return jobs


@pytest.fixture(scope="module")
def on_two(tmp, reference):
    """The 2-process launch: the data-parallel layouts, then the model-parallel ones."""
    return on_processes(2, tmp / "on_two", [*data_parallel_jobs(tmp), *model_parallel_jobs()])


@pytest.fixture(scope="module")
def on_four(tmp, reference, on_two):
    """The 4-process launch: the sharded layouts, then the compositions."""
    return on_processes(4, tmp / "on_four", [*sharded_on_four_jobs(tmp), *composed_on_four_jobs(tmp)])


@pytest.fixture(scope="module")
def resumed_in_one_process(tmp, on_two, on_four):
    """One process resuming the checkpoints of ZeRO-1 (2 processes) and of ZeRO-1 beside experts (4)."""
    out = {}
    for label, recipe, source in [("zero1-then-one", "llama", "zero1-llama"),
                                  ("ep_zero1-then-one", "deepseek", "ep_ddp_zero1")]:
        resumed = one_process(recipe, without_last_checkpoint(tmp / source, tmp / label))
        out[label] = (resumed.losses, dict(resumed.model.state_dict()))
    return out


def assert_same_run(got: tuple, expected: tuple, label: str) -> None:
    assert len(got[0]) == STEPS, label
    assert got[0] == pytest.approx(expected[0], rel=1e-5, abs=1e-5), label
    assert set(got[1]) == set(expected[1]), label
    for name, value in expected[1].items():
        # atol: with eps 1e-5, Adam turns a rare token's ~1e-9 gradient, whose last bits differ
        # with the summation order (which each CPU's GEMM kernels choose), into steps up to
        # lr / eps = 300x that: 1.7e-6 seen on an AVX2-only Zen 3. A wrong gradient moves a
        # weight by a share of lr (3e-3) per step, 100x more.
        torch.testing.assert_close(got[1][name], value, rtol=1e-4, atol=1e-5, msg=f"{label}: {name}")


LAYOUTS = {"ddp": "on_two", "zero1": "on_two", "fsdp": "on_two", "hsdp": "on_four"}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_data_parallel_layout_trains_as_one_process(reference, request, layout, recipe):
    expected = reference[f"one-{recipe}"]
    assert expected[0][-1] < expected[0][0]  # the reference trains
    runs = request.getfixturevalue(LAYOUTS[layout])  # the group that ran this layout
    assert_same_run(runs[f"{layout}-{recipe}"], expected, f"{layout}-{recipe}")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_tensor_parallel_trains_as_one_process(reference, on_two, recipe):
    """tp=2 through the recipe's own data and trainer: both ranks read the same batches, heads,
    hidden widths and vocabulary are split, norms sequence-parallel; the run equals one process."""
    assert_same_run(on_two[f"tp-{recipe}"], reference[f"one-{recipe}"], f"tp-{recipe}")


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(RECIPES))
def test_pipeline_parallel_trains_as_one_process(reference, on_two, recipe):
    """pp=2 (1F1B, 4 micro-batches) through the recipe's trainer: losses (MoE balance and MTP
    terms included), and the weights of both stages, equal one process's."""
    assert_same_run(on_two[f"pp-{recipe}"], reference[f"one-{recipe}"], f"pp-{recipe}")


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
def test_compositions_train_as_one_process(reference, on_four, label):
    """4 processes, fp32: losses over every step and the final weights of the whole model
    (each process's stages merged, experts and FSDP shards gathered) equal one process's."""
    assert_same_run(on_four[label], reference[f"one-{label.split('-')[1]}"], label)


@pytest.mark.slow
def test_expert_parallel_beside_plain_ddp_and_a_pipeline_without_validation(reference, on_two):
    """EP beside DDP with the default (fused where possible) AdamW over experts (DTensors) and
    replicated weights (plain); a pipelined run with validation.batches=0."""
    runs = results(reference, on_two)
    assert_same_run(runs["ep_ddp-deepseek"], runs["one-deepseek"], "ep_ddp-deepseek")
    assert runs["pp_noeval-llama"][0] == pytest.approx(runs["one-llama"][0], rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_bf16_weights_train_under_fsdp_x_pp(reference, on_four):
    """bf16 weights (FSDP's mixed precision: fp32 shards, bf16 gathered copies) under FSDP x PP
    follow the fp32 single-process run to bf16's accuracy; casting FSDP's shards in place (as a
    plain model's bf16 policy does) instead froze the weights."""
    losses, weights, _ = on_four["fsdp_pp_bf16-llama"]
    expected = reference["one-llama"][0]
    assert losses == pytest.approx(expected, rel=2 ** -8)  # one bf16 ulp, relative
    # The first steps follow far closer than that: a frozen model would not (its step-2 loss
    # is the initial model's, while the reference's has taken one update).
    assert losses[1] == pytest.approx(expected[1], rel=2 ** -12)


@pytest.mark.slow
def test_expert_parallel_beside_fsdp_trains_as_one_process(reference, on_two):
    """ep=2: each process holds 4 of the 8 routed experts per MoE layer (all-to-all dispatch),
    FSDP2 shards the rest; losses, weights (experts gathered) and the routers' aux-free bias
    equal the single-process run's."""
    expected = reference["one-deepseek"]
    assert any("expert_bias" in name for name in expected[1])
    assert_same_run(on_two["ep-deepseek"], expected, "ep-deepseek")


RESUMED = {"zero1-then-one": "resumed_in_one_process", "one-then-zero1": "on_two",
           "fsdp-then-hsdp": "on_four"}


@pytest.mark.slow
@pytest.mark.parametrize("label", list(RESUMED))
def test_checkpoints_resume_exactly_under_another_layout(reference, request, label):
    runs = request.getfixturevalue(RESUMED[label])
    assert_same_run(runs[label], reference["one-llama"], label)  # 2 -> 1, 1 -> 2, FSDP -> HSDP


@pytest.mark.slow
def test_zero1_beside_expert_parallelism_resumes_in_one_process(reference, on_four, resumed_in_one_process):
    """Dense ZeRO-1 partitions and the experts' own optimizer state, saved from 4 processes,
    load into one process's AdamW and continue exactly; and the other way round."""
    runs = results(on_four, resumed_in_one_process)
    for label in ("ep_zero1-then-one", "one-then-ep_zero1"):
        assert_same_run(runs[label], reference["one-deepseek"], label)


@pytest.mark.slow
def test_ddp_registers_the_comm_hook_and_periodic_sync_replaces_ddp(reference, on_two):
    losses, _, stats = on_two["hook-llama"]
    expected = reference["one-llama"][0]
    assert losses == pytest.approx(expected, rel=1e-3)  # fp16 gradients: close, not equal
    assert losses != pytest.approx(expected, rel=1e-7, abs=0)  # ... because the hook compressed them
    assert stats["bytes"] == STEPS * stats["params"] * 2  # every gradient, every step, in 2 bytes
    losses, _, stats = on_two["sync-llama"]
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
