"""Run metrics: JSONL and TensorBoard logs, MFU, MoE load balance, a closing summary with an
energy estimate, and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from tessera.components.evaluate import cloze
from tessera.components.evaluate.downstream import LM_EVAL_PREFIX
from tessera.components.precision.probe import matmul_flops
from tessera.components.train.profiling import valid_steps
from tessera.registry.invariants import invariant


@invariant("downstream names known tasks", lambda downstream: all(map(known_task, task_names(downstream))),
           fix="name heldout_cloze, an existing .jsonl task file, or lm_eval:<task> "
               "(e.g. metrics.downstream=heldout_cloze)")
@invariant("profile is START:STOP (1 <= START <= STOP)", lambda profile: valid_steps(profile),
           fix="write metrics.profile=3:5 to profile steps 3 to 5 (counted from 1), or leave it unset")
@invariant("eval_every >= 0 and device_watts > 0",
           lambda eval_every, device_watts: eval_every >= 0 and device_watts > 0,
           fix="use eval_every >= 0 (0: only at the end) and a positive device power")
class Metrics:
    """Where and how a run reports.

    Args:
        folder: run folder for `metrics.jsonl`, TensorBoard events, `summary.json` and plots.
        tensorboard: also write TensorBoard scalars. wandb_project: also log to W&B when the
            `wandb` package is installed (ignored with a note otherwise).
        eval_every: validation loss and bits-per-byte every this many steps (0: at the end only).
        downstream: multiple-choice tasks whose accuracy (`<task>_acc`) is logged with every
            validation: `heldout_cloze` (built from the run's held-out documents), a .jsonl
            task file, or `lm_eval:NAME` (see `tessera.components.evaluate.downstream`); one
            name or a comma-separated string is accepted too. None: none.
        peak_flops: the FLOP/s MFU is relative to; None takes this machine's matmul peak in
            the run's compute dtype from a time-boxed probe, cached per machine.
        device_watts: power drawn while training (CPU package or accelerator board), for the
            energy estimate; price_per_kwh adds a cost line when given.
        plots: write `loss.png`, `lr.png` and, for MoE models, `expert_load.png`.
        profile: "START:STOP" profiles those steps (from 1, both included) into a Chrome /
            Perfetto trace in `folder`, and on CUDA a memory snapshot
            (`tessera.components.train.profiling`); None: off.
    """

    def __init__(self, *, folder: str = "runs/latest", tensorboard: bool = True, wandb_project: str | None = None,
                 eval_every: int = 0, downstream: str | list[str] | None = None, peak_flops: float | None = None,
                 device_watts: float = 65.0, price_per_kwh: float | None = None, plots: bool = True,
                 profile: str | int | None = None):
        self.folder = Path(folder)
        self.tensorboard = tensorboard
        self.wandb_project = wandb_project
        self.eval_every = eval_every
        self.downstream = task_names(downstream)
        self.peak_flops = peak_flops
        self.device_watts = device_watts
        self.price_per_kwh = price_per_kwh
        self.plots = plots
        self.profile = profile
        self.rows: list[dict[str, Any]] = []
        self.devices = 1
        self.moe_layers: list[int] = []
        self._writer = None
        self._wandb = None

    def start(self, *, dtype: torch.dtype, device: str = "cpu", resume: bool = False, devices: int = 1,
              moe_layers: list[int] | None = None) -> None:
        """Open the logs (appending to an existing `metrics.jsonl` when the run resumes);
        `devices`: how many devices the run trains on (the energy estimate counts each);
        `moe_layers`: the layer index of each MoE layer, in the order of the logged expert loads
        (an MTP module counts as the layer after the last; see `moe_layer_indices`)."""
        self.devices = devices
        self.moe_layers = list(moe_layers or [])
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / "metrics.jsonl"
        if resume and log.exists():
            self.rows = [json.loads(line) for line in log.read_text().splitlines() if line]
        else:
            log.write_text("")
        if self.peak_flops is None:
            self.peak_flops = matmul_flops(dtype, device=device)
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.folder / "tensorboard"))
        if self.wandb_project:
            try:
                import wandb

                self._wandb = wandb.init(project=self.wandb_project, dir=str(self.folder))
            except Exception as err:  # noqa: BLE001 - W&B is optional; the run goes on without it
                Console(stderr=True).print(f"note: W&B logging is off ({type(err).__name__}: {err})", markup=False)

    def log(self, step: int, values: dict[str, Any]) -> None:
        row = {"step": step, **{k: v for k, v in values.items() if v is not None}}
        self.rows.append(row)
        with open(self.folder / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        for key, value in row.items():
            if isinstance(value, (int, float)) and key != "step":
                if self._writer is not None:
                    self._writer.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(row, step=step)

    def finish(self, *, seconds: float, tokens: int, extra: dict[str, Any], console: Console | None) -> dict[str, Any]:
        """Write `summary.json` (and plots); print the summary table; return the summary."""
        kwh = self.device_watts * self.devices * seconds / 3.6e6
        summary = {"seconds": seconds, "tokens": tokens, "tokens_per_second": tokens / max(seconds, 1e-9),
                   "energy_kwh": kwh, "device_watts": self.device_watts, "devices": self.devices, **extra}
        if self.moe_layers:
            summary["moe_layers"] = self.moe_layers
        if self.price_per_kwh is not None:
            summary["energy_cost"] = kwh * self.price_per_kwh
        (self.folder / "summary.json").write_text(json.dumps(summary, indent=2))
        if self._writer is not None:
            self._writer.close()
        if self._wandb is not None:
            self._wandb.finish()
        if self.plots:
            self._plot()
        if console is not None:
            table = Table(title=f"run summary ({self.folder})")
            table.add_column("quantity")
            table.add_column("value", justify="right")
            for key, value in summary.items():
                table.add_row(key, f"{value:,.4g}" if isinstance(value, float) else str(value))
            console.print(table)
        return summary

    def _plot(self) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [r["step"] for r in self.rows]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot(steps, [r.get("loss") for r in self.rows], label="train")
        val = [(r["step"], r["val_loss"]) for r in self.rows if "val_loss" in r]
        if val:
            ax.plot(*zip(*val), "o-", label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.legend()
        fig.savefig(self.folder / "loss.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.plot(steps, [r.get("lr") for r in self.rows])
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        fig.savefig(self.folder / "lr.png", dpi=100, bbox_inches="tight")
        plt.close(fig)
        loads = [r["expert_load"] for r in self.rows if "expert_load" in r]
        if loads:
            # rows labelled by layer index when the loads cover every MoE layer (positions otherwise)
            labels = self.moe_layers if len(self.moe_layers) == len(loads[0]) else list(range(len(loads[0])))
            fig = expert_load_figure(loads, labels)
            fig.savefig(self.folder / "expert_load.png", dpi=100, bbox_inches="tight")
            plt.close(fig)


def task_names(downstream: str | list[str] | None) -> tuple[str, ...]:
    """`Metrics.downstream` as a tuple of task names ("a,b" and ["a", "b"] alike)."""
    if downstream is None:
        return ()
    names = downstream.split(",") if isinstance(downstream, str) else list(downstream)
    return tuple(name.strip() for name in names if name.strip())


def known_task(name: str) -> bool:
    """Whether `name` can be a downstream task: the built-in one, lm-eval's (checked when it
    loads), or a task file that exists."""
    return name == cloze.NAME or name.startswith(LM_EVAL_PREFIX) or (name.endswith(".jsonl") and Path(name).is_file())


def layer_order(name: str) -> tuple[tuple[int, int, str], ...]:
    """Sort key of a module name in a decoder's layer order: main layers (`layers.<i>...`)
    by index, then the MTP modules (`mtp.<k>...`) by depth, then anything else; numbered
    parts compare as numbers (`layers.10` after `layers.9`). The order expert loads are
    logged in, whichever processes hold the layers."""
    parts = name.split(".")
    top = {"layers": 0, "mtp": 1}.get(parts[0], 2)
    return ((top, 0, ""), *((0, int(p), "") if p.isdigit() else (1, 0, p) for p in parts))


def moe_layer_indices(model: torch.nn.Module, router_type: type) -> list[int]:
    """The layer index of every `router_type` module (e.g. `ReportsExpertLoad`) of a decoder,
    in `layer_order` (the order `report.expert_load` logs their loads in): i for `layers.i`,
    and n_layers + k for MTP module k (the index DeepSeek checkpoints give it). Count them on
    the whole model, before a pipeline plan keeps only some layers on each process."""
    n_layers = len(getattr(model, "layers", []))
    names = sorted((name for name, module in model.named_modules() if isinstance(module, router_type)),
                   key=layer_order)
    indices = []
    for name in names:
        parts = name.split(".")
        indices.append(int(parts[1]) + (n_layers if parts[0] == "mtp" else 0))
    return indices


def expert_load_figure(loads: list[list[list[float]]], layers: list[int]):
    """Heat map of each MoE layer's mean share of routed tokens per expert; `loads`: per logged
    step, per layer, per expert token counts; rows are labelled with the real `layers` indices."""
    import matplotlib.pyplot as plt

    layer_means = torch.tensor(loads, dtype=torch.float32).mean(0)  # [layers, experts]
    fig, ax = plt.subplots(figsize=(7, 3))
    image = ax.imshow((layer_means / layer_means.sum(-1, keepdim=True)).numpy(), aspect="auto", cmap="viridis")
    ax.set_xlabel("expert")
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), labels=[str(i) for i in layers])
    ax.xaxis.get_major_locator().set_params(integer=True)
    fig.colorbar(image, label="share of routed tokens")
    return fig
