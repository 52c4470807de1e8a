"""Chooses how to compute gated linear attention: the form and the chunk size.

The rule is the outcome of `experiments/benchmark_engine.py` on this project's reference CPU
(see docs/engine_benchmark.md for the figures behind it):

* T <= `QUADRATIC_MAX_T`: the quadratic form. For a handful of tokens one masked matmul beats
  any scan (no loop overhead, no chunk bookkeeping).
* otherwise the chunked form with chunk size `CHUNK_SIZE[backend]`. On CPU it was faster than
  the token-level scan for the forward pass at every T measured above the quadratic range, and
  far faster with gradients (a scan stores one K x V state per token for the backward pass).
  The associative form over tokens is never chosen: it materialises every state and was the
  slowest everywhere on CPU.
* Per-channel decay on CPU: the recurrent form. The chunked form needs per-channel decay
  factors inside the chunk (sub-chunks computed in log space), which XLA's CPU backend runs
  slowly: at T = 8192 it measured ~15x slower than the token scan forward and only on par with
  it forward+backward. On GPU/TPU the chunked form is the standard choice (GLA's kernels).
* Single-token steps (decoding, T = 1 with a carried state) use the recurrent form.
"""

from __future__ import annotations

import dataclasses
import enum

import jax


class Mode(str, enum.Enum):
  """How `gated_linear_attention` evaluates the recurrence."""

  AUTO = "auto"
  RECURRENT = "recurrent"
  ASSOCIATIVE = "associative"
  CHUNKED = "chunked"
  QUADRATIC = "quadratic"

  @classmethod
  def parse(cls, value: "Mode | str") -> "Mode":
    try:
      return cls(value)
    except ValueError:
      choices = ", ".join(repr(m.value) for m in cls)
      raise ValueError(f"mode must be one of {choices}, got {value!r}.") from None


# Measured thresholds (docs/engine_benchmark.md); keyed by jax.default_backend().
QUADRATIC_MAX_T = 16
CHUNK_SIZE = {"cpu": 64, "gpu": 64, "tpu": 128}
DEFAULT_CHUNK_SIZE = 64


@dataclasses.dataclass(frozen=True)
class EnginePlan:
  """The form and chunk size chosen for one call.

  Attributes:
    mode: one of the concrete modes (never AUTO).
    chunk_size: chunk length for the chunked form, None for the other forms.
  """

  mode: Mode
  chunk_size: int | None = None


def plan_engine(sequence_length: int, key_dim: int, value_dim: int, *, backend: str | None = None,
                needs_grad: bool = False, decoding: bool = False,
                per_channel_decay: bool = False) -> EnginePlan:
  """Picks the mode and chunk size for a call of the engine.

  Args:
    sequence_length: T, number of tokens in the call.
    key_dim: K.
    value_dim: V.
    backend: "cpu", "gpu" or "tpu"; defaults to `jax.default_backend()`.
    needs_grad: whether the call will be differentiated. The rule is the same either way on the
      machines measured so far (chunked wins both), the argument is kept so that a backend where
      it differs can say so.
    decoding: True for a single-token step that continues a carried state.
    per_channel_decay: whether the log decay has one value per key channel ([B, T, H, K]) rather
      than one per head ([B, T, H]).

  Returns:
    An `EnginePlan`.

  Example:
    >>> plan_engine(8192, 64, 64, backend="cpu")
    EnginePlan(mode=<Mode.CHUNKED: 'chunked'>, chunk_size=64)
  """
  del key_dim, value_dim, needs_grad  # Not (yet) decisive on any measured backend.
  if sequence_length < 1:
    raise ValueError(f"sequence_length must be >= 1, got {sequence_length}.")
  if decoding and sequence_length == 1:
    return EnginePlan(Mode.RECURRENT)
  if sequence_length <= QUADRATIC_MAX_T:
    return EnginePlan(Mode.QUADRATIC)
  backend = backend or jax.default_backend()
  if per_channel_decay and backend == "cpu":
    return EnginePlan(Mode.RECURRENT)
  chunk = CHUNK_SIZE.get(backend, DEFAULT_CHUNK_SIZE)
  return EnginePlan(Mode.CHUNKED, chunk)
