"""dca_jax: Dynamic Compression Attention in JAX/Flax.

O(n) training and O(1)-per-token decoding with exact softmax over a recent window and a
compressed, input-gated memory of everything older. Floors (imports point down only):

* `dca_jax.ops`: pure array functions (the gated linear attention engine in four forms, window
  and masked softmax attention, the short convolution, feature maps, rotary, and the DCA
  mechanism);
* `dca_jax.nn`: Flax NNX layers that own parameters and call the ops, the layer registry, the
  language model and generation;
* `experiments/` (outside the package): configs, training, evaluation and benchmarks.

Everything a user needs from `ops` is re-exported here, beginning with the glossary of the
mechanism: `compute_weights`, `attention_compress`, `memory_state_update` and `adaptive_scale`.
Layers and models are in `dca_jax.nn`; `dca_jax.flops` counts FLOPs of jaxprs.
"""

from dca_jax.ops import *  # noqa: F401,F403  (the public names of the ops floor)
from dca_jax.ops import __all__ as _ops_all

__version__ = "0.1.0"

__all__ = list(_ops_all)
