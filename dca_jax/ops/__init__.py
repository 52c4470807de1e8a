"""Pure array functions: the gated linear attention engine, exact softmax and window attention,
the short convolution, feature maps, rotary positions and the DCA mechanism.

Notation for every shape in the package: B batch, T time, H heads, K key dim, V value dim,
W window, C chunk, F features, D decay channels (K or 1) or model width (in layers).

Files, one idea each: `gla.py` (engine entry) with `scan.py` (recurrent, associative),
`chunked.py`, `quadratic.py` and `planner.py` (forms and plans); the gated delta rule, every form
in one file, in `delta_rule.py`; `window.py`, `softmax.py` and `blocked_softmax.py`,
`conv.py`, `feature_maps.py`, `rotary.py`, `segments.py`, `projection.py` (x W with a fast
weight gradient on CPU); DCA in `dca_params.py` (parameters, weights), `dca.py` (whole
sequence), `dca_decode.py` (one step), `dca_memory.py` (state, read-out, shard entry and exit)
and `dca_delta.py` (the delta-rule memory, memory="delta").
"""

from dca_jax.ops.blocked_softmax import blocked_causal_attention
from dca_jax.ops.conv import causal_short_conv
from dca_jax.ops.dca import attention_compress
from dca_jax.ops.dca_decode import memory_state_update
from dca_jax.ops.dca_delta import DCADeltaState, init_delta_state
from dca_jax.ops.dca_memory import DCAState, combine_memories, init_state
from dca_jax.ops.dca_params import (Combine, DCAParams, DCAWeights, DecayKind, MemoryKind,
                                    compute_weights, half_life_bias, init_params)
from dca_jax.ops.delta_rule import delta_rule_attention, l2_normalize
from dca_jax.ops.feature_maps import (FeatureMap, elu_features, feature_dim, feature_map,
                                      taylor_features)
from dca_jax.ops.gla import gated_linear_attention
from dca_jax.ops.planner import (DCAPlan, EnginePlan, Mode, PlanKind, adaptive_scale,
                                 engine_segment, plan_engine, segment_length)
from dca_jax.ops.projection import project
from dca_jax.ops.rotary import apply_rotary, rotary_frequencies
from dca_jax.ops.scan import combine_decayed_states
from dca_jax.ops.segments import document_ids
from dca_jax.ops.softmax import masked_attention
from dca_jax.ops.window import sliding_window_attention, window_softmax_parts

__all__ = [
    "Combine", "DCADeltaState", "DCAParams", "DCAPlan", "DCAState", "DCAWeights", "DecayKind",
    "EnginePlan", "FeatureMap", "MemoryKind", "Mode", "PlanKind", "adaptive_scale", "apply_rotary", "attention_compress",
    "blocked_causal_attention",
    "causal_short_conv", "combine_decayed_states", "combine_memories", "compute_weights",
    "delta_rule_attention", "document_ids", "elu_features", "engine_segment", "feature_dim",
    "feature_map",
    "gated_linear_attention",
    "half_life_bias", "init_delta_state", "init_params", "init_state", "l2_normalize", "masked_attention", "memory_state_update",
    "plan_engine", "project", "rotary_frequencies", "segment_length", "sliding_window_attention",
    "taylor_features",
    "window_softmax_parts",
]
