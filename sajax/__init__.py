"""sajax: Stable Alignment in JAX — a sharded Flax LLaMA with HF parity, generation and HF checkpoint I/O."""

from sajax.config import Llama3RopeScaling, LlamaConfig

__all__ = ["LlamaConfig", "Llama3RopeScaling"]
__version__ = "0.1.0"
