"""An example tessera plugin: cosine-similarity attention, registered as ATTENTION "cosine_attention".

    pip install -e examples/custom_plugin
    python recipes/llama_pretrain.py --help                  # lists cosine_attention under ATTENTION
    python recipes/llama_pretrain.py 'model.layers[*].attention=@cosine_attention' steps=50

tessera imports this package (named in pyproject.toml's `tessera.components` entry points)
the first time a registry is consulted; importing it runs the `@ATTENTION.register` below.
"""

from tessera_cosine_attention.attention import CosineAttention

__all__ = ["CosineAttention"]
