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
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.nn import LAYERS, LayerSpec, count_params
from experiments import benchmark, benchmark_cli, report
from experiments.bookkeeping import GIB, log, machine_line

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
  return benchmark_cli.replace_checked(config, overrides)


# ----------------------------------------------------------------------------------------------
# Layers.


@dataclasses.dataclass(frozen=True)
class Layer:
  """A layer under test.

  Attributes:
    name: row label (the class name).
    spec: its entry in the registry of layers (`dca_jax.nn.LAYERS`).
    options: the constructor options it is built with (beyond its defaults), for the record.
    exponent: how its time grows with T (1 linear, 2 quadratic), to predict the next T.
  """

  name: str
  spec: LayerSpec
  options: tuple[tuple[str, Any], ...] = ()
  exponent: int = 1

  def make(self, config: Config) -> nnx.Module:
    """The layer, parameters from `config.seed`."""
    return self.spec.build(config.d_model, config.num_heads, self.options,
                           rngs=nnx.Rngs(config.seed))

  @property
  def options_text(self) -> str:
    return ", ".join(f"{k}={v}" for k, v in self.options)


DCA_DELTA = "DCAttention (memory=delta)"


def layers(config: Config) -> list[Layer]:
  """Every registered layer, in the registry's order; the windowed ones with `config.window`.
  DCA twice: with its default memory and with memory="delta" (row `DCA_DELTA`), whose cost is
  the price of the delta rule's memory."""
  out = []
  for spec in LAYERS.values():
    windowed = "window" in {f.name for f in dataclasses.fields(spec.options)}
    options = (("window", config.window),) if windowed else ()
    out.append(Layer(spec.layer.__name__, spec, options=options,
                     # Softmax attention is the one quadratic layer.
                     exponent=2 if spec.name == "softmax" else 1))
    if spec.name == "dca":
      out.append(Layer(DCA_DELTA, spec, options=options + (("memory", "delta"),)))
  return out


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


def _input(config: Config, length: int, salt: int = 0) -> jax.Array:
  key = jax.random.fold_in(jax.random.key(config.seed + 1), length * 16 + salt)
  return jax.random.normal(key, (config.batch, length, config.d_model), jnp.float32)


# ----------------------------------------------------------------------------------------------
# Forward and fwd+bwd grid.


def split_layers(config: Config, under_test: list[Layer] | None = None
                 ) -> tuple[dict[str, Any], dict[str, int]]:
  """({name: (layer, graphdef, state)}, {name: parameter count}) of `under_test` (default: every
  layer), each built once for a whole grid."""
  splits, params = {}, {}
  for layer in layers(config) if under_test is None else under_test:
    module = layer.make(config)
    params[layer.name] = count_params(module)
    splits[layer.name] = (layer, *nnx.split(module))
  return splits, params


def measure_lengths(runner: benchmark.Runner, config: Config, splits: dict[str, Any],
                    lengths: tuple[int, ...], *, peers: dict[str, Any] | None = None,
                    peer: Any = None, deadline: float | None = None
                    ) -> tuple[list[dict[str, Any]], list[int]]:
  """`measure_grid` at each T of `lengths` in turn; (records, the T not started because
  `time.monotonic()` had passed `deadline`). `peer` (a `torch_peer.PeerProcess`, if any) is
  closed at the end, whatever happens."""
  records, not_run = [], []
  try:
    for length in lengths:
      if deadline is not None and time.monotonic() > deadline:
        not_run.append(length)
        continue
      log(f"layers T={length}")
      records += measure_grid(runner, config, splits, length, peers=peers, count=True)
  finally:
    if peer is not None:
      peer.close()
  return records, not_run


def measure_grid(runner: benchmark.Runner, config: Config, splits: dict[str, Any],
                 length: int, peers: dict[str, Any] | None = None,
                 count: bool = False) -> list[dict[str, Any]]:
  """Runs every (layer, pass) at one T, interleaved; one record per pair.

  Args:
    runner: the run's runner (it remembers which layers ran out of time budget).
    config: the run's config.
    splits: layer name -> (layer, graphdef, state), the layers split once for the whole grid.
    length: T.
    peers: name -> (x as NumPy -> {pass name: thunk}, exponent): layers outside JAX (the torch
      peer), timed in the same rounds as the JAX layers.
    count: count the JAX layers' FLOPs (and their achieved rate).
  """
  x = _input(config, length)
  records, cases = [], []
  for name, (make_calls, exponent) in (peers or {}).items():
    calls = make_calls(jax.device_get(x))
    for pass_name in PASSES:
      record = {"section": "grid", "layer": name, "pass": pass_name, "T": length,
                "status": "ok", "reason": None}
      records.append(record)
      cases.append(benchmark.Case(name, pass_name, record, thunk=calls[pass_name],
                                  exponent=exponent))
  for name, (layer, graphdef, state) in splits.items():
    for pass_name in PASSES:
      record = {"section": "grid", "layer": name, "pass": pass_name, "T": length,
                "status": "ok", "reason": None}
      records.append(record)
      fn = forward_fn(graphdef) if pass_name == FWD else fwd_bwd_fn(graphdef)
      cases.append(benchmark.Case(name, pass_name, record, fn=fn, args=(state, x),
                                  exponent=layer.exponent))
  runner.measure(cases, length,
                 repeats=config.big_repeats if length >= config.big_t else config.repeats,
                 min_total_s=config.min_total_s, max_repeats=config.max_repeats,
                 max_total_s=config.max_timed_s, seed=config.seed + length, count=count)
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

  def __init__(self, config: Config, layers_under_test: list[Layer]):
    self.config = config
    self.layers = {layer.name: layer for layer in layers_under_test}
    self.budget_bytes = int(config.memory_budget_gib * GIB)
    self.last_prefill: dict[str, tuple[int, float]] = {}

  def max_length(self, context: int) -> int:
    """The caches' length at `context`: room for every decode step after the prefill."""
    c = self.config
    return context + max(c.decode_warmup + 1 + c.decode_steps, c.loop_steps)

  def _prepare(self, under_test: Layer, context: int,
               record: dict[str, Any]) -> dict[str, Any] | None:
    """Prefills one layer's cache to `context` and compiles its step and loop; None if skipped."""
    config = self.config
    if under_test.name in self.last_prefill:
      last_c, last_s = self.last_prefill[under_test.name]
      predicted = last_s * (context / last_c)**under_test.exponent
      if predicted > config.prefill_budget_s:
        record.update(status="skipped", reason=(
            f"time budget: prefill predicted {predicted:.0f} s > {config.prefill_budget_s:.0f} s"))
        return None
    layer = under_test.make(config)
    graphdef, state = nnx.split(layer)
    cache = layer.init_cache(config.batch, self.max_length(context))
    record["cache_bytes_empty"] = benchmark.tree_bytes(cache)
    chunk = min(config.prefill_chunk, context)
    x = _input(config, context, salt=1)
    start = time.perf_counter()
    prefill = benchmark.compile_fn(_prefill_fn(graphdef), state, x[:, :chunk], cache)
    temp = benchmark.memory_stats(prefill)["temp_bytes"]
    record["prefill_temp_bytes"] = temp
    if temp is not None and temp > self.budget_bytes:
      record.update(status="skipped", reason=(
          f"memory budget: prefill chunk XLA temp {report.format_bytes(temp)} > "
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
    self.last_prefill[under_test.name] = (context, prefill_s)
    record.update(prefill_s=prefill_s, prefill_compile_s=compile_s, prefill_chunk=chunk,
                  cache_bytes=benchmark.tree_bytes(cache), max_length=self.max_length(context))
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
    loop = benchmark.compile_fn(_loop_fn(graphdef), state, loop_xs, cache)
    record["step_compile_s"] = time.perf_counter() - start
    record["step_temp_bytes"] = benchmark.memory_stats(step)["temp_bytes"]
    record["loop_temp_bytes"] = benchmark.memory_stats(loop)["temp_bytes"]
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
        ready = self._prepare(self.layers[name], context, record)
      except Exception as error:  # pylint: disable=broad-except  # recorded, run goes on
        record.update(status="error", reason=f"{type(error).__name__}: {error}")
        ready = None
      if ready is None:
        log(f"  {name:24s} context={context}: {record['status']} ({record['reason']})")
        continue
      prepared[f"{name}@{context}"] = (ready, record)
      log(f"  {name:24s} context={context:>6d}: prefilled in {record['prefill_s']:.1f} s, cache "
           f"{report.format_bytes(record['cache_bytes'])}")
    if not prepared:
      return records
    log(f"  timing {len(prepared)} decoders interleaved")
    for _ in range(config.decode_warmup):
      for ready, _ in prepared.values():
        jax.block_until_ready(ready["stepper"]())
    finite = {}
    per_call = benchmark.time_interleaved(
        {label: ready["stepper"] for label, (ready, _) in prepared.items()},
        repeats=config.decode_steps, max_repeats=config.decode_steps, seed=config.seed,
        inspect=lambda label, out: finite.__setitem__(label, benchmark.all_finite(out[0])))
    in_loop = benchmark.time_interleaved(
        {label: ready["loop"] for label, (ready, _) in prepared.items()},
        repeats=config.loop_repeats, min_total_s=config.loop_min_total_s,
        max_repeats=config.loop_max_repeats, seed=config.seed + 1,
        inspect=lambda label, out: finite.__setitem__(
            label, finite[label] and benchmark.all_finite(out[0])))
    for label, (ready, record) in prepared.items():
      timing, loop = per_call[label], in_loop[label]
      stepper = ready["stepper"]
      record.update(step=timing.to_json(), step_median_s=timing.median_s, step_min_s=timing.min_s,
                    loop=loop.to_json(), loop_steps=config.loop_steps,
                    loop_per_token_s=loop.median_s / config.loop_steps, finite=finite[label],
                    position_after=int(stepper.cache.position)
                    if hasattr(stepper.cache, "position") else None)
      log(f"  {record['layer']:24s} context={record['context']:>6d}: "
           f"{report.format_seconds(timing.median_s):>9s} per call (x{timing.repeats}), "
           f"{report.format_seconds(record['loop_per_token_s']):>9s} per token in a scan, "
           f"cache {report.format_bytes(record['cache_bytes'])}"
           f"{'' if finite[label] else '  NOT FINITE'}")
    return records


# ----------------------------------------------------------------------------------------------
# Analysis.


def _key(layer: str, pass_name: str, length: int) -> dict[str, Any]:
  return {"section": "grid", "layer": layer, "pass": pass_name, "T": length}


def _find(records, layer, pass_name, length):
  return benchmark.find(records, _key(layer, pass_name, length))


def _median(records, layer, pass_name, length, stat="median_s"):
  return benchmark.median(records, _key(layer, pass_name, length), stat)


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
  r = benchmark.find(records, {"section": "decode", "layer": layer, "context": context})
  return r if r and r["status"] == "ok" else None


def targets(config: Config, result: dict[str, Any]) -> list[dict[str, Any]]:
  """The issue's targets, each with its numbers and PASS / MISS (or N/A, INFO)."""
  records = result["records"]
  out = []
  fmt = report.format_seconds

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
          f"{report.format_bytes(b['cache_bytes'])} vs {report.format_bytes(a['cache_bytes'])}",
          status="INFO")
  return out


# ----------------------------------------------------------------------------------------------
# Reports.


def _grid_table(records, layers, lengths, pass_name, cell):
  return report.grid_table("layer", layers, lengths,
                            lambda name, t: cell(_find(records, name, pass_name, t)))


def _speedup_table(records, layers, lengths, pass_name):
  ratios = {name: speedups(records, name, pass_name) for name in layers if name != SOFTMAX}
  return report.grid_table("layer", list(ratios), lengths,
                            lambda name, t: f"{ratios[name][t]:.3g}x" if t in ratios[name] else "")


def _decode_table(records, layers, contexts):
  fmt = report.format_seconds
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
          f"({report.format_bytes(r['cache_bytes'])}) | {fmt(r['prefill_s'])} | "
          f"{report.format_bytes(r.get('step_temp_bytes'))} |")
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

  def table(pass_name, cell):
    if cell is None:
      return _speedup_table(grid, layers, lengths, pass_name)
    return _grid_table(grid, layers, lengths, pass_name, cell)

  lines = [
      "# Layer benchmark",
      "",
      f"Produced by `{result['command']}`. Every number here is regenerated by "
      "`python -m experiments.benchmark_layers` (~15-20 min on a quiet 2-core CPU; `--quick` "
      "runs a ~2-3 min subset; `--render-only` rewrites this file and the plot from the JSON).",
      "",
      f"Machine: {machine_line(machine)}. Date: {machine['date']}. "
      f"Run time: {result['runtime_s'] / 60:.1f} min. " + report.matmul_text(probes)
      + report.load_text(machine),
      "",
      f"Setup: B={config['batch']}, d_model={config['d_model']}, {config['num_heads']} heads, "
      f"float32, jit; each layer with its defaults (DCA: W={config['window']}, its default "
      f"Taylor feature map; sliding window: W={config['window']}; GLA: expand_k 0.5, "
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
  lines += report.targets_section(result["targets"], _target_text)
  lines += ["", "## Parameters", "", "| layer | parameters | / softmax | options |",
            "|---|---:|---:|---|"]
  for name, count in result["params"].items():
    lines.append(f"| {name} | {count:,} | {count / result['params'][SOFTMAX]:.4f} | "
                 f"{result['options'].get(name) or 'defaults'} |")
  sections = [
      ("Forward + backward: speed-up over softmax (softmax time / layer time; > 1 is faster)",
       FWD_BWD, None),
      ("Forward: speed-up over softmax (softmax time / layer time)", FWD, None),
      ("Forward + backward time", FWD_BWD, report.cell_time),
      ("Forward time", FWD, report.cell_time),
      ("Forward + backward XLA temp memory", FWD_BWD, report.cell_memory),
      ("Forward XLA temp memory", FWD, report.cell_memory),
  ]
  lines += report.grid_sections(table, sections)
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
  plt = report.pyplot()

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
  report.memory_budget_line(ax_mem, config["memory_budget_gib"])
  for ax, title, xlabel, ylabel in (
      (ax_time, "Layer time vs T", "sequence length T", "median time per call [s]"),
      (ax_mem, "Forward + backward XLA temp memory", "sequence length T", "temp memory [MiB]"),
      (ax_dec, "Decode time per token vs context", "context (tokens in the cache)",
       "time per token [ms]")):
    report.log_log_axes(ax, title, xlabel, ylabel)
  ax_time.legend(fontsize=7, loc="upper left")
  ax_mem.legend(fontsize=7, loc="lower right")
  ax_dec.legend(fontsize=7, loc="best")
  report.finish_plot(fig, path, f"Attention layers: B={config['batch']}, "
                     f"d_model={config['d_model']}, {config['num_heads']} heads, float32",
                     result["machine"])


# ----------------------------------------------------------------------------------------------
# Driver.


def run(config: Config, command: str) -> dict[str, Any]:
  """Runs every section and returns the JSON-serialisable result."""
  session = benchmark.Session(config.matmul_n)
  under_test = layers(config)
  splits, params = split_layers(config, under_test)
  for name, count in params.items():
    log(f"  {name:24s} {count:,} parameters ({count / params[SOFTMAX]:.4f} x softmax)")

  records: list[dict[str, Any]] = []
  # A compilation can take a minute: a layer over the time budget is not even compiled beyond.
  runner = benchmark.Runner(memory_budget_gib=config.memory_budget_gib,
                            time_budget_s=config.time_budget_s, compile_exhausted=False)
  for length in config.lengths:
    log(f"T={length}")
    records += measure_grid(runner, config, splits, length)

  decoder = DecodeRunner(config, under_test)
  jobs = [(layer.name, context) for context in config.decode_contexts for layer in under_test
          if layer.name in (DCA, SOFTMAX) or context in config.decode_all_contexts]
  log(f"decode at contexts {', '.join(map(str, config.decode_contexts))}")
  records += decoder.measure(jobs)

  session.finish()
  result = {
      "command": command,
      "machine": session.machine,
      "config": dataclasses.asdict(config),
      "matmul": {"probes": session.probes},
      "params": params,
      "options": {layer.name: layer.options_text for layer in under_test},
      "decode_margin": decoder.max_length(0),
      "records": records,
  }
  result["crossover"] = {p: crossover(records, p) for p in PASSES}
  result["targets"] = targets(config, result)
  result["runtime_s"] = session.runtime_s
  return result


def print_summary(result: dict[str, Any]) -> None:
  """Speed-ups over softmax and the targets, on stdout."""
  for pass_name in PASSES:
    log(f"\nSpeed-up over softmax, {pass_name} (softmax time / layer time):")
    for name in result["params"]:
      if name != SOFTMAX:
        ratios = speedups(result["records"], name, pass_name)
        log(f"  {name:24s} " + "  ".join(f"T={t}: {r:.3g}x" for t, r in ratios.items()))
  report.log_targets(result["targets"], none_text="-")
  log(f"\nRun time {result['runtime_s'] / 60:.1f} min")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Parses the command line, runs, writes `<out>/layer_benchmark.{json,md,png}`."""
  return benchmark_cli.main(argv, doc=__doc__, module="experiments.benchmark_layers",
                      stem_name="layer_benchmark", noun="layer", get_config=get_config, run=run,
                      print_summary=print_summary, write_markdown=write_markdown,
                      write_plot=write_plot)


if __name__ == "__main__":
  main()
