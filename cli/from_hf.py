"""`--from-hf PATH`: continue pretraining a released transformers checkpoint.

Applied to the preset's config before the command line's overrides, it sets three things
together and leaves the rest of the recipe (optimizer, schedule, parallel plan, precision,
data sources) as it is:

- `model`: the checkpoint's architecture, from its config.json (Llama, GPT-2, DeepSeek-V2/V3
  layouts; a DeepSeek model without its MTP modules);
- `init.from_hf`: its weights, read shard by shard once the parallel plan laid the model out;
- `data.encoding_name="hf:PATH"` and `data.vocab_size`: its own tokenizer.json (converted
  exactly to tiktoken, or refused with what it has that cannot be).

Each problem is a config fault naming `--from-hf` and the fix (exit status 2, no traceback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import fiddle as fdl

from tessera.registry.errors import ConfigError, Fault


def apply_from_hf(config: Any, path: str) -> list[str]:
    """Point `config` (a train run's root config) at the checkpoint folder `path`; returns the
    notes to show. ConfigError naming what is missing or unsupported."""
    from tessera.components.families import hf_checkpoint
    from tessera.components.families.hf_weights import weight_files
    from tessera.components.train.init_options import InitOptions

    folder = str(Path(path).resolve())
    try:
        hf = hf_checkpoint.read_config(folder)
        model = hf_checkpoint.config_from_hf(hf)
        weight_files(folder)
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError([Fault("--from-hf", str(error), "give the folder of a LlamaForCausalLM, "
                                 "GPT2LMHeadModel or DeepseekV2/V3ForCausalLM checkpoint")]) from None
    config.model = model
    config.init = fdl.Config(InitOptions, from_hf=folder)
    notes = [f"model: {(hf.get('architectures') or [hf['model_type']])[0]} from {folder} "
             f"(config.json: {hf.get('num_hidden_layers', hf.get('n_layer'))} layers, vocab {hf['vocab_size']})"]
    return notes + _use_tokenizer(config, folder, model_vocab=hf["vocab_size"])


def _use_tokenizer(config: Any, folder: str, *, model_vocab: int) -> list[str]:
    """Set the data pipeline's tokenizer to the checkpoint's tokenizer.json."""
    from tessera.components.data.hf_tokenizer import PREFIX, UnsupportedTokenizer, hf_encoding
    from tessera.components.data.pipeline import TextPipeline

    data = config.__arguments__.get("data")
    if not isinstance(data, fdl.Buildable) or not issubclass(fdl.get_callable(data), TextPipeline):
        raise ConfigError([Fault("data", "--from-hf tokenizes the data with the checkpoint's tokenizer, which only "
                                 "a TextPipeline takes", "use data=TextPipeline(...) (the recipes' default)")])
    try:
        encoding = hf_encoding(folder)
    except (FileNotFoundError, UnsupportedTokenizer) as error:
        raise ConfigError([Fault("--from-hf", str(error), "use a checkpoint whose folder holds a byte-level BPE "
                                 "tokenizer.json")]) from None
    if encoding.n_vocab > model_vocab:
        raise ConfigError([Fault("--from-hf", f"tokenizer.json has {encoding.n_vocab} ids but the model only "
                                 f"{model_vocab}", "use the tokenizer saved with this checkpoint")])
    data.encoding_name = PREFIX + folder
    data.vocab_size = encoding.n_vocab
    return [f"data: tokenized with {folder}/tokenizer.json ({encoding.n_vocab} ids, end of document "
            f"{encoding.eos!r} = {encoding.eot_token})"]
