"""Flax NNX layers: DCA and the baselines (softmax, sliding window, linear, GLA, Gated
DeltaNet), all with one interface (see `_layer.py`).

    layer = Layer(d_model, num_heads, *, rngs, dtype=None, param_dtype=jnp.float32, **options)
    y = layer(x, reset=None)
    cache = layer.init_cache(batch_size, max_length)
    y, cache = layer.prefill(x, cache)
    y_t, cache = layer.decode_step(x_t, cache)

`LAYERS` (name -> `LayerSpec`: class and typed options) is the one list of them.
"""

from dca_jax.nn._layer import AttentionLayer, ConvCache
from dca_jax.nn.dca import DCAConvCache, DCAttention
from dca_jax.nn.deltanet import GatedDeltaNet
from dca_jax.nn.generation import generate, sample_logits
from dca_jax.nn.linear import GatedLinearAttention, LinearAttention, RecurrentCache
from dca_jax.nn.registry import (ATTENTION_TYPES, LAYERS, NO_WEIGHT_DECAY, LayerOptions, LayerSpec,
                                 layer_spec)
from dca_jax.nn.softmax import KVCache, SoftmaxAttention
from dca_jax.nn.transformer import Block, SwiGLU, TransformerConfig, TransformerLM, count_params
from dca_jax.nn.window import SlidingWindowAttention, WindowCache

__all__ = ["ATTENTION_TYPES", "AttentionLayer", "Block", "ConvCache", "DCAConvCache", "DCAttention",
           "GatedDeltaNet", "GatedLinearAttention", "KVCache", "LAYERS", "LayerOptions", "LayerSpec", "NO_WEIGHT_DECAY",
           "LinearAttention", "RecurrentCache", "SlidingWindowAttention", "SoftmaxAttention",
           "SwiGLU", "TransformerConfig", "TransformerLM", "WindowCache", "count_params",
           "generate", "layer_spec", "sample_logits"]
