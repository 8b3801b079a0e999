"""Swap components of a recipe in code: the same edits the command line makes.

    python examples/swap_component.py
"""

from recipes.llama_pretrain import recipe
from registry import ATTENTION, NORM, validate
from registry.printing import config_tree

config = recipe.config("debug")

# Multi-query attention in every layer; keep each layer's own dim and head count.
for layer in config.model.layers:
    layer.attention = ATTENTION.config("gqa", dim=layer.attention.dim, n_heads=layer.attention.n_heads,
                                       n_kv_heads=1, position=layer.attention.position)
# LayerNorm without bias as the final norm.
config.model.norm = NORM.config("layernorm", dim=config.model.dim, bias=False)
config.steps = 20

validate(config)  # raises ConfigError listing every fault, with paths, before anything is built

if __name__ == "__main__":
    from rich import print

    print(config_tree(config.model, label="model"))
