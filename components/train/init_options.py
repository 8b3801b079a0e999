"""Where a run's initial weights come from (`init=` on the command line).

By default the parallel plan initialises the model as one process would. `from_hf` names a
transformers checkpoint folder instead (continued pretraining): after the plan lays the model
out and materialises it, every process reads its own shard of each weight from the folder's
safetensors files (`tessera.components.families.hf_weights`). The model itself must be the
checkpoint's: `--from-hf PATH` on the command line sets `model`, the data's tokenizer and this
field together (see `tessera.cli.from_hf`). A resumed run takes its weights from its own
checkpoint, not from here.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True, kw_only=True)
class InitOptions:
    """Args:
        from_hf: a transformers checkpoint folder (config.json + *.safetensors) whose weights
            replace the initialisation; None: initialise as the model's `init_weights` says.
    """

    from_hf: str | None = None
