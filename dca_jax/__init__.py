"""dca_jax: Dynamic Compression Attention in JAX/Flax."""

__version__ = "0.1.0"
