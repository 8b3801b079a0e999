"""DeepSeek family (DeepSeekMoE 16B, V2, V3): `builder` makes the config tree, `hf` converts to and
from transformers' DeepseekV3 checkpoints."""
