"""Pure array functions: the gated linear attention engine and exact window attention.

Notation for every shape in the package: B batch, T time, H heads, K key dim, V value dim,
W window, C chunk, D decay channels (K or 1).
"""

from dca_jax.ops.gla import gated_linear_attention
from dca_jax.ops.planner import EnginePlan, Mode, plan_engine
from dca_jax.ops.scan import combine_decayed_states
from dca_jax.ops.window import sliding_window_attention, window_softmax_parts

__all__ = ["EnginePlan", "Mode", "combine_decayed_states", "gated_linear_attention", "plan_engine",
           "sliding_window_attention", "window_softmax_parts"]
