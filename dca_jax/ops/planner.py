"""Chooses how to compute gated linear attention: the form and the chunk size.

The rule is the outcome of `experiments/benchmark_engine.py` on this project's reference CPU
(2 cores; docs/engine_benchmark.md has the figures, including its planner sweep):

* Forward only (inference, prefill) on CPU: the recurrent form. Its `lax.scan` over tokens was
  the fastest forward, or tied with the chunked form, at every T measured from 8 to 2^20
  tokens. On the 2-core AMD EPYC of 2026-11-28 it was 3-5x faster; on the 2-core Intel Xeon
  (AVX-512) of 2026-12-04, with the chunked form's later changes, the chunked forward took
  0.99-1.20x the scan's time (docs/engine_benchmark.md, 17:31 UTC): the choice stands, the
  margin is gone.
* With gradients: the quadratic form up to T = `QUADRATIC_MAX_T` = 96 (one masked matmul), the
  chunked form with C = min(64, T) above. The sweep of 2026-11-28 (AMD) had the quadratic form
  fastest up to T = 128; on the Intel Xeon of 2026-12-04 it was 1.32x slower than chunks of 64
  at T = 128 and within 1.06x of the fastest at T = 96, where chunks of 64 were 1.23x slower
  (`python -m experiments.planner_check --lengths 64,96,128,192 --rounds 3`, medians of three
  rounds, docs/planner_check.json). The chunked form is 12.7x faster than autodiff through the
  token scan at T = 8192 on 2026-12-04 (which stores one K x V state per token).
* Per-channel decay on CPU: the recurrent form forward, and with gradients above
  T = `PER_CHANNEL_SCAN_MAX_T` the chunked form (its intra-chunk scores by recursive halving,
  chunked.py). Measured again on 2026-12-02 with that form (`python -m experiments.performance
  --quick`, K = V = 64): chunked fwd+bwd 4.3 ms against 59 ms through the token scan at
  T = 256, 25 ms against 232 ms at T = 1024; docs/performance.md has the GatedLinearAttention
  layer, which this rule had sent through the scan. Up to T = 128 the scan stays (its gradient
  is cheap there, it compiles in half the time, and the quadratic form would build a [T, T, K]
  decay tensor).
* GPU/TPU: the chunked form, the standard choice of GLA's and Mamba-2's kernels, with the
  quadratic form for tiny T. Measured on an NVIDIA H200 on 2026-12-04 (docs/gpu.md,
  `python -m experiments.gpu_check`): the pick was within 1.02x of the fastest form at every T
  from 64 to 4096, forward and forward+backward; there the recurrent form's token scan was
  77-307x slower than the chunked form from T = 1024 (a kernel launch per token). TPU: not
  measured.
* The associative form over tokens is never chosen: it materialises every state and was the
  slowest form everywhere on CPU.
* Single-token steps (decoding) use the recurrent form.
* On CPU from T = 8192 the chunked form runs as a checkpointed scan over segments of 1024
  tokens (`engine_segment`; measurements at `ENGINE_SEGMENT`): XLA's temporary memory of
  forward+backward falls by 1.9-2.7x; the forward's time falls by 8 % (8192) to a third (32768,
  65536), the forward+backward's stays within the noise (8192) or falls (32768, 65536).

`adaptive_scale` plans a whole DCA call on top of it (exact softmax, compressed, or one step);
`delta_rule_plans` is the same choice for the delta rule (the delta memory's engine). A DCA call
plans once, with `adaptive_scale`, and passes the plan down.

`gated_linear_attention(mode="auto")` asks this planner twice, for the forward-only and the
differentiated case, and uses the first when the call is evaluated and the second when it is
differentiated (a `jax.custom_vjp`), so one call site gets the fast form for both.
"""

from __future__ import annotations

import dataclasses
import enum

import jax

from dca_jax.ops import _checks


class Mode(str, enum.Enum):
  """How `gated_linear_attention` evaluates the recurrence."""

  AUTO = "auto"
  RECURRENT = "recurrent"
  ASSOCIATIVE = "associative"
  CHUNKED = "chunked"
  QUADRATIC = "quadratic"

  @classmethod
  def parse(cls, value: "Mode | str") -> "Mode":
    return _checks.parse_choice(cls, value, "mode")


# Measured thresholds (docs/engine_benchmark.md); keyed by jax.default_backend().
QUADRATIC_MAX_T = 96
# Per-channel decays with gradients take the token scan up to this T (see the docstring).
PER_CHANNEL_SCAN_MAX_T = 128
CHUNK_SIZE = {"cpu": 64, "gpu": 64, "tpu": 128}
DEFAULT_CHUNK_SIZE = 64
BACKENDS = ("cpu", "gpu", "tpu")


def _checked_backend(backend: str | None) -> str:
  """`backend`, or the default backend when None; ValueError naming it when unknown."""
  backend = backend or jax.default_backend()
  if backend not in BACKENDS:
    raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}.")
  return backend


def _from_length(table: dict[str, int], min_length: int, sequence_length: int,
                 backend: str) -> int | None:
  """table[backend] from T = min_length on, else None (no entry: None)."""
  value = table.get(backend)
  return None if value is None or sequence_length < min_length else value


# Long sequences through a layer in segments (`segment_length`), keyed by backend: the segment
# length and the T from which "auto" uses it. No backend has an entry today: "auto" keeps one
# pass everywhere, and an integer `segment_length` remains the choice that bounds a long call's
# memory.
# Forward+backward of one layer (B = 1, d_model 256, 4 heads) as one call against a scan of
# 1024-token segments continuing the cache, medians of interleaved repeats on the 2-core Xeon
# (`python -m experiments.segment_study --lengths 8192,16384,32768 --segments none,1024 --out
# docs/segment_study.json`, 2026-12-05 15:23 UTC, and `--layers dca,window,gla --lengths 65536
# --repeats 3`, docs/segment_study_65536.json): one pass was faster at every T for every layer,
# DCA 211 / 249 ms at 8192, 432 / 506 at 16384, 986 / 998 at 32768 and 1930 / 2050 at 65536;
# at 32768 GLA 737 / 837, the sliding window 596 / 666, Gated DeltaNet 1043 / 1147, linear
# attention 554 / 641 ms. On the 2-core AMD EPYC of 2026-12-04 segments had been faster from
# T = 16384 (DCA 978 / 907 ms at 16384, 2457 / 1847 at 32768), before the engine's chunked form
# ran long passes in checkpointed segments of its own (`engine_segment`); that this is why layer
# segments no longer pay is likely but not isolated (the machines differ too).
SEGMENT_LENGTH: dict[str, int] = {}
SEGMENT_MIN_T = 16384


def segment_length(sequence_length: int, *, window: int, backend: str | None = None
                   ) -> int | None:
  """How many tokens a layer with a constant-size cache processes at a time in a whole-sequence
  call, or None (all at once).

  Such a layer over T tokens can run as a `jax.lax.scan` over segments of L_seg tokens, each
  continuing the previous one's cache (its `prefill`; `AttentionLayer._segmented`): the same
  function (the tests check outputs, and DCA's gradients), with one segment's intermediates live
  at a time. A backend listed in `SEGMENT_LENGTH` segments from T = `SEGMENT_MIN_T`; none is
  listed today: one pass measured faster on CPU up to T = 65536 (the measurements above), and
  GPUs and TPUs want the parallel whole-sequence pass.

  Args:
    sequence_length: T.
    window: W; a segment is never shorter than it.
    backend: "cpu", "gpu" or "tpu"; defaults to `jax.default_backend()`.

  Returns:
    L_seg, the segment length, or None for one pass over the whole sequence.

  Raises:
    ValueError: sequence_length or window not an integer >= 1, or an unknown backend.

  Example:
    >>> segment_length(32768, window=64, backend="cpu") is None
    True
  """
  _checks.check_positive_int("sequence_length", sequence_length)
  _checks.check_positive_int("window", window)
  backend = _checked_backend(backend)
  segment = _from_length(SEGMENT_LENGTH, SEGMENT_MIN_T, sequence_length, backend)
  return None if segment is None else max(segment, window)


@dataclasses.dataclass(frozen=True)
class EnginePlan:
  """The form and chunk size chosen for one call.

  Attributes:
    mode: one of the concrete modes (never AUTO).
    chunk_size: chunk length for the chunked form, None for the other forms.
    segment_size: for the chunked form, how many tokens one checkpointed pass covers (a
      `jax.lax.scan` over segments carrying the state; `chunked.chunked`), or None for one pass
      over the whole sequence. `engine_segment` chooses it.
  """

  mode: Mode
  chunk_size: int | None = None
  segment_size: int | None = None


# The chunked form's passes over long sequences, keyed by backend (`engine_segment`). Engine
# alone (`chunked.chunked`, per-head decay, B = 1, H = 4, K = V = 64, C = 64): one pass against
# segments of 1024 tokens, forward / forward+backward / XLA temp memory of forward+backward,
# medians of 5 interleaved repeats on the 2-core Xeon (`python -m experiments.segment_study
# --engine --segments none,1024 --out docs/segment_study_engine.json`, 2026-12-05 15:22 UTC):
#   T = 4096:  8.8 / 25 ms / 24 MiB      against 9.4 / 26 ms / 25 MiB
#   T = 8192:  25.9 / 62 ms / 72 MiB     against 23.7 / 61 ms / 37 MiB
#   T = 32768: 164 / 339 ms / 283 MiB    against 112 / 255 ms / 111 MiB
#   T = 65536: 330 / 699 ms / 569 MiB    against 230 / 517 ms / 209 MiB
# (the recurrent form's forward: 8.6, 19.2, 96.2, 197 ms). A run of 2026-12-04 15:06 UTC
# (printed, not recorded) found segments of 512 and 2048 slower than of 1024 at 32768 and 65536.
# Segments from T = 8192, where the forward gains from 8 % (8192) to a third (32768);
# elsewhere the parallel whole-sequence pass (GPUs and TPUs want the parallelism).
ENGINE_SEGMENT = {"cpu": 1024}
ENGINE_SEGMENT_MIN_T = 8192


def engine_segment(sequence_length: int, backend: str | None = None) -> int | None:
  """The chunked form's segment length for T tokens on `backend` (None: one pass).

  Raises:
    ValueError: sequence_length not an integer >= 1, or an unknown backend.

  Example:
    >>> engine_segment(65536, backend="cpu"), engine_segment(4096, backend="cpu")
    (1024, None)
  """
  _checks.check_positive_int("sequence_length", sequence_length)
  backend = _checked_backend(backend)
  return _from_length(ENGINE_SEGMENT, ENGINE_SEGMENT_MIN_T, sequence_length, backend)


def plan_engine(sequence_length: int, key_dim: int, value_dim: int, *, backend: str | None = None,
                needs_grad: bool = False, decoding: bool = False,
                per_channel_decay: bool = False) -> EnginePlan:
  """Picks the mode and chunk size for a call of the engine.

  Args:
    sequence_length: T, number of tokens in the call.
    key_dim: K.
    value_dim: V.
    backend: "cpu", "gpu" or "tpu"; defaults to `jax.default_backend()`.
    needs_grad: whether the call will be differentiated.
    decoding: True for a single-token step that continues a carried state.
    per_channel_decay: whether the log decay has one value per key channel ([B, T, H, K]) rather
      than one per head ([B, T, H]).

  Returns:
    An `EnginePlan`.

  Example:
    >>> plan_engine(8192, 64, 64, backend="cpu", needs_grad=True)
    EnginePlan(mode=<Mode.CHUNKED: 'chunked'>, chunk_size=64, segment_size=1024)
    >>> plan_engine(8192, 64, 64, backend="cpu").mode.value
    'recurrent'
  """
  del key_dim, value_dim  # Not decisive at the sizes measured so far.
  if isinstance(sequence_length, bool) or not isinstance(sequence_length, int) or sequence_length < 1:
    raise ValueError(f"sequence_length must be an integer >= 1, got {sequence_length!r}.")
  backend = _checked_backend(backend)
  if decoding or sequence_length == 1:
    return EnginePlan(Mode.RECURRENT)
  if backend == "cpu" and not needs_grad:
    return EnginePlan(Mode.RECURRENT)
  if per_channel_decay:
    # Per-channel decays: the scan for short T (their quadratic form would build a [T, T, K]
    # decay tensor).
    if sequence_length <= PER_CHANNEL_SCAN_MAX_T:
      return EnginePlan(Mode.RECURRENT)
  elif sequence_length <= QUADRATIC_MAX_T:
    return EnginePlan(Mode.QUADRATIC)
  chunk = min(CHUNK_SIZE.get(backend, DEFAULT_CHUNK_SIZE), sequence_length)
  return EnginePlan(Mode.CHUNKED, chunk, engine_segment(sequence_length, backend))


def engine_plans(sequence_length: int, *, per_channel_decay: bool, mode: Mode = Mode.AUTO,
                 chunk_size: int | None = None, backend: str | None = None
                 ) -> tuple[EnginePlan, EnginePlan]:
  """The (evaluated, differentiated) pair of plans for one engine call, computed once.

  With `mode` AUTO the two come from `plan_engine` without and with gradients (the engine then
  evaluates the first and differentiates through the second, see `gla.run_engine`); with a
  concrete mode both are that mode. An explicit `chunk_size` overrides the planner's chunk.
  """
  if mode is not Mode.AUTO:
    # Explicit chunks take the backend's segments; a backend without an entry (a plugin's
    # name, which `engine_segment` would reject) runs one pass.
    segment = _from_length(ENGINE_SEGMENT, ENGINE_SEGMENT_MIN_T, sequence_length,
                           backend or jax.default_backend())
    plan = (EnginePlan(mode, chunk_size, segment) if mode is Mode.CHUNKED else EnginePlan(mode))
    return plan, plan
  plans = [plan_engine(sequence_length, 0, 0, backend=backend, needs_grad=grad,
                       per_channel_decay=per_channel_decay) for grad in (False, True)]
  if chunk_size is not None:
    plans = [dataclasses.replace(p, chunk_size=chunk_size) if p.mode is Mode.CHUNKED else p
             for p in plans]
  return plans[0], plans[1]


def delta_rule_plans(sequence_length: int, *, mode: Mode | str = Mode.AUTO,
                     chunk_size: int | None = None, backend: str | None = None
                     ) -> tuple[EnginePlan, EnginePlan]:
  """The (evaluated, differentiated) plans of one delta-rule call (`delta_rule.py`).

  A concrete mode is used for both. "auto": the chunked form when T > C (C = `chunk_size`, or
  the planner's chunk for the backend: 64 on CPU and GPU, 128 on TPU), else the recurrent form;
  on CPU the evaluated plan is the recurrent form whatever T (the engine's measured rule for
  forward-only calls on CPU). The delta rule's forms cost differently from the additive
  engine's, hence a rule of its own.

  Example:
    >>> [p.mode.value for p in delta_rule_plans(1000, chunk_size=64, backend="cpu")]
    ['recurrent', 'chunked']
  """
  mode = Mode.parse(mode)
  backend = backend or jax.default_backend()
  chunk = chunk_size or CHUNK_SIZE.get(backend, DEFAULT_CHUNK_SIZE)
  if mode is not Mode.AUTO:
    plan = EnginePlan(mode, chunk if mode is Mode.CHUNKED else None)
    return plan, plan
  grad = EnginePlan(Mode.CHUNKED, chunk) if sequence_length > chunk else EnginePlan(Mode.RECURRENT)
  forward = EnginePlan(Mode.RECURRENT) if backend == "cpu" else grad
  return forward, grad


class PlanKind(str, enum.Enum):
  SOFTMAX = "softmax"          # T <= W and no carried state: the memory is empty
  COMPRESSED = "compressed"    # window + compressed memory through the engine
  STEP = "step"                # one decoding step on a DCAState


@dataclasses.dataclass(frozen=True)
class DCAPlan:
  """What `adaptive_scale` decided.

  Attributes:
    kind: `PlanKind`.
    engine: the engine's form and chunk size for the compressed memory when the call is
      evaluated (None for SOFTMAX/STEP).
    engine_grad: the form used when the call is differentiated (the same as `engine` unless
      the mode is "auto"; see `engine_plans`).
  """

  kind: PlanKind
  engine: EnginePlan | None = None
  engine_grad: EnginePlan | None = None


def adaptive_scale(sequence_length: int, *, window: int, has_state: bool = False,
                   decoding: bool = False, needs_grad: bool = False,
                   per_channel_decay: bool = False, delta_memory: bool = False,
                   mode: Mode | str = "auto", chunk_size: int | None = None,
                   backend: str | None = None, feature_dim: int | None = None,
                   value_dim: int | None = None) -> DCAPlan:
  """Chooses how much machinery a call needs: the computation adapts to the input's length.

  * decoding (one token continuing a state): `memory_state_update`, O(W (K + V) + F V) per token;
  * T <= W with no carried state: no token has left the window, so the memory is empty and DCA
    is exact causal softmax over T tokens (no engine call at all);
  * otherwise: window + compressed memory, the engine's form and chunk size chosen by its
    planner (`engine_plans` over `plan_engine`, measured by experiments/benchmark_engine.py;
    `delta_rule_plans` for the delta memory).

  This is the only plan of an `attention_compress` call: the call computes it once and hands
  `engine` and `engine_grad` to the engine's internal entry (`gla.run_engine`,
  `delta_rule.run_delta_rule`), which does not plan again.

  Args:
    sequence_length: T.
    window: W.
    has_state: whether the call continues from a `DCAState`.
    decoding: whether this is a single-token decoding step.
    needs_grad: the call is always differentiated: `engine` is then the gradient plan too.
    per_channel_decay: one decay per memory row rather than per head (changes the CPU plan).
    delta_memory: the memory is the delta rule's (memory="delta"): its forms are planned by
      `delta_rule_plans` instead of `engine_plans`.
    mode: the engine form ("auto": the planner's, per evaluated/differentiated case).
    chunk_size: the engine's chunk size (None: the planner's).
    backend: "cpu", "gpu", "tpu"; default `jax.default_backend()`.
    feature_dim, value_dim: F and V of the memory (not decisive at the sizes measured; kept
      for callers that pass them).

  Returns:
    A `DCAPlan`.

  Example:
    >>> adaptive_scale(48, window=64).kind.value
    'softmax'
    >>> adaptive_scale(4096, window=64, needs_grad=True, backend="cpu").engine.mode.value
    'chunked'
  """
  del feature_dim, value_dim
  _checks.check_positive_int("sequence_length", sequence_length)
  _checks.check_positive_int("window", window)
  _checks.check_positive_int("chunk_size", chunk_size, allow_none=True)
  mode = Mode.parse(mode)
  if decoding:
    return DCAPlan(PlanKind.STEP)
  if sequence_length <= window and not has_state:
    return DCAPlan(PlanKind.SOFTMAX)
  if delta_memory:
    forward, grad = delta_rule_plans(sequence_length, mode=mode, chunk_size=chunk_size,
                                     backend=backend)
  else:
    forward, grad = engine_plans(sequence_length, per_channel_decay=per_channel_decay, mode=mode,
                                 chunk_size=chunk_size, backend=backend)
  return DCAPlan(PlanKind.COMPRESSED, grad if needs_grad else forward, grad)


