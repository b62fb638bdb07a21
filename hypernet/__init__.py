"""LoraCast's hypernetworks: text (a task description) in, LoRA adapters out."""
