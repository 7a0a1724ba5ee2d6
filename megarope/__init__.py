"""megarope: RoPE-base scaling laws, continued training and long-context evaluation on megatron-core."""

__version__ = "0.1.0"
