"""Llama family: `builder` makes the config tree, `hf` maps parameter names to transformers'
LlamaForCausalLM."""
