"""The short causal depthwise convolution over time that hands each token its neighbours."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dca_jax.ops.segments import document_ids


def causal_short_conv(x: jax.Array, kernel: jax.Array, reset: jax.Array | None = None,
                      history: jax.Array | None = None) -> jax.Array:
  """Depthwise causal convolution y_t = sum_i kernel[i] * x_{t - (S - 1) + i} over time.

  Args:
    x: [B, T, D].
    kernel: [S, D]; kernel[S - 1] weighs the current token.
    reset: optional bool [B, T]; a token never sees inputs from before its document's start.
    history: optional [B, S - 1, D], the inputs preceding x (zeros: none).

  Returns:
    [B, T, D] in x's dtype.

  Example:
    >>> import jax.numpy as jnp
    >>> x = jnp.arange(5.0).reshape(1, 5, 1)
    >>> causal_short_conv(x, jnp.array([[1.0], [1.0]]))[0, :, 0].tolist()
    [0.0, 1.0, 3.0, 5.0, 7.0]
  """
  size = kernel.shape[0]
  batch, time, _ = x.shape
  if history is None:
    history = jnp.zeros((batch, size - 1, x.shape[-1]), x.dtype)
  ext = jnp.concatenate([history.astype(x.dtype), x], axis=1)
  if reset is not None:
    doc = document_ids(reset)
    # The history continues document 0: a reset at the first token (doc 1) cuts it off.
    ext_doc = jnp.concatenate([jnp.zeros((batch, size - 1), jnp.int32), doc], axis=1)
  y = jnp.zeros_like(x)
  for i in range(size):
    term = ext[:, i:i + time] * kernel[i].astype(x.dtype)
    if reset is not None and i < size - 1:
      term = jnp.where((ext_doc[:, i:i + time] == doc)[..., None], term, 0)
    y = y + term
  return y
