"""GPT-2 family: `builder` makes the config tree."""
