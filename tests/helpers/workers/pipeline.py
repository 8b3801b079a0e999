"""Run on 2 processes by tests/test_pipeline.py: every schedule trains the llama or
DeepSeek debug model on 2 pipeline stages and, on each rank, the single-process reference (same
seed, same batches); rank 0 prints `CASE <json>` per case: every rank's report of the largest
differences, the losses, the stage's tensor names and the measured bubble.

    python -m torch.distributed.run --nproc-per-node 2 tests/helpers/workers/pipeline.py
"""

from __future__ import annotations

import json

import fiddle as fdl
import torch
import torch.distributed as dist

from tessera.cli import resolve
from tessera.components.moe.router import Router
from tessera.components.parallel.pipeline import materialize_stages, pipeline
from tessera.components.parallel.pipeline_schedule import PipelineRunner, measure_bubble
from tessera.components.parallel.process_group import leave_process_group
from tessera.recipes.deepseek_pretrain import recipe as deepseek
from tessera.recipes.llama_pretrain import recipe as llama

STEPS, MICRO, SEQ = 3, 2, 16
OVERRIDES = {"llama": (llama, ["model.layers[*].attention.dropout=0.0"]), "deepseek": (deepseek, [])}
CASES = [("llama", "GPipe", 1, 4, None), ("llama", "1F1B", 1, 4, None), ("llama", "Interleaved1F1B", 2, 4, None),
         ("llama", "DualPipeV", 2, 4, None), ("deepseek", "1F1B", 1, 2, 4), ("deepseek", "DualPipeV", 2, 4, None)]
"""(family, schedule, virtual stages, micro-batches per step, the plan's n_microbatches)."""


def build(family):
    recipe, overrides = OVERRIDES[family]
    config, _ = resolve(recipe, ["debug", *overrides])
    with torch.device("meta"):
        return fdl.build(config.model)


def batches(step, n_micro, vocab):
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(n_micro):
        seq = torch.randint(0, vocab, (MICRO, SEQ + 1), generator=g)
        doc_ids = (torch.rand(MICRO, SEQ, generator=g) < 0.1).cumsum(1)  # a few document boundaries
        out.append({"tokens": seq[:, :-1], "targets": seq[:, 1:], "doc_ids": doc_ids})
    return out


def optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, eps=1e-5)


def after_step(model, solo):
    """The routers' bias update, each over its own rank's loads (`solo`: data-parallel size 1)."""
    for module in model.modules():
        if isinstance(module, Router):
            module.load_group = solo
            module.after_optimizer_step()


def reference(family, n_micro, solo):
    model = build(family)
    torch.manual_seed(0)
    model.to_empty(device="cpu")
    model.init_weights()
    opt, history = optimizer(model), []
    for step in range(STEPS):
        totals = {}
        for batch in batches(step, n_micro, model.vocab_size):
            terms = model.losses(batch["tokens"], batch["targets"], doc_ids=batch["doc_ids"])
            (torch.stack(list(terms.values())).sum() / n_micro).backward()
            for name, value in terms.items():
                totals[name] = totals.get(name, 0.0) + value.item() / n_micro
        opt.step()
        after_step(model, solo)
        opt.zero_grad(set_to_none=True)
        history.append(totals)
    model.eval()
    with torch.no_grad():
        b = batches(99, 4, model.vocab_size)
        evals = [model.losses(x["tokens"], x["targets"], doc_ids=x["doc_ids"]) for x in b]
        evaluation = {k: sum(e[k].item() for e in evals) / len(evals) for k in evals[0]}
    return history, model.state_dict(), evaluation


def pipelined(family, schedule, virtual, n_micro, n_microbatches, rank, solo):
    model = pipeline(build(family), pp_rank=rank, pp_size=2, virtual_stages=virtual, schedule=schedule)
    torch.manual_seed(0)
    materialize_stages(model, "cpu")
    runner = PipelineRunner(model=model, schedule=schedule, group=dist.group.WORLD, device="cpu",
                            n_microbatches=n_microbatches)
    opt, history = optimizer(model), []
    for step in range(STEPS):
        history.append(runner.forward_backward(model, batches(step, n_micro, model.vocab_size), n_micro=n_micro))
        opt.step()
        after_step(model, solo)
        opt.zero_grad(set_to_none=True)
    model.eval()
    evaluation = runner.evaluate(batches(99, 4, model.vocab_size))
    model.train()
    bubble = measure_bubble(runner, lambda: runner.forward_backward(
        model, batches(0, n_micro, model.vocab_size), n_micro=n_micro))
    return history, model.state_dict(), evaluation, bubble


def main() -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    solo = [dist.new_group([r]) for r in range(2)][rank]  # each rank's own data-parallel group (dp = 1)
    for family, schedule, virtual, n_micro, n_microbatches in CASES:
        ref_history, ref_state, ref_eval = reference(family, n_micro, solo)
        history, state, evaluation, bubble = pipelined(family, schedule, virtual, n_micro, n_microbatches, rank, solo)
        loss_diff = max(abs(h[k] - r[k]) for h, r in zip(history, ref_history) for k in r)
        param_diff = max((state[k] - ref_state[k]).abs().max().item() for k in state)
        report = {"terms": [sorted(h) == sorted(r) for h, r in zip(history, ref_history)], "loss_diff": loss_diff,
                  "param_diff": param_diff, "names": sorted(state), "losses": [h for h in history],
                  "ref_losses": ref_history, "eval_diff": max(abs(evaluation[k] - ref_eval[k]) for k in ref_eval),
                  "eval_terms": sorted(evaluation) == sorted(ref_eval), "bubble": bubble["bubble"]}
        gathered = [None, None]
        dist.all_gather_object(gathered, report)
        if rank == 0:
            print("CASE", json.dumps({"case": f"{family}-{schedule}-m{n_microbatches or n_micro}", "ranks": gathered}),
                  flush=True)
    leave_process_group()  # barrier first: a rank tearing gloo down alone can abort


if __name__ == "__main__":
    main()
