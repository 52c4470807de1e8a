"""Layer benchmark: DCAttention against softmax, sliding-window, linear and gated linear attention.

Launch (regenerates docs/layer_benchmark.{json,md,png}):

    python -m experiments.benchmark_layers            # full run, ~15-20 min on a quiet 2-core CPU
    python -m experiments.benchmark_layers --quick    # subset, ~2-3 min (smoke / CI)
    python -m experiments.benchmark_layers --quick --out /tmp/bench   # elsewhere
    python -m experiments.benchmark_layers --render-only   # rewrite .md/.png from the .json

Expected cost: the largest program run is softmax attention's forward at T = 16384 or its
fwd+bwd at T = 8192 (a few GiB of XLA temporary memory); nothing above `--memory-budget-gib`
(default 6) is ever run, and a layer whose call took longer than `--time-budget-s` (default 20)
at some T is not run at larger T.

What is measured (B=1, d_model=256, 4 heads, float32, jit on the default backend, every layer
with its defaults: DCA and sliding window with W = 64, DCA with P = 16 Taylor features, GLA with
expand_k = 0.5, rank 16, tau = 16):

* parameter counts (the sum of the sizes of every `nnx.Param`);
* for T = 256 ... 32768, the forward and the forward+backward wall time of each layer (median of
  repeats after one warm-up; the ten (layer, pass) contenders of one T run interleaved,
  round-robin) as a function `f(params, x)` of the `nnx.split` state, fwd+bwd being
  sum(y^2) and its gradients with respect to the parameters and x, and XLA's temporary-memory
  figure (`compiled.memory_analysis().temp_size_in_bytes`) of each; speed-ups over softmax and
  the T at which DCA becomes faster than softmax (the crossover);
* decoding: each layer's cache is prefilled to a context of 1k, 8k, 32k tokens (in chunks), then
  a jitted `decode_step` (cache donated, so updated in place) is timed per call, every (layer,
  context) pair interleaved step by step in one pool, and also inside a compiled
  `jax.lax.scan` of steps (the loop `generate` runs, free of per-call dispatch); the cache
  bytes (sum of leaf nbytes) are recorded;
  DCA and softmax at every context, the constant-state layers at the first and last;
* a dense 2048 x 2048 float32 matmul's GFLOP/s at the start and end of the run (the machine's
  yardstick);
* the issue's targets, all from the same run, printed as PASS / MISS.

The machine may be shared: the numbers to trust are the ratios, measured side by side.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.nn.dca import DCAttention
from dca_jax.nn.linear import GatedLinearAttention, LinearAttention
from dca_jax.nn.softmax import SoftmaxAttention
from dca_jax.nn.window import SlidingWindowAttention
from experiments import _report, _timing

_log = _report.log

FWD = "fwd"
FWD_BWD = "fwd+bwd"
PASSES = (FWD, FWD_BWD)
DCA = "DCAttention"
SOFTMAX = "SoftmaxAttention"


@dataclasses.dataclass(frozen=True)
class Config:
  """One benchmark run.

  Attributes:
    batch, d_model, num_heads: B, D, H of every layer.
    window: W of DCA and of the sliding-window layer.
    lengths: T of the forward and fwd+bwd grid.
    repeats: timed calls per contender and T.
    big_repeats: timed calls from `big_t` on.
    big_t: see `big_repeats`.
    min_total_s: fast contenders get extra calls until their timed calls add up to this.
    max_repeats: cap on those extra calls.
    max_timed_s: slow contenders get fewer timed calls (at least one) to stay within this.
    time_budget_s: a (layer, pass) whose call took longer than this at some T is not run beyond
      (nor one predicted, from its complexity, to take more than twice this).
    memory_budget_gib: programs with more XLA temporary memory than this are not run.
    decode_contexts: contexts at which DCA and softmax decode.
    decode_all_contexts: contexts at which every layer decodes (a subset of `decode_contexts`).
    decode_warmup: decode steps run before timing (after the compilation).
    decode_steps: timed decode calls per layer and context (median reported).
    loop_steps: decode steps inside the compiled `lax.scan` (time per call / this).
    loop_repeats: timed calls of that scan, at least.
    loop_min_total_s: fast scans get extra calls until their timed calls add up to this.
    loop_max_repeats: cap on those extra calls.
    prefill_chunk: tokens per prefill call when filling the caches.
    prefill_budget_s: a layer whose prefill is predicted to take longer than this is not decoded
      at that context.
    ratio_t: T at which the fwd+bwd speed-up target is checked.
    target_speedup: DCA's fwd+bwd speed-up over softmax wanted at `ratio_t`.
    faster_from_t: DCA's fwd+bwd must beat softmax at every T >= this.
    decode_flat_ratio: DCA's per-token time at the largest context over the smallest, at most.
    param_ratio: DCA's parameter count over softmax's, at most.
    matmul_n: size of the dense-matmul probe.
    seed: PRNG seed of the parameters and inputs.
  """

  batch: int = 1
  d_model: int = 256
  num_heads: int = 4
  window: int = 64
  lengths: tuple[int, ...] = tuple(2**i for i in range(8, 16))          # 256 ... 32768
  repeats: int = 5
  big_repeats: int = 3
  big_t: int = 8192
  min_total_s: float = 0.5
  max_repeats: int = 30
  max_timed_s: float = 40.0
  time_budget_s: float = 20.0
  memory_budget_gib: float = 6.0
  decode_contexts: tuple[int, ...] = (1024, 8192, 32768)
  decode_all_contexts: tuple[int, ...] = (1024, 32768)
  decode_warmup: int = 10
  decode_steps: int = 100
  loop_steps: int = 64
  loop_repeats: int = 5
  loop_min_total_s: float = 0.5
  loop_max_repeats: int = 40
  prefill_chunk: int = 2048
  prefill_budget_s: float = 300.0
  ratio_t: int = 8192
  target_speedup: float = 20.0
  faster_from_t: int = 1024
  decode_flat_ratio: float = 1.15
  param_ratio: float = 1.05
  matmul_n: int = 2048
  seed: int = 0


def get_config(quick: bool = False, **overrides: Any) -> Config:
  """The full configuration, or the `--quick` subset (~2-3 min on a 2-core CPU).

  Args:
    quick: the smoke subset: T in {256, 1024, 4096}, decoding at 1k and 8k, fewer repeats.
    **overrides: fields of `Config` to replace.

  Returns:
    A frozen `Config`.

  Raises:
    ValueError: on an override that is not a field of `Config`.
  """
  config = Config()
  if quick:
    config = dataclasses.replace(
        config, lengths=(256, 1024, 4096), repeats=3, big_repeats=2, min_total_s=0.2,
        max_repeats=10, max_timed_s=15.0, decode_contexts=(1024, 8192),
        decode_all_contexts=(1024, 8192), decode_warmup=5, decode_steps=40, loop_steps=32,
        loop_repeats=3, loop_min_total_s=0.2, loop_max_repeats=20, matmul_n=1024)
  return _report.replace_checked(config, overrides)


# ----------------------------------------------------------------------------------------------
# Layers.


@dataclasses.dataclass(frozen=True)
class LayerSpec:
  """A layer under test.

  Attributes:
    name: row label (the class name).
    make: config -> the layer (parameters from `config.seed`).
    exponent: how its time grows with T (1 linear, 2 quadratic), to predict the next T.
    options: the non-default constructor options, for the record.
  """

  name: str
  make: Callable[[Config], nnx.Module]
  exponent: int = 1
  options: str = ""


def layer_specs(config: Config) -> list[LayerSpec]:
  """The five layers, in table order."""
  def make(cls, **options):
    return lambda c: cls(c.d_model, c.num_heads, rngs=nnx.Rngs(c.seed), **options)
  w = config.window
  return [
      LayerSpec(DCA, make(DCAttention, window=w), options=f"window={w}"),
      LayerSpec(SOFTMAX, make(SoftmaxAttention), exponent=2),
      LayerSpec("SlidingWindowAttention", make(SlidingWindowAttention, window=w),
                options=f"window={w}"),
      LayerSpec("LinearAttention", make(LinearAttention)),
      LayerSpec("GatedLinearAttention", make(GatedLinearAttention)),
  ]


def param_count(layer: nnx.Module) -> int:
  """Sum of the sizes of the layer's `nnx.Param` leaves."""
  return int(sum(leaf.size for leaf in jax.tree.leaves(nnx.state(layer, nnx.Param))))


def tree_bytes(tree: Any) -> int:
  """Sum of the nbytes of a pytree's array leaves."""
  return int(sum(leaf.nbytes for leaf in jax.tree.leaves(tree)))


def forward_fn(graphdef: Any) -> Callable[[Any, jax.Array], jax.Array]:
  """(state, x [B, T, D]) -> y [B, T, D], a pure function of the split layer."""
  def forward(state, x):
    return nnx.merge(graphdef, state)(x)
  return forward


def fwd_bwd_fn(graphdef: Any) -> Callable[[Any, jax.Array], Any]:
  """(state, x) -> (sum(y^2), (d/dstate, d/dx)): a training step of the layer, minus the update."""
  forward = forward_fn(graphdef)

  def loss(state, x):
    return jnp.sum(jnp.square(forward(state, x).astype(jnp.float32)))

  return jax.value_and_grad(loss, argnums=(0, 1))


def _all_finite(tree: Any) -> bool:
  return bool(all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
                  if jnp.issubdtype(x.dtype, jnp.floating)))


def _input(config: Config, length: int, salt: int = 0) -> jax.Array:
  key = jax.random.fold_in(jax.random.key(config.seed + 1), length * 16 + salt)
  return jax.random.normal(key, (config.batch, length, config.d_model), jnp.float32)


# ----------------------------------------------------------------------------------------------
# Forward and fwd+bwd grid.


class GridRunner:
  """Compiles, guards, times and records the grid; remembers who ran out of time budget."""

  def __init__(self, config: Config, specs: list[LayerSpec]):
    self.config = config
    self.specs = specs
    self.budget_bytes = int(config.memory_budget_gib * _timing.GIB)
    self.last_time: dict[tuple[str, str], tuple[int, float]] = {}   # (layer, pass) -> (T, s)
    self.exhausted: dict[tuple[str, str], str] = {}
    self.splits = {spec.name: nnx.split(spec.make(config)) for spec in specs}

  def _time_skip(self, spec: LayerSpec, pass_name: str, length: int) -> str | None:
    key = (spec.name, pass_name)
    if key in self.exhausted:
      return self.exhausted[key]
    if key in self.last_time:
      last_t, last_s = self.last_time[key]
      predicted = last_s * (length / last_t)**spec.exponent
      if predicted > 2 * self.config.time_budget_s:
        return (f"time budget: predicted {predicted:.0f} s per call from {last_s:.2f} s at "
                f"T={last_t} (budget {self.config.time_budget_s:.0f} s)")
    return None

  def measure(self, length: int) -> list[dict[str, Any]]:
    """Runs every (layer, pass) at one T, interleaved; one record per pair."""
    config = self.config
    x = _input(config, length)
    records, thunks, finite = [], {}, {}
    for spec in self.specs:
      graphdef, state = self.splits[spec.name]
      for pass_name in PASSES:
        record = {"section": "grid", "layer": spec.name, "pass": pass_name, "T": length,
                  "status": "ok", "reason": None}
        records.append(record)
        time_reason = self._time_skip(spec, pass_name, length)
        if time_reason and (spec.name, pass_name) in self.exhausted:
          # Already over budget at a smaller T: not even compiled (a compile can take a minute).
          record.update(status="skipped", reason=time_reason)
          _log(f"  {spec.name:24s} {pass_name:7s} T={length}: skipped ({time_reason})")
          continue
        fn = forward_fn(graphdef) if pass_name == FWD else fwd_bwd_fn(graphdef)
        start = time.perf_counter()
        try:
          compiled = _timing.compile_fn(fn, state, x)
        except Exception as error:  # pylint: disable=broad-except  # recorded, run goes on
          record.update(status="error", reason=f"compile failed: {type(error).__name__}: {error}")
          _log(f"  {spec.name:24s} {pass_name:7s} T={length}: {record['reason']}")
          continue
        record["compile_s"] = time.perf_counter() - start
        record.update(_timing.memory_stats(compiled))
        temp = record.get("temp_bytes")
        if temp is not None and temp > self.budget_bytes:
          record.update(status="skipped", reason=(
              f"memory budget: XLA temp {_timing.format_bytes(temp)} > "
              f"{config.memory_budget_gib:g} GiB"))
        elif time_reason:
          record.update(status="skipped", reason=time_reason)
        if record["status"] != "ok":
          _log(f"  {spec.name:24s} {pass_name:7s} T={length}: skipped ({record['reason']})")
          continue
        thunks[f"{spec.name}|{pass_name}"] = (functools.partial(compiled, state, x), record)
    if thunks:
      timings = _timing.time_interleaved(
          {label: t for label, (t, _) in thunks.items()},
          repeats=config.big_repeats if length >= config.big_t else config.repeats,
          min_total_s=config.min_total_s, max_repeats=config.max_repeats,
          max_total_s=config.max_timed_s, seed=config.seed + length,
          inspect=lambda label, out: finite.__setitem__(label, _all_finite(out)))
      for label, (_, record) in thunks.items():
        timing = timings[label]
        record.update(timing.to_json())
        record["finite"] = finite[label]
        key = (record["layer"], record["pass"])
        self.last_time[key] = (length, timing.median_s)
        if timing.median_s > config.time_budget_s:
          self.exhausted[key] = (f"time budget: {timing.median_s:.1f} s per call at T={length} "
                                 f"> {config.time_budget_s:.0f} s")
        _log(f"  {record['layer']:24s} {record['pass']:7s} T={length:>6d}: "
             f"{_timing.format_seconds(timing.median_s):>9s} (x{timing.repeats}) temp "
             f"{_timing.format_bytes(record.get('temp_bytes')):>9s}"
             f"{'' if record['finite'] else '  NOT FINITE'}")
    return records


# ----------------------------------------------------------------------------------------------
# Decoding.


class _Stepper:
  """One layer decoding: each call runs one jitted `decode_step` and keeps the new cache."""

  def __init__(self, step: Any, state: Any, cache: Any, tokens: jax.Array):
    self.step, self.state, self.cache, self.tokens = step, state, cache, tokens
    self.calls = 0

  def __call__(self) -> Any:
    x_t = self.tokens[self.calls % self.tokens.shape[0]]
    self.calls += 1
    y, self.cache = self.step(self.state, x_t, self.cache)
    return y, self.cache


def _prefill_fn(graphdef: Any):
  def prefill(state, x, cache):
    return nnx.merge(graphdef, state).prefill(x, cache)
  return prefill


def _step_fn(graphdef: Any):
  def step(state, x_t, cache):
    return nnx.merge(graphdef, state).decode_step(x_t, cache)
  return step


def _loop_fn(graphdef: Any):
  def loop(state, xs, cache):
    layer = nnx.merge(graphdef, state)

    def body(cache, x_t):
      y, cache = layer.decode_step(x_t, cache)
      return cache, y

    cache, ys = jax.lax.scan(body, cache, xs)
    return ys, cache
  return loop


class DecodeRunner:
  """Prefills caches, then times decoding per call (interleaved) and inside a compiled scan."""

  def __init__(self, config: Config, specs: list[LayerSpec]):
    self.config = config
    self.specs = {spec.name: spec for spec in specs}
    self.budget_bytes = int(config.memory_budget_gib * _timing.GIB)
    self.last_prefill: dict[str, tuple[int, float]] = {}

  def _max_length(self, context: int) -> int:
    c = self.config
    return context + max(c.decode_warmup + 1 + c.decode_steps, c.loop_steps)

  def _prepare(self, spec: LayerSpec, context: int,
               record: dict[str, Any]) -> dict[str, Any] | None:
    """Prefills one layer's cache to `context` and compiles its step and loop; None if skipped."""
    config = self.config
    if spec.name in self.last_prefill:
      last_c, last_s = self.last_prefill[spec.name]
      predicted = last_s * (context / last_c)**spec.exponent
      if predicted > config.prefill_budget_s:
        record.update(status="skipped", reason=(
            f"time budget: prefill predicted {predicted:.0f} s > {config.prefill_budget_s:.0f} s"))
        return None
    layer = spec.make(config)
    graphdef, state = nnx.split(layer)
    cache = layer.init_cache(config.batch, self._max_length(context))
    record["cache_bytes_empty"] = tree_bytes(cache)
    chunk = min(config.prefill_chunk, context)
    x = _input(config, context, salt=1)
    start = time.perf_counter()
    prefill = _timing.compile_fn(_prefill_fn(graphdef), state, x[:, :chunk], cache)
    temp = _timing.memory_stats(prefill)["temp_bytes"]
    record["prefill_temp_bytes"] = temp
    if temp is not None and temp > self.budget_bytes:
      record.update(status="skipped", reason=(
          f"memory budget: prefill chunk XLA temp {_timing.format_bytes(temp)} > "
          f"{config.memory_budget_gib:g} GiB"))
      return None
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(0, context - context % chunk, chunk):
      _, cache = prefill(state, x[:, i:i + chunk], cache)
    if context % chunk:  # A shorter last chunk: one more compilation, inside the timing.
      _, cache = jax.jit(_prefill_fn(graphdef))(state, x[:, context - context % chunk:], cache)
    cache = jax.block_until_ready(cache)
    prefill_s = time.perf_counter() - start
    self.last_prefill[spec.name] = (context, prefill_s)
    record.update(prefill_s=prefill_s, prefill_compile_s=compile_s, prefill_chunk=chunk,
                  cache_bytes=tree_bytes(cache), max_length=self._max_length(context))
    if hasattr(cache, "position"):
      record["cache_position"] = int(cache.position)

    keys = jax.random.split(jax.random.key(config.seed + 2 + context), 2)
    tokens = jax.random.normal(keys[0], (config.decode_steps + config.decode_warmup + 1,
                                         config.batch, config.d_model), jnp.float32)
    loop_xs = jax.random.normal(keys[1], (config.loop_steps, config.batch, config.d_model),
                                jnp.float32)
    start = time.perf_counter()
    # The cache is donated: decode_step updates it in place, as a serving loop would.
    step = jax.jit(_step_fn(graphdef), donate_argnums=(2,)).lower(state, tokens[0], cache).compile()
    loop = _timing.compile_fn(_loop_fn(graphdef), state, loop_xs, cache)
    record["step_compile_s"] = time.perf_counter() - start
    record["step_temp_bytes"] = _timing.memory_stats(step)["temp_bytes"]
    record["loop_temp_bytes"] = _timing.memory_stats(loop)["temp_bytes"]
    # The scan starts from a copy so that the donated per-call cache stays independent of it.
    loop_cache = jax.tree.map(jnp.copy, cache)
    return {"stepper": _Stepper(step, state, cache, tokens),
            "loop": functools.partial(loop, state, loop_xs, loop_cache)}

  def measure(self, jobs: list[tuple[str, int]]) -> list[dict[str, Any]]:
    """Decodes every (layer, context) of `jobs`; one record per job.

    Every cache is prefilled first; then all the jobs are timed interleaved, round-robin in a
    fresh random order each step: a layer at two contexts meets the same machine load and the
    same neighbours (softmax's long steps evict the caches of whatever runs next), so the
    ratios across contexts and across layers are measured side by side.
    """
    config = self.config
    records, prepared = [], {}
    for name, context in jobs:
      record = {"section": "decode", "layer": name, "context": context, "status": "ok",
                "reason": None}
      records.append(record)
      try:
        ready = self._prepare(self.specs[name], context, record)
      except Exception as error:  # pylint: disable=broad-except  # recorded, run goes on
        record.update(status="error", reason=f"{type(error).__name__}: {error}")
        ready = None
      if ready is None:
        _log(f"  {name:24s} context={context}: {record['status']} ({record['reason']})")
        continue
      prepared[f"{name}@{context}"] = (ready, record)
      _log(f"  {name:24s} context={context:>6d}: prefilled in {record['prefill_s']:.1f} s, cache "
           f"{_timing.format_bytes(record['cache_bytes'])}")
    if not prepared:
      return records
    _log(f"  timing {len(prepared)} decoders interleaved")
    for _ in range(config.decode_warmup):
      for ready, _ in prepared.values():
        jax.block_until_ready(ready["stepper"]())
    finite = {}
    per_call = _timing.time_interleaved(
        {label: ready["stepper"] for label, (ready, _) in prepared.items()},
        repeats=config.decode_steps, max_repeats=config.decode_steps, seed=config.seed,
        inspect=lambda label, out: finite.__setitem__(label, _all_finite(out[0])))
    in_loop = _timing.time_interleaved(
        {label: ready["loop"] for label, (ready, _) in prepared.items()},
        repeats=config.loop_repeats, min_total_s=config.loop_min_total_s,
        max_repeats=config.loop_max_repeats, seed=config.seed + 1,
        inspect=lambda label, out: finite.__setitem__(
            label, finite[label] and _all_finite(out[0])))
    for label, (ready, record) in prepared.items():
      timing, loop = per_call[label], in_loop[label]
      stepper = ready["stepper"]
      record.update(step=timing.to_json(), step_median_s=timing.median_s, step_min_s=timing.min_s,
                    loop=loop.to_json(), loop_steps=config.loop_steps,
                    loop_per_token_s=loop.median_s / config.loop_steps, finite=finite[label],
                    position_after=int(stepper.cache.position)
                    if hasattr(stepper.cache, "position") else None)
      _log(f"  {record['layer']:24s} context={record['context']:>6d}: "
           f"{_timing.format_seconds(timing.median_s):>9s} per call (x{timing.repeats}), "
           f"{_timing.format_seconds(record['loop_per_token_s']):>9s} per token in a scan, "
           f"cache {_timing.format_bytes(record['cache_bytes'])}"
           f"{'' if finite[label] else '  NOT FINITE'}")
    return records


# ----------------------------------------------------------------------------------------------
# Analysis.


def _find(records, layer, pass_name, length):
  for r in records:
    if (r["section"] == "grid" and r["layer"] == layer and r["pass"] == pass_name
        and r["T"] == length):
      return r
  return None


def _median(records, layer, pass_name, length, stat="median_s"):
  r = _find(records, layer, pass_name, length)
  return r[stat] if r and r["status"] == "ok" else None


def speedups(records: list[dict[str, Any]], layer: str, pass_name: str) -> dict[int, float]:
  """T -> softmax median / layer median, where both ran."""
  out = {}
  for length in sorted({r["T"] for r in records if r["section"] == "grid"}):
    a = _median(records, SOFTMAX, pass_name, length)
    b = _median(records, layer, pass_name, length)
    if a and b:
      out[length] = a / b
  return out


def crossover(records: list[dict[str, Any]], pass_name: str) -> dict[str, Any]:
  """Where DCA becomes faster than softmax.

  Returns:
    A dict with `from_t` (the smallest T from which DCA's median is below softmax's at that T
    and every larger T where both ran; None if never), `estimate_t` (the log-log interpolation
    of the speed-up through 1 between the last slower and the first faster T; None when DCA is
    faster at every T or never), and `text`.
  """
  ratios = speedups(records, DCA, pass_name)
  if not ratios:
    return {"from_t": None, "estimate_t": None, "text": "not measured"}
  lengths = sorted(ratios)
  from_t = None
  for i, length in enumerate(lengths):
    if all(ratios[t] > 1 for t in lengths[i:]):
      from_t = length
      break
  if from_t is None:
    return {"from_t": None, "estimate_t": None,
            "text": f"DCA not faster at the largest T both ran (T={lengths[-1]}: "
                    f"{ratios[lengths[-1]]:.2f}x)"}
  index = lengths.index(from_t)
  if index == 0:
    return {"from_t": from_t, "estimate_t": None,
            "text": f"DCA faster at every T measured (from T={from_t}: {ratios[from_t]:.2f}x)"}
  lo, hi = lengths[index - 1], from_t
  a, b = math.log(ratios[lo]), math.log(ratios[hi])
  frac = -a / (b - a) if b != a else 0.5
  estimate = 2 ** (math.log2(lo) + frac * (math.log2(hi) - math.log2(lo)))
  return {"from_t": from_t, "estimate_t": estimate,
          "text": f"faster from T={from_t} ({ratios[hi]:.2f}x; {ratios[lo]:.2f}x at T={lo}); "
                  f"log-log interpolation ~T={estimate:.0f}"}


def _decode(records, layer, context):
  for r in records:
    if r["section"] == "decode" and r["layer"] == layer and r["context"] == context:
      return r if r["status"] == "ok" else None
  return None


def targets(config: Config, result: dict[str, Any]) -> list[dict[str, Any]]:
  """The issue's targets, each with its numbers and PASS / MISS (or N/A, INFO)."""
  records = result["records"]
  out = []
  fmt = _timing.format_seconds

  def add(name, value, goal, ok, detail, status=None):
    if status is None:
      status = "N/A" if value is None else ("PASS" if ok else "MISS")
    out.append({"target": name, "value": value, "goal": goal, "status": status, "detail": detail})

  ratios = speedups(records, DCA, FWD_BWD)
  t = config.ratio_t
  value = ratios.get(t)
  if value is not None:
    fastest = (_median(records, SOFTMAX, FWD_BWD, t, "min_s")
               / _median(records, DCA, FWD_BWD, t, "min_s"))
    detail = (f"softmax {fmt(_median(records, SOFTMAX, FWD_BWD, t))}, DCA "
              f"{fmt(_median(records, DCA, FWD_BWD, t))} (medians); fastest calls: "
              f"{fastest:.3g}x")
  elif ratios:
    last = max(ratios)
    detail = (f"T={t} not run (softmax or DCA skipped, or not in the grid); at T={last}: "
              f"{ratios[last]:.3g}x")
  else:
    detail = "not measured"
  add(f"DCA fwd+bwd speed-up over softmax at T={t}", value, f">= {config.target_speedup:g}x",
      value is not None and value >= config.target_speedup, detail)

  wanted = {length: r for length, r in ratios.items() if length >= config.faster_from_t}
  value = min(wanted.values()) if wanted else None
  add(f"DCA fwd+bwd faster than softmax at every T >= {config.faster_from_t} (worst speed-up)",
      value, "> 1x", value is not None and value > 1,
      ", ".join(f"T={length}: {r:.3g}x" for length, r in sorted(wanted.items())))

  for pass_name in PASSES:
    cross = crossover(records, pass_name)
    add(f"crossover T, {pass_name} (DCA faster than softmax from)", cross["from_t"], "(reported)",
        True, cross["text"], status="INFO")

  params = result["params"]
  value = params[DCA] / params[SOFTMAX]
  add("DCA / softmax parameter count", value, f"<= {config.param_ratio}",
      value <= config.param_ratio, f"{params[DCA]:,} vs {params[SOFTMAX]:,}")

  contexts = sorted(config.decode_contexts)
  lo, hi = contexts[0], contexts[-1]
  a, b = _decode(records, DCA, lo), _decode(records, DCA, hi)
  value = b["step_median_s"] / a["step_median_s"] if a and b else None
  detail = ""
  if a and b:
    detail = (f"{fmt(a['step_median_s'])} at {lo}, {fmt(b['step_median_s'])} at {hi} per call; "
              f"in a scan {fmt(a['loop_per_token_s'])} and {fmt(b['loop_per_token_s'])} "
              f"({b['loop_per_token_s'] / a['loop_per_token_s']:.3g}x)")
  add(f"DCA decode time per token at context {hi} / at {lo}", value,
      f"<= {config.decode_flat_ratio}", value is not None and value <= config.decode_flat_ratio,
      detail)

  times = [(c, _decode(records, SOFTMAX, c)) for c in contexts]
  times = [(c, r["step_median_s"], r["loop_per_token_s"]) for c, r in times if r]
  value = times[-1][1] / times[0][1] if len(times) >= 2 else None
  grows = len(times) >= 2 and all(b[1] > a[1] for a, b in zip(times, times[1:]))
  add(f"softmax decode time per token grows with the context ({hi} / {lo})", value,
      "increasing", grows,
      ", ".join(f"{c}: {fmt(s)} (scan {fmt(ls)})" for c, s, ls in times))

  for context in contexts:
    a, b = _decode(records, DCA, context), _decode(records, SOFTMAX, context)
    if a and b:
      add(f"softmax / DCA decode time per token at context {context}",
          b["step_median_s"] / a["step_median_s"], "(reported)", True,
          f"in a scan: {b['loop_per_token_s'] / a['loop_per_token_s']:.3g}x; cache "
          f"{_timing.format_bytes(b['cache_bytes'])} vs {_timing.format_bytes(a['cache_bytes'])}",
          status="INFO")
  return out


# ----------------------------------------------------------------------------------------------
# Reports.


def _grid_table(records, layers, lengths, pass_name, cell):
  return _report.grid_table("layer", layers, lengths,
                            lambda name, t: cell(_find(records, name, pass_name, t)))


def _speedup_table(records, layers, lengths, pass_name):
  ratios = {name: speedups(records, name, pass_name) for name in layers if name != SOFTMAX}
  return _report.grid_table("layer", list(ratios), lengths,
                            lambda name, t: f"{ratios[name][t]:.3g}x" if t in ratios[name] else "")


def _decode_table(records, layers, contexts):
  fmt = _timing.format_seconds
  lines = ["| layer | context | per call (median) | per call (fastest) | per token in a scan | "
           "cache bytes | prefill (not interleaved) | decode-step XLA temp |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
  for name in layers:
    for context in contexts:
      r = next((r for r in records if r["section"] == "decode" and r["layer"] == name
                and r["context"] == context), None)
      if r is None:
        continue
      if r["status"] != "ok":
        lines.append(f"| {name} | {context} | {r['status']}: {r['reason']} | | | | | |")
        continue
      lines.append(
          f"| {name} | {context} | {fmt(r['step_median_s'])}"
          f"{'' if r.get('finite', True) else ' (NaN!)'} | {fmt(r['step_min_s'])} | "
          f"{fmt(r['loop_per_token_s'])} | {r['cache_bytes']:,} "
          f"({_timing.format_bytes(r['cache_bytes'])}) | {fmt(r['prefill_s'])} | "
          f"{_timing.format_bytes(r.get('step_temp_bytes'))} |")
  return "\n".join(lines)


def _target_text(row: dict[str, Any]) -> str:
  value = row["value"]
  if value is None:
    return "-"
  if "crossover" in row["target"]:
    return f"T={value}"
  if "parameter" in row["target"]:
    return f"{value:.4f}"
  return f"{value:.3g}x"


def write_markdown(path: str, result: dict[str, Any]) -> None:
  """The tables, targets and a header with the command, machine and date."""
  config = result["config"]
  records = result["records"]
  grid = [r for r in records if r["section"] == "grid"]
  lengths = sorted({r["T"] for r in grid})
  layers = list(result["params"])
  machine = result["machine"]
  probes = result["matmul"]["probes"]
  lines = [
      "# Layer benchmark",
      "",
      f"Produced by `{result['command']}`. Every number here is regenerated by "
      "`python -m experiments.benchmark_layers` (~15-20 min on a quiet 2-core CPU; `--quick` "
      "runs a ~2-3 min subset; `--render-only` rewrites this file and the plot from the JSON).",
      "",
      f"Machine: {_timing.machine_line(machine)}. Date: {machine['date']}. "
      f"Run time: {result['runtime_s'] / 60:.1f} min. Dense {probes[0]['n']}^2 float32 matmul: "
      + ", ".join(f"{p['gflops']:.1f}" for p in probes) + " GFLOP/s (start, end of run)."
      + _report.load_text(machine),
      "",
      f"Setup: B={config['batch']}, d_model={config['d_model']}, {config['num_heads']} heads, "
      f"float32, jit; each layer with its defaults (DCA: W={config['window']}, 16 projected "
      f"features -> 153 Taylor features; sliding window: W={config['window']}; GLA: expand_k 0.5, "
      "gate rank 16, tau 16, per-channel decay). A layer is `nnx.split` into (graphdef, state) and "
      "timed as the jitted pure function `f(state, x)`; fwd+bwd is sum(y^2) and its gradients "
      "with respect to every parameter and x. Median of "
      f"{config['repeats']} calls after one warm-up ({config['big_repeats']} from "
      f"T={config['big_t']}; fast calls are repeated until they add up to "
      f"{config['min_total_s']} s, slow ones cut to stay within {config['max_timed_s']:g} s); the "
      "ten (layer, pass) contenders of one T run interleaved, round-robin. Memory is XLA's "
      "temporary buffers (`memory_analysis().temp_size_in_bytes`), excluding inputs and outputs. "
      f"Budgets: {config['memory_budget_gib']:g} GiB temp memory (compiled, not run: "
      f"'skip: mem'), {config['time_budget_s']:g} s per call (a layer is not run at larger T "
      "once a call took longer, or when predicted to take more than twice as long: "
      "'skip: time'). The machine may have been shared with other jobs: trust the ratios within "
      "one T more than absolute times.",
      "",
  ]
  lines += _report.targets_section(result["targets"], _target_text)
  lines += ["", "## Parameters", "", "| layer | parameters | / softmax | options |",
            "|---|---:|---:|---|"]
  for name, count in result["params"].items():
    lines.append(f"| {name} | {count:,} | {count / result['params'][SOFTMAX]:.4f} | "
                 f"{result['options'].get(name) or 'defaults'} |")
  sections = [
      ("Forward + backward: speed-up over softmax (softmax time / layer time; > 1 is faster)",
       FWD_BWD, None),
      ("Forward: speed-up over softmax (softmax time / layer time)", FWD, None),
      ("Forward + backward time", FWD_BWD, _report.cell_time),
      ("Forward time", FWD, _report.cell_time),
      ("Forward + backward XLA temp memory", FWD_BWD, _report.cell_memory),
      ("Forward XLA temp memory", FWD, _report.cell_memory),
  ]
  for title, pass_name, cell in sections:
    lines += ["", f"## {title}", ""]
    if "memory" in title:
      lines += ["Parenthesised: compiled but not run (over a budget).", ""]
    if cell is None:
      lines.append(_speedup_table(grid, layers, lengths, pass_name))
    else:
      lines.append(_grid_table(grid, layers, lengths, pass_name, cell))
  contexts = sorted({r["context"] for r in records if r["section"] == "decode"})
  lines += [
      "", "## Decoding", "",
      f"Each cache is prefilled to the context in chunks of {config['prefill_chunk']} tokens "
      f"(softmax's with max_length = context + {result['decode_margin']}: its decode step reads "
      f"the whole buffer), then after {config['decode_warmup']} warm-up steps a jitted "
      f"`decode_step` (cache donated, updated in place) is timed per call, "
      f"{config['decode_steps']} calls per "
      "decoder, every (layer, context) decoder interleaved in one pool, in a fresh random order "
      "each step (so a layer at two contexts meets the same load and the same neighbours), each "
      "call waited for; 'per token in a scan' is "
      f"a compiled `jax.lax.scan` of {config['loop_steps']} steps (the loop `generate` runs) "
      f"divided by {config['loop_steps']}, median of {config['loop_repeats']} calls or more (fast "
      f"scans repeated until {config['loop_min_total_s']} s): the step's own "
      "cost, free of the per-call dispatch. Cache bytes: the sum of the cache's leaf nbytes.",
      "", _decode_table(records, layers, contexts),
      "", "![time vs T and decode time vs context](layer_benchmark.png)", ""]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def write_plot(path: str, result: dict[str, Any]) -> None:
  """Log-log fwd+bwd (and forward) time vs T, temp memory vs T, decode time vs context."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  records = result["records"]
  grid = [r for r in records if r["section"] == "grid"]
  layers = list(result["params"])
  fig, (ax_time, ax_mem, ax_dec) = plt.subplots(1, 3, figsize=(18, 5.5))
  cmap = plt.get_cmap("tab10")
  for i, name in enumerate(layers):
    color = cmap(i % 10)
    for pass_name, style, label in ((FWD_BWD, "o-", name), (FWD, "s:", None)):
      ok = sorted((r["T"], r["median_s"]) for r in grid if r["layer"] == name
                  and r["pass"] == pass_name and r["status"] == "ok")
      if ok:
        ax_time.plot(*zip(*ok), style, color=color, label=label,
                     alpha=1.0 if pass_name == FWD_BWD else 0.5, markersize=4)
    mem = sorted((r["T"], r["temp_bytes"] / 2**20, r["status"] == "ok") for r in grid
                 if r["layer"] == name and r["pass"] == FWD_BWD and r.get("temp_bytes"))
    if mem:
      ax_mem.plot([m[0] for m in mem], [m[1] for m in mem], "-", color=color, label=name)
      for run, marker in ((True, "o"), (False, "x")):
        pts = [m for m in mem if m[2] == run]
        if pts:
          ax_mem.plot([m[0] for m in pts], [m[1] for m in pts], marker, color=color,
                      markersize=5 if run else 9)
    dec = sorted((r["context"], r["step_median_s"] * 1e3, r["loop_per_token_s"] * 1e3)
                 for r in records if r["section"] == "decode" and r["layer"] == name
                 and r["status"] == "ok")
    if dec:
      ax_dec.plot([d[0] for d in dec], [d[1] for d in dec], "o-", color=color, label=name)
      ax_dec.plot([d[0] for d in dec], [d[2] for d in dec], "s:", color=color, alpha=0.6)
  ax_time.plot([], [], "k-", label="fwd+bwd (solid)")
  ax_time.plot([], [], "k:", alpha=0.5, label="forward (dotted)")
  ax_dec.plot([], [], "k-", label="per jitted call (solid)")
  ax_dec.plot([], [], "k:", alpha=0.6, label="per token in a lax.scan (dotted)")
  config = result["config"]
  ax_time.axhline(config["time_budget_s"], color="gray", ls="--", lw=1)
  _report.memory_budget_line(ax_mem, config["memory_budget_gib"])
  for ax, title, xlabel, ylabel in (
      (ax_time, "Layer time vs T", "sequence length T", "median time per call [s]"),
      (ax_mem, "Forward + backward XLA temp memory", "sequence length T", "temp memory [MiB]"),
      (ax_dec, "Decode time per token vs context", "context (tokens in the cache)",
       "time per token [ms]")):
    _report.log_log_axes(ax, title, xlabel, ylabel)
  ax_time.legend(fontsize=7, loc="upper left")
  ax_mem.legend(fontsize=7, loc="lower right")
  ax_dec.legend(fontsize=7, loc="best")
  fig.suptitle(f"Attention layers: B={config['batch']}, d_model={config['d_model']}, "
               f"{config['num_heads']} heads, float32 — "
               f"{_timing.machine_line(result['machine'])}, {result['machine']['date'][:10]}",
               fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Driver.


def run(config: Config, command: str) -> dict[str, Any]:
  """Runs every section and returns the JSON-serialisable result."""
  started = time.perf_counter()
  machine = _timing.machine_info()
  _log(f"Machine: {_timing.machine_line(machine)}")
  probes = [_timing.matmul_gflops(config.matmul_n)]
  _log(f"Dense matmul {config.matmul_n}^2: {probes[0]['gflops']:.1f} GFLOP/s")
  specs = layer_specs(config)
  params = {spec.name: param_count(spec.make(config)) for spec in specs}
  for name, count in params.items():
    _log(f"  {name:24s} {count:,} parameters ({count / params[SOFTMAX]:.4f} x softmax)")

  records: list[dict[str, Any]] = []
  grid = GridRunner(config, specs)
  for length in config.lengths:
    _log(f"T={length}")
    records += grid.measure(length)

  decoder = DecodeRunner(config, specs)
  jobs = [(spec.name, context) for context in config.decode_contexts for spec in specs
          if spec.name in (DCA, SOFTMAX) or context in config.decode_all_contexts]
  _log(f"decode at contexts {', '.join(map(str, config.decode_contexts))}")
  records += decoder.measure(jobs)

  machine["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
  probes.append(_timing.matmul_gflops(config.matmul_n))
  _log(f"Dense matmul {config.matmul_n}^2 (end): {probes[1]['gflops']:.1f} GFLOP/s")
  result = {
      "command": command,
      "machine": machine,
      "config": dataclasses.asdict(config),
      "matmul": {"probes": probes},
      "params": params,
      "options": {spec.name: spec.options for spec in specs},
      "decode_margin": decoder._max_length(0),  # pylint: disable=protected-access
      "records": records,
  }
  result["crossover"] = {p: crossover(records, p) for p in PASSES}
  result["targets"] = targets(config, result)
  result["runtime_s"] = time.perf_counter() - started
  return result


def print_summary(result: dict[str, Any]) -> None:
  """Speed-ups over softmax and the targets, on stdout."""
  for pass_name in PASSES:
    _log(f"\nSpeed-up over softmax, {pass_name} (softmax time / layer time):")
    for name in result["params"]:
      if name != SOFTMAX:
        ratios = speedups(result["records"], name, pass_name)
        _log(f"  {name:24s} " + "  ".join(f"T={t}: {r:.3g}x" for t, r in ratios.items()))
  _report.log_targets(result["targets"], none_text="-")
  _log(f"\nRun time {result['runtime_s'] / 60:.1f} min")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Parses the command line, runs, writes `<out>/layer_benchmark.{json,md,png}`."""
  return _report.main(argv, doc=__doc__, module="experiments.benchmark_layers",
                      stem_name="layer_benchmark", noun="layer", get_config=get_config, run=run,
                      print_summary=print_summary, write_markdown=write_markdown,
                      write_plot=write_plot)


if __name__ == "__main__":
  main()
