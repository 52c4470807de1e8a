"""PyTorch's CPU softmax attention layer: the external peer of the performance benchmark.

The layer a CPU user of PyTorch would pick instead of ours: a fused q/k/v `nn.Linear`, PyTorch's
`scaled_dot_product_attention(..., is_causal=True)` (on CPU a flash-attention kernel: blocked,
online softmax, nothing T x T stored) and an output `nn.Linear`, float32, with as many threads as
the machine has cores (the JAX layers it is compared with use them all too).

PyTorch is never a dependency of `dca_jax`: it comes with the optional benchmark extra,

    pip install -e ".[bench]"

and without it the benchmark records the peer as skipped, with the reason, and goes on.
"""

from __future__ import annotations

import os
from typing import Any, Callable

import numpy as np

NAME = "torch SDPA (CPU flash)"


def load() -> tuple[Any, str | None]:
  """(the torch module, None), or (None, why it is unavailable)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as error:
    return None, (f"PyTorch is not installed ({error}); install the optional extra "
                  "`pip install -e \".[bench]\"` to include this peer")
  return torch, None


class TorchLayer:
  """One causal softmax attention layer in PyTorch (d_model, heads), batch-first [B, T, D].

  Args:
    torch: the torch module (from `load`).
    d_model: D.
    num_heads: H (head dim D / H).
    seed: parameter initialisation seed.
    threads: intra-op threads (default: the machine's cores).
  """

  def __init__(self, torch: Any, d_model: int, num_heads: int, seed: int = 0,
               threads: int | None = None):
    self.torch = torch
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    self.num_heads = num_heads
    self.qkv = torch.nn.Linear(d_model, 3 * d_model)
    self.out = torch.nn.Linear(d_model, d_model)
    self.parameters = list(self.qkv.parameters()) + list(self.out.parameters())

  def __call__(self, x: Any) -> Any:
    batch, time, d_model = x.shape
    heads = self.num_heads
    q, k, v = self.qkv(x).view(batch, time, 3, heads, d_model // heads).permute(2, 0, 3, 1, 4)
    o = self.torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.out(o.transpose(1, 2).reshape(batch, time, d_model))

  def version(self) -> str:
    return f"torch {self.torch.__version__}, {self.torch.get_num_threads()} threads"

  def calls(self, x: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    """{"fwd": ..., "fwd+bwd": ...}: thunks over the input x [B, T, D] (float32 NumPy).

    fwd+bwd is sum(y^2) and its gradients with respect to the parameters and x, as in the JAX
    layers' benchmark. Each thunk returns the (finite?) loss or an output sample as NumPy.
    """
    torch = self.torch
    inputs = torch.from_numpy(np.array(x, np.float32))        # a writable copy
    grad_inputs = inputs.clone().requires_grad_(True)

    def forward() -> np.ndarray:
      with torch.no_grad():
        y = self(inputs)
      return y[:, -1].numpy().copy()

    def forward_backward() -> np.ndarray:
      for p in self.parameters:
        p.grad = None
      grad_inputs.grad = None
      loss = torch.square(self(grad_inputs)).sum()
      loss.backward()
      return np.asarray([loss.item(), float(grad_inputs.grad.abs().sum())])

    return {"fwd": forward, "fwd+bwd": forward_backward}
