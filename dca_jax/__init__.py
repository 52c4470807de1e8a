"""dca_jax: Dynamic Compression Attention in JAX/Flax.

O(n) training and O(1)-per-token decoding with exact softmax over a recent window and a
compressed, input-gated memory of everything older. Floors (imports point down only):

* `dca_jax.ops`: pure array functions (the gated linear attention engine in four forms, window
  attention, feature maps, rotary, and the DCA mechanism);
* `dca_jax.nn`: Flax NNX layers that own parameters and call the ops;
* `experiments/` (outside the package): configs, training, evaluation and benchmarks.

The glossary of the mechanism is re-exported here: `compute_weights`, `attention_compress`,
`memory_state_update` and `adaptive_scale`.
"""

from dca_jax.ops.dca import (
    DCAParams,
    DCAPlan,
    DCAState,
    DCAWeights,
    PlanKind,
    adaptive_scale,
    attention_compress,
    compute_weights,
    half_life_bias,
    init_params,
    init_state,
    memory_state_update,
)
from dca_jax.ops.gla import gated_linear_attention
from dca_jax.ops.planner import EnginePlan, Mode, plan_engine
from dca_jax.ops.window import sliding_window_attention

__version__ = "0.1.0"

__all__ = [
    "DCAParams", "DCAPlan", "DCAState", "DCAWeights", "EnginePlan", "Mode", "PlanKind",
    "adaptive_scale", "attention_compress", "compute_weights", "gated_linear_attention",
    "half_life_bias", "init_params", "init_state", "memory_state_update", "plan_engine",
    "sliding_window_attention",
]
