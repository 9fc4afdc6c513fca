"""Domain layers: LoRA (attention, shared and routed experts), term-embedding extensions, the adapter format."""
