"""Flax NNX layers: DCA and the baselines, all with one interface (see `_layer.py`).

    layer = Layer(d_model, num_heads, *, rngs, dtype=None, param_dtype=jnp.float32, **options)
    y = layer(x, reset=None)
    cache = layer.init_cache(batch_size, max_length)
    y, cache = layer.prefill(x, cache)
    y_t, cache = layer.decode_step(x_t, cache)
"""

from dca_jax.nn.dca import DCAttention
from dca_jax.nn.generation import generate, sample_logits
from dca_jax.nn.linear import GatedLinearAttention, LinearAttention
from dca_jax.nn.softmax import SoftmaxAttention
from dca_jax.nn.transformer import ATTENTION_TYPES, TransformerConfig, TransformerLM, count_params
from dca_jax.nn.window import SlidingWindowAttention

__all__ = ["ATTENTION_TYPES", "DCAttention", "GatedLinearAttention", "LinearAttention",
           "SlidingWindowAttention", "SoftmaxAttention", "TransformerConfig", "TransformerLM",
           "count_params", "generate", "sample_logits"]
