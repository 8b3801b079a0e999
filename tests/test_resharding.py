"""Checkpoints reshard: a checkpoint written under one parallel plan loads under another
(DCP resharding) with every weight and optimizer-state tensor bitwise the saved one and the
same logits, in both directions between data parallelism (DDP, FSDP2) and model parallelism
(tensor, pipeline, expert) and their compositions, from 2 processes to 4 and to 1, and into
one process for inference (`load_model`) and for the transformers export.

Each source job trains a debug model for STEPS steps under its plan and checkpoints at the
end; each load job resumes that finished run under another plan (so nothing trains: the job
only loads, optimizer state included) and reports what its model holds. The jobs of each
process count run in one launch of forked ranks (tests/helpers/workers/resharding_jobs.py), the 1-process
ones in pytest.
The reference for every load is the source run's own final model: its weights and optimizer
state gathered whole, and its logits of a fixed batch computed under its own plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import fiddle as fdl
import pytest
import torch
from safetensors.torch import load_file

from tessera.components.train.checkpoint import Checkpointer, CheckpointLoadError, load_model
from tessera.components.train.export import export_hf
from tessera.registry import serialize

from helpers.forked_ranks import run_ranks
from helpers.launch import worker
from helpers.workers import resharding_jobs
from helpers.workers.resharding_jobs import LENGTH, fixed_tokens

STEPS = 2
ARGS = ["batch_size=8", "seq_len=32", "precision=@fp32", "compute.threads=1", "progress=None",
        "validation.batches=1",
        f"steps={STEPS}", "scheduler.total_steps=4", "scheduler.warmup_steps=1", "optimizer.eps=1e-5"]
# DeepSeek from its AdamW preset: these tests check parallel layouts against one process, and
# ZeRO-1 (in the layouts) takes a single optimizer; Muon's layouts: tests/test_muon_sharded.py
EXTRA = {"llama": ["debug", "model.layers[*].attention.dropout=0.0"], "deepseek": ["debug_baseline"]}
PLANS = {"fsdp": "@mesh(dp_shard=2)", "ddp": "@mesh(dp_replicate=2)", "tp": "@mesh(tp=2)",
         "pp": "@mesh(pp=2,n_microbatches=4)", "ep": "@mesh(dp_shard=2,ep=2)", "one": "@single",
         # on 4 processes: FSDP x PP, and DeepSeek-V3's layout in miniature (PP x EP over ZeRO-1 replicas)
         "fsdp_pp": "@mesh(dp_shard=2,pp=2,n_microbatches=2)",
         "v3": "@mesh(dp_replicate=2,pp=2,ep=2,zero1=True,n_microbatches=2)"}
# the runs that write checkpoints, as "<plan>-<recipe>", on 2 processes and on 4
SOURCES = ["fsdp-llama", "ddp-llama", "tp-llama", "fsdp-deepseek", "pp-deepseek", "ep-deepseek"]
SOURCES_ON_FOUR = ["fsdp_pp-llama"]
# (source, plan it is loaded under) on 2 processes: data -> model parallel, and model -> model parallel;
# and on 4 (2 -> 4 processes)
LOADS = [("fsdp-llama", "tp"), ("fsdp-llama", "pp"), ("ddp-llama", "pp"), ("fsdp-deepseek", "tp"),
         ("fsdp-deepseek", "pp"), ("tp-llama", "pp"), ("pp-deepseek", "ep"), ("ep-deepseek", "tp")]
LOADS_ON_FOUR = [("fsdp-deepseek", "v3")]
# sources whose run exports under its own (model-parallel) plan, and whose 1-process load exports
EXPORT_UNDER_PLAN = ["tp-llama", "pp-deepseek", "fsdp_pp-llama"]
EXPORT_FROM_ONE = ["tp-llama", "ep-deepseek"]
ARCHITECTURES = {"llama": "LlamaForCausalLM", "deepseek": "DeepseekV3ForCausalLM"}


def checkpoint_of(tmp: Path, source: str) -> Path:
    return tmp / "checkpoints" / source / f"step-{STEPS:08d}"


def job(tmp: Path, label: str, recipe: str, plan: str, *, resume: str | None = None,
        export: bool = False) -> dict[str, Any]:
    """One job of resharding_jobs.py: train `recipe` under `plan` (or resume `resume` under it)."""
    return {"label": label, "recipe": recipe, "args": [*EXTRA[recipe], *ARGS, f"parallel={PLANS[plan]}"],
            "folder": str(tmp / "checkpoints" / label), "resume": resume, "out": str(tmp / "out" / label),
            "export": str(tmp / "hf" / label) if export else None}


def merged(tmp: Path, label: str) -> dict[str, torch.Tensor]:
    """The union of a multi-process job's per-rank tensors (a tensor several ranks report
    must agree: a replicated or gathered one)."""
    out: dict[str, torch.Tensor] = {}
    files = sorted((tmp / "out").glob(f"{label}.rank*.safetensors"))
    assert len(files) in (2, 4), f"{label}: {files}"
    for file in files:
        for name, value in load_file(file).items():
            if name in out:
                assert torch.equal(out[name], value), f"{label}: ranks disagree on {name}"
            out[name] = value
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """label -> the job's tensors (`model.*`, `optim.*`, `logits`): the sources, their loads
    on 2 or 4 processes ("<source>>plan") and in one process ("<source>>one"); `load_model`
    of each source checkpoint ("<source>>load_model", a model)."""
    tmp = tmp_path_factory.mktemp("resharding")
    (tmp / "out").mkdir()
    out = {}
    for processes, sources, loads in [(2, SOURCES, LOADS), (4, SOURCES_ON_FOUR, LOADS_ON_FOUR)]:
        jobs = [job(tmp, source, source.split("-")[1], source.split("-")[0], export=source in EXPORT_UNDER_PLAN)
                for source in sources]
        jobs += [job(tmp, f"{source}>{plan}", source.split("-")[1], plan, resume=str(checkpoint_of(tmp, source)))
                 for source, plan in loads]
        (tmp / f"jobs-{processes}.json").write_text(json.dumps(jobs))
        done = run_ranks(worker("resharding_jobs"), str(tmp / f"jobs-{processes}.json"), processes=processes)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-5000:]
        out.update({j["label"]: merged(tmp, j["label"]) for j in jobs})
    for source in SOURCES + SOURCES_ON_FOUR:
        recipe = source.split("-")[1]
        _, out[f"{source}>one"] = resharding_jobs.run(job(tmp, f"{source}>one", recipe, "one",
                                                          resume=str(checkpoint_of(tmp, source))))
        out[f"{source}>load_model"] = load_model(checkpoint_of(tmp, source)).eval()
    out["tmp"] = tmp
    return out


def assert_same_tensors(got: dict[str, torch.Tensor], saved: dict[str, torch.Tensor], label: str) -> None:
    """Every weight and optimizer-state tensor bitwise the saved one, none missing or extra."""
    names = {name for name in saved if name != "logits"}
    assert {name for name in got if name != "logits"} == names, label
    assert any(name.startswith("optim.") for name in names) and any(name.endswith("exp_avg_sq") for name in names)
    for name in sorted(names):
        assert torch.equal(got[name], saved[name]), f"{label}: {name} differs from the saved tensor"


def assert_same_logits(got: torch.Tensor, expected: torch.Tensor, label: str) -> None:
    assert got.shape == expected.shape == (*fixed_tokens(2).shape, expected.shape[-1]), label
    # fp32; summation order differs between plans (tensor parallelism's all-reduces)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5, msg=label)


@pytest.mark.slow
@pytest.mark.parametrize("source, plan", [*LOADS, *LOADS_ON_FOUR, *((s, "one") for s in SOURCES + SOURCES_ON_FOUR)],
                         ids=lambda value: value)
def test_checkpoint_loads_under_another_plan_with_the_saved_tensors_and_logits(runs, source, plan):
    saved = runs[source]
    assert_same_tensors(runs[f"{source}>{plan}"], saved, f"{source}>{plan}")
    assert_same_logits(runs[f"{source}>{plan}"]["logits"], saved["logits"], f"{source}>{plan}")


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES + SOURCES_ON_FOUR)
def test_load_model_in_one_process_gives_the_saved_weights_and_logits(runs, source):
    """`load_model` (weights only, for inference) equals the source's final model; the
    source's own logits equal those of a model built independently from its gathered weights."""
    saved = runs[source]
    model = runs[f"{source}>load_model"]
    weights = {f"model.{name}": value for name, value in model.state_dict().items()}
    assert set(weights) == {name for name in saved if name.startswith("model.")}
    for name, value in weights.items():
        assert torch.equal(value, saved[name]), f"{source}: {name}"
    reference = fdl.build(serialize.load(str(checkpoint_of(runs["tmp"], source) / "config.json")).model)
    reference.load_state_dict({name[len("model."):]: value for name, value in saved.items()
                               if name.startswith("model.")})
    tokens = fixed_tokens(model.vocab_size)
    with torch.no_grad():
        assert_same_logits(saved["logits"], reference.eval()(tokens), f"{source} under its plan vs gathered")
        assert_same_logits(model(tokens), saved["logits"], f"{source}>load_model")


@pytest.mark.slow
@pytest.mark.parametrize("source, where", [*((s, "plan") for s in EXPORT_UNDER_PLAN),
                                           *((s, "one") for s in EXPORT_FROM_ONE)], ids=lambda value: value)
def test_transformers_export_of_a_resharded_model_gives_the_saved_logits(runs, source, where):
    """The export written under the source's own model-parallel plan (stages or shards
    gathered), or from its checkpoint loaded in one process, gives the saved logits in
    transformers."""
    transformers = pytest.importorskip("transformers")
    folder = runs["tmp"] / "hf" / source
    if where == "one":
        folder = runs["tmp"] / "hf" / f"{source}>one"
        assert export_hf(runs[f"{source}>load_model"], folder, max_position_embeddings=LENGTH) is not None
    theirs = getattr(transformers, ARCHITECTURES[source.split("-")[1]]).from_pretrained(folder).eval()
    saved = runs[source]["logits"]
    with torch.no_grad():
        assert_same_logits(theirs(fixed_tokens(saved.shape[-1])).logits, saved, f"{source} exported ({where})")


# -- a checkpoint of another model ---------------------------------------------------------------

class _Net(torch.nn.Module):
    """A linear layer, and with `scaled` a `scale` vector besides."""

    def __init__(self, *, scaled: bool) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        if scaled:
            self.scale = torch.nn.Parameter(torch.ones(3))


@pytest.mark.parametrize("writer_scaled", [False, True], ids=["extra tensor", "missing tensor"])
def test_loading_a_checkpoint_of_another_model_names_the_tensor(tmp_path, writer_scaled):
    """A model holding a tensor the checkpoint lacks, or lacking one it holds, is refused
    naming the tensor (only a pipeline rank may hold part of a checkpoint, and only when
    another rank holds the rest)."""
    writer, reader = _Net(scaled=writer_scaled), _Net(scaled=not writer_scaled)
    checkpointer = Checkpointer(folder=str(tmp_path))
    path = checkpointer.save(1, model=writer, optimizer=torch.optim.SGD(writer.parameters(), lr=0.1), extra={})
    with pytest.raises(CheckpointLoadError, match="no entry 'scale'"):
        checkpointer.load(path, model=reader, optimizer=torch.optim.SGD(reader.parameters(), lr=0.1))
