"""The short causal depthwise convolution over time that hands each token its neighbours.

One op with a hand-written backward pass (`jax.custom_vjp`). The gradient autodiff derives for the
kernel is one multiply-reduce over time per tap, which XLA's CPU backend (jax 0.10.2) runs as a
slow strided reduction: in XLA's per-op profile of the DCA layer's forward+backward at T = 8192
(2026-12-02) it was the largest single cost. Written as a contraction over time
(`einsum("btd,btd->d")`), the same gradient is a dot (`python -m experiments.performance`
measures the layer that uses it).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dca_jax.ops.segments import document_ids


@jax.custom_vjp
def _conv(ext, kernel, keep):
  """y_t = sum_i [keep_i(t)] kernel[i] * ext[t + i]  (keep None: every term kept).

  ext [B, T + width - 1, D] (history then inputs), kernel [width, D], keep None or bool
  [width - 1, B, T] (tap width - 1, the token itself, is always kept).
  """
  size = kernel.shape[0]
  time = ext.shape[1] - size + 1
  y = ext[:, size - 1:] * kernel[size - 1]
  for i in range(size - 1):
    term = ext[:, i:i + time] * kernel[i]
    y = y + (term if keep is None else jnp.where(keep[i][..., None], term, 0))
  return y


def _conv_fwd(ext, kernel, keep):
  return _conv(ext, kernel, keep), (ext, kernel, keep)


def _conv_bwd(res, grad):
  ext, kernel, keep = res
  size = kernel.shape[0]
  time = grad.shape[1]
  d_ext = jnp.zeros_like(ext)
  d_kernel = []
  for i in range(size):
    g = grad if keep is None or i == size - 1 else jnp.where(keep[i][..., None], grad, 0)
    d_ext = d_ext.at[:, i:i + time].add(g * kernel[i])
    d_kernel.append(jnp.einsum("btd,btd->d", ext[:, i:i + time], g))
  return d_ext, jnp.stack(d_kernel).astype(kernel.dtype), None


_conv.defvjp(_conv_fwd, _conv_bwd)


def causal_short_conv(x: jax.Array, kernel: jax.Array, reset: jax.Array | None = None,
                      history: jax.Array | None = None) -> jax.Array:
  """Depthwise causal convolution y_t = sum_i kernel[i] * x_{t - (width - 1) + i} over time.

  Args:
    x: [B, T, D].
    kernel: [width, D], one row per tap; kernel[width - 1] weighs the current token.
    reset: optional bool [B, T]; a token never sees inputs from before its document's start.
    history: optional [B, width - 1, D], the inputs preceding x (zeros: none).

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
  keep = None
  if reset is not None and size > 1:
    doc = document_ids(reset)
    # The history continues document 0: a reset at the first token (doc 1) cuts it off.
    ext_doc = jnp.concatenate([jnp.zeros((batch, size - 1), jnp.int32), doc], axis=1)
    keep = jnp.stack([ext_doc[:, i:i + time] == doc for i in range(size - 1)])
  return _conv(ext, kernel.astype(x.dtype), keep)
