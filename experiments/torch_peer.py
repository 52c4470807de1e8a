"""PyTorch's CPU softmax attention layer: the external peer of the performance benchmark.

The layer a CPU user of PyTorch would pick instead of ours: a fused q/k/v `nn.Linear`, PyTorch's
`scaled_dot_product_attention(..., is_causal=True)` (on CPU a flash-attention kernel: blocked,
online softmax, nothing T x T stored) and an output `nn.Linear`, float32, with as many threads as
the machine has cores (the JAX layers it is compared with use them all too).

PyTorch is never a dependency of `dca_jax`: it comes with the optional benchmark extra,

    pip install -e ".[bench]"

and without it the benchmark records the peer as skipped, with the reason, and goes on.

The peer runs in a child process (`PeerProcess`): torch is never imported beside JAX. With both
loaded in one process, XLA's CPU compiler crashed with a segmentation fault in this project's test
suite (2026-12-02, a test_window compilation after a test had imported torch), so the parent only
sends "run fwd" / "run fwd+bwd" requests through a pipe, which keeps the peer in the same
round-robin rounds as the JAX layers (a request's overhead is tens of microseconds, the calls
take milliseconds to seconds).
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
from typing import Any, Callable

import numpy as np

NAME = "torch SDPA (CPU flash)"
CUDA_NAME = "torch SDPA (CUDA)"


def name(device: str = "cpu") -> str:
  """The peer's row label on `device` ("cpu" or "cuda")."""
  return CUDA_NAME if device == "cuda" else NAME


def available() -> str | None:
  """None when PyTorch can be imported, else why not (without importing it)."""
  if importlib.util.find_spec("torch") is None:
    return ("PyTorch is not installed; install the optional extra `pip install -e \".[bench]\"` "
            "to include this peer")
  return None


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
    device: "cpu", or "cuda" for the GPU check (experiments.gpu_check): there SDPA picks its
      CUDA kernel (in float32 the memory-efficient one; flash kernels want half precision).
  """

  def __init__(self, torch: Any, d_model: int, num_heads: int, seed: int = 0,
               threads: int | None = None, device: str = "cpu"):
    if device not in ("cpu", "cuda"):
      raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
      raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device.")
    self.torch = torch
    self.device = device
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    self.num_heads = num_heads
    self.qkv = torch.nn.Linear(d_model, 3 * d_model).to(device)
    self.out = torch.nn.Linear(d_model, d_model).to(device)
    self.parameters = list(self.qkv.parameters()) + list(self.out.parameters())

  def __call__(self, x: Any) -> Any:
    batch, time, d_model = x.shape
    heads = self.num_heads
    q, k, v = self.qkv(x).view(batch, time, 3, heads, d_model // heads).permute(2, 0, 3, 1, 4)
    o = self.torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    return self.out(o.transpose(1, 2).reshape(batch, time, d_model))

  def version(self) -> str:
    if self.device == "cuda":
      return f"torch {self.torch.__version__}, {self.torch.cuda.get_device_name()}"
    return f"torch {self.torch.__version__}, {self.torch.get_num_threads()} threads"

  def calls(self, x: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    """{"fwd": ..., "fwd+bwd": ...}: thunks over the input x [B, T, D] (float32 NumPy).

    fwd+bwd is sum(y^2) and its gradients with respect to the parameters and x, as in the JAX
    layers' benchmark. Each thunk returns the (finite?) loss or an output sample as NumPy.
    """
    torch = self.torch
    inputs = torch.from_numpy(np.array(x, np.float32)).to(self.device)  # a writable copy
    grad_inputs = inputs.clone().requires_grad_(True)

    def forward() -> np.ndarray:
      with torch.no_grad():
        y = self(inputs)
      return y[:, -1].cpu().numpy().copy()     # .cpu() waits for the device

    def forward_backward() -> np.ndarray:
      for p in self.parameters:
        p.grad = None
      grad_inputs.grad = None
      loss = torch.square(self(grad_inputs)).sum()
      loss.backward()
      return np.asarray([loss.item(), float(grad_inputs.grad.abs().sum())])

    return {"fwd": forward, "fwd+bwd": forward_backward}


def _serve(conn: Any, d_model: int, num_heads: int, threads: int | None, seed: int,
           device: str) -> None:
  """The child process: builds the layer, then answers requests until "stop"."""
  torch, why_not = load()
  if torch is None:
    conn.send(("error", why_not))
    return
  try:
    layer = TorchLayer(torch, d_model, num_heads, seed=seed, threads=threads, device=device)
  except (ValueError, RuntimeError) as error:
    conn.send(("error", str(error)))
    return
  conn.send(("ready", layer.version(), sum(p.numel() for p in layer.parameters)))
  calls = {}
  while True:
    message = conn.recv()
    if message[0] == "input":
      calls = layer.calls(message[1])
      conn.send("ok")
    elif message[0] == "run":
      conn.send(calls[message[1]]())
    elif message[0] == "weights":
      conn.send({key: p.detach().cpu().numpy().copy() for key, p in
                 (("qkv.weight", layer.qkv.weight), ("qkv.bias", layer.qkv.bias),
                  ("out.weight", layer.out.weight), ("out.bias", layer.out.bias))})
    else:
      return


class PeerProcess:
  """The torch layer in a child process (see the module docstring); use as a context manager.

  Attributes:
    version: "torch <version>, <n> threads".
    num_params: the layer's parameter count.
  """

  def __init__(self, d_model: int, num_heads: int, *, threads: int | None = None, seed: int = 0,
               device: str = "cpu"):
    context = multiprocessing.get_context("spawn")
    self._conn, child = context.Pipe()
    self._process = context.Process(
        target=_serve, args=(child, d_model, num_heads, threads, seed, device), daemon=True)
    self._process.start()
    reply = self._conn.recv()
    if reply[0] != "ready":
      self.close()
      raise RuntimeError(f"the torch peer did not start: {reply[1]}")
    self.version, self.num_params = reply[1], reply[2]

  def calls(self, x: np.ndarray) -> dict[str, Callable[[], np.ndarray]]:
    """As `TorchLayer.calls`, each thunk one request to the child."""
    self._conn.send(("input", np.array(x, np.float32)))
    self._conn.recv()

    def request(pass_name: str) -> Callable[[], np.ndarray]:
      def call() -> np.ndarray:
        self._conn.send(("run", pass_name))
        return np.asarray(self._conn.recv())
      return call

    return {"fwd": request("fwd"), "fwd+bwd": request("fwd+bwd")}

  def weights(self) -> dict[str, np.ndarray]:
    """The layer's parameters, as NumPy arrays (qkv.weight [3D, D], qkv.bias, out.weight, ...)."""
    self._conn.send(("weights",))
    return self._conn.recv()

  def close(self) -> None:
    if self._process.is_alive():
      try:
        self._conn.send(("stop",))
      except (BrokenPipeError, OSError):
        pass
      self._process.join(timeout=10)
    if self._process.is_alive():
      self._process.kill()

  def __enter__(self) -> "PeerProcess":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
