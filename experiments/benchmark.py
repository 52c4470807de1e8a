"""The one benchmark runner of `experiments/`: compile, guard, time side by side, record.

Benchmarks run on shared, noisy machines, so everything here is built for ratios measured side
by side rather than for absolute times:

* a function is compiled once, ahead of time (`compile_fn`), so that XLA's memory figures can be
  read (`memory_stats`) and a too-large program refused before it runs;
* the cases of one size are timed round-robin (`time_interleaved`), in a fresh random order each
  round, so that a burst of load from another process hits them all alike; each figure is the
  median of the timed calls after one warm-up call, each call ended by `jax.block_until_ready`;
* a case whose call took longer than the time budget (or is predicted to take twice that, from
  how its cost grows) is not run at larger sizes, and the warm-up output is checked for NaNs;
* `matmul_gflops` measures the machine's dense-matmul rate in the same run, the yardstick against
  which a kernel's counted FLOP rate is reported.

`Runner` does all of this for a list of `Case`s, filling in each case's record; the engine and
layer benchmarks, the suite's speed measurement (`suite_speed`) and the demo all use it.
`Session` is the bookkeeping around a benchmark run (the machine, the matmul rate at its start and
end, its run time); `tree_bytes` is how the bytes of a cache or of parameters are counted;
`find` and `median` read records back.

Example:
  >>> import jax.numpy as jnp
  >>> x = jnp.ones((64, 64))
  >>> record = {}
  >>> Runner(log_width=None).measure([Case("mm", "fwd", record, fn=lambda a: a @ a, args=(x,))],
  ...                                64, repeats=3)
  >>> record["status"], len(record["times_s"]) >= 3, record["temp_bytes"] >= 0, record["finite"]
  ('ok', True, True, True)
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random
import statistics
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from dca_jax.flops import count_flops
from experiments.bookkeeping import GIB, load_average, log, machine_info, machine_line
from experiments.report import format_bytes, format_seconds


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock times of one case.

  Attributes:
    median_s: median of the timed calls, in seconds (the figure to report).
    min_s: fastest timed call, in seconds.
    warmup_s: the first call after compilation (not part of the median).
    times_s: every timed call, in seconds, in the order they ran.
  """

  median_s: float
  min_s: float
  warmup_s: float
  times_s: tuple[float, ...]

  @property
  def repeats(self) -> int:
    return len(self.times_s)

  def to_json(self) -> dict[str, Any]:
    return {"median_s": self.median_s, "min_s": self.min_s, "warmup_s": self.warmup_s,
            "times_s": list(self.times_s)}


def compile_fn(fn: Callable[..., Any], *args: Any) -> Any:
  """Compiles `jax.jit(fn)` for `args` ahead of time.

  Args:
    fn: the function to compile (it is wrapped in `jax.jit`; an already jitted one is fine).
    *args: example arguments (arrays or `jax.ShapeDtypeStruct`s).

  Returns:
    The compiled executable: call it with arrays of the same shapes and dtypes as `args`.
  """
  return jax.jit(fn).lower(*args).compile()


def memory_stats(compiled: Any) -> dict[str, int | None]:
  """XLA's memory figures for a compiled executable.

  Args:
    compiled: the result of `compile_fn` (a `jax.stages.Compiled`).

  Returns:
    A dict with `temp_bytes` (XLA's temporary buffers, `temp_size_in_bytes`: the working memory
    beyond arguments and outputs), `argument_bytes`, `output_bytes` and `generated_code_bytes`;
    values are None where the backend gives no analysis.
  """
  keys = {"temp_bytes": "temp_size_in_bytes", "argument_bytes": "argument_size_in_bytes",
          "output_bytes": "output_size_in_bytes",
          "generated_code_bytes": "generated_code_size_in_bytes"}
  try:
    analysis = compiled.memory_analysis()
  except (NotImplementedError, AttributeError, RuntimeError):
    analysis = None
  if isinstance(analysis, (list, tuple)):  # Some versions return one entry per device.
    analysis = analysis[0] if analysis else None
  return {name: (None if analysis is None else int(getattr(analysis, attr, 0) or 0))
          for name, attr in keys.items()}


def tree_bytes(tree: Any) -> int:
  """Bytes of a pytree's array leaves (arrays or `jax.ShapeDtypeStruct`s: a cache, parameters)."""
  return int(sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(tree)))


def all_finite(tree: Any) -> bool:
  """Whether every floating leaf of `tree` is free of NaN and infinity."""
  return bool(all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree)
                  if jnp.issubdtype(x.dtype, jnp.floating)))


def _call_once(thunk: Callable[[], Any]) -> tuple[float, Any]:
  start = time.perf_counter()
  out = jax.block_until_ready(thunk())
  return time.perf_counter() - start, out


def time_interleaved(thunks: Mapping[str, Callable[[], Any]], *, repeats: int = 5,
                     min_total_s: float = 0.0, max_repeats: int = 50,
                     max_total_s: float | None = None, shuffle: bool = True, seed: int = 0,
                     inspect: Callable[[str, Any], None] | None = None) -> dict[str, Timing]:
  """Times several contenders round-robin and returns the median of each.

  Every thunk is called once to warm up (in order), then the thunks are called in turn, one
  round after another (in a fresh random order each round unless `shuffle` is false), so that
  load from other processes falls on all of them alike. A contender whose warm-up call was short
  gets extra rounds (up to `max_repeats`) so that its timed calls add up to at least
  `min_total_s`: medians of millisecond calls need more samples. One whose warm-up call was long
  gets fewer (at least one) so that they stay within `max_total_s`.

  Args:
    thunks: name -> a function of no argument that runs the computation (results are waited for
      with `jax.block_until_ready`).
    repeats: timed calls per contender, at least.
    min_total_s: target total timed duration per contender (0 for exactly `repeats` calls).
    max_repeats: cap on the timed calls per contender.
    max_total_s: cap on the expected total timed duration per contender (None: no cap).
    shuffle: call the contenders in a new random order each round.
    seed: seed of that order.
    inspect: called as `inspect(name, output)` with the output of each warm-up call (e.g. to
      check that it is finite) before the next call, so that no output is kept alive.

  Returns:
    name -> `Timing`.
  """
  warmup = {}
  for name, thunk in thunks.items():
    warmup[name], out = _call_once(thunk)
    if inspect is not None:
      inspect(name, out)
    del out
  wanted = {}
  for name, first in warmup.items():
    extra = math.ceil(min_total_s / max(first, 1e-6)) if min_total_s > 0 else 0
    wanted[name] = max(repeats, min(max_repeats, extra))
    if max_total_s is not None:
      wanted[name] = max(1, min(wanted[name], math.floor(max_total_s / max(first, 1e-6))))
  times: dict[str, list[float]] = {name: [] for name in thunks}
  order = list(thunks)
  rng = random.Random(seed)
  for round_index in range(max(wanted.values(), default=0)):
    if shuffle:
      # Whichever call follows a long, memory-hungry one pays for it on a loaded machine
      # (scheduler debt, freed pages); a fresh order each round spreads that cost evenly.
      rng.shuffle(order)
    for name in order:
      if round_index < wanted[name]:
        times[name].append(_call_once(thunks[name])[0])
  return {name: Timing(statistics.median(ts), min(ts), warmup[name], tuple(ts))
          for name, ts in times.items()}


def matmul_gflops(n: int = 2048, *, repeats: int = 10, dtype: Any = jnp.float32) -> dict[str, Any]:
  """The machine's dense-matmul rate: an n x n by n x n product, median over `repeats`.

  Args:
    n: matrix size (2 n^3 FLOPs per product).
    repeats: timed products after one warm-up.
    dtype: element type.

  Returns:
    A dict with `n`, `dtype`, `flops` (per product), `median_s` and `gflops` (2 n^3 / median).
  """
  return {"n": n, **_product_rate((n, n), repeats, dtype)}


def batched_matmul_gflops(batch: int = 64, n: int = 64, *, repeats: int = 50,
                          dtype: Any = jnp.float32) -> dict[str, Any]:
  """The rate of many small products: a [batch, n, n] by [batch, n, n] batched matmul, median
  over `repeats` (the shape of the window's and the chunked engine's blocks: 4 heads x 16
  blocks of 64 tokens at T = 1024, K = 64). Returns the dict `matmul_gflops` returns, with
  `batch`."""
  return {"batch": batch, "n": n, **_product_rate((batch, n, n), repeats, dtype)}


def _product_rate(shape: tuple[int, ...], repeats: int, dtype: Any) -> dict[str, Any]:
  """`jnp.matmul` of two random arrays of `shape` (square in the last two dims), timed."""
  a = jax.random.normal(jax.random.key(0), shape, dtype)
  b = jax.random.normal(jax.random.key(1), shape, dtype)
  compiled = compile_fn(jnp.matmul, a, b)
  timing = time_interleaved({"matmul": lambda: compiled(a, b)}, repeats=repeats)["matmul"]
  flops = 2 * math.prod(shape) * shape[-1]
  return {"dtype": jnp.dtype(dtype).name, "flops": flops, "median_s": timing.median_s,
          "gflops": flops / timing.median_s / 1e9, "times_s": list(timing.times_s)}


# ----------------------------------------------------------------------------------------------
# The runner.


@dataclasses.dataclass
class Case:
  """One thing to time at one size.

  Either `fn` and `args` (the runner compiles `fn` for `args` ahead of time, reads XLA's memory
  figures, optionally counts FLOPs, and times `compiled(*args)`), or `thunk`, a ready call of no
  argument (for calls that carry state from one call to the next: an optimiser step whose
  parameters are donated, a decode step whose cache is); a thunk compiles in its warm-up call.

  Attributes:
    name: the contender's name; with `pass_name`, the key of its time budget, and the log label.
    pass_name: which computation of the contender ("fwd", "fwd+bwd", "train", ...).
    record: the dict the runner fills in (the caller's record, already in its list): status,
      reason, compile_s, temp_bytes and the other `memory_stats`, flops, the `Timing` fields and
      `finite`.
    fn: the function to compile and time.
    args: its arguments.
    thunk: a ready call instead of `fn` and `args`.
    exponent: how the case's time grows with the size (1 linear, 2 quadratic), to predict the
      next size's time.
    exempt: never skipped for time (the targets need it, whatever the load).
  """

  name: str
  pass_name: str
  record: dict[str, Any]
  fn: Callable[..., Any] | None = None
  args: tuple[Any, ...] = ()
  thunk: Callable[[], Any] | None = None
  exponent: int = 1
  exempt: bool = False

  @property
  def key(self) -> tuple[str, str]:
    return self.name, self.pass_name


class Runner:
  """Compiles, guards, times and records cases; remembers which ran out of time budget.

  Args:
    memory_budget_gib: cases whose XLA temporary memory exceeds this are compiled, not run
      (None: no limit).
    time_budget_s: a case whose call took longer than this at some size is not run at larger
      sizes, nor one predicted to take more than twice this (None: no limit).
    compile_exhausted: compile (to record its memory) a case already over the time budget at a
      smaller size; False skips it at once (a compilation can take a minute).
    log_width: width of the name column of the log lines; None: no log.
  """

  def __init__(self, *, memory_budget_gib: float | None = None,
               time_budget_s: float | None = None, compile_exhausted: bool = True,
               log_width: int | None = 24):
    self.memory_budget_gib = memory_budget_gib
    self.time_budget_s = time_budget_s
    self.compile_exhausted = compile_exhausted
    self.log_width = log_width
    self.last_time: dict[tuple[str, str], tuple[int, float]] = {}   # key -> (size, s)
    self.exhausted: dict[tuple[str, str], str] = {}                  # key -> reason

  def _log(self, case: Case, text: str) -> None:
    if self.log_width is not None:
      log(f"  {case.name:{self.log_width}s} {case.pass_name:7s} {text}")

  def time_skip(self, case: Case, size: int) -> str | None:
    """Why `case` should not run at `size` for time, or None."""
    if case.exempt or self.time_budget_s is None:
      return None
    if case.key in self.exhausted:
      return self.exhausted[case.key]
    if case.key in self.last_time:
      last_size, last_s = self.last_time[case.key]
      predicted = last_s * (size / last_size)**case.exponent
      # A call predicted at more than twice the budget would cost minutes for one number.
      if predicted > 2 * self.time_budget_s:
        return (f"time budget: predicted {predicted:.0f} s per call from {last_s:.2f} s at "
                f"T={last_size} (budget {self.time_budget_s:.0f} s)")
    return None

  def _prepare(self, case: Case, size: int, count: bool) -> Callable[[], Any] | None:
    """The call to time, after the compilation and the guards; None when it is not to run."""
    record = case.record
    record.setdefault("status", "ok")
    record.setdefault("reason", None)
    time_reason = self.time_skip(case, size)
    if time_reason and not self.compile_exhausted and case.key in self.exhausted:
      record.update(status="skipped", reason=time_reason)
      self._log(case, f"T={size}: skipped ({time_reason})")
      return None
    thunk = case.thunk
    if thunk is None:
      start = time.perf_counter()
      try:
        compiled = compile_fn(case.fn, *case.args)
      except Exception as error:  # pylint: disable=broad-except  # recorded, run goes on
        record.update(status="error", reason=f"compile failed: {type(error).__name__}: {error}")
        self._log(case, f"T={size}: {record['reason']}")
        return None
      record["compile_s"] = time.perf_counter() - start
      record.update(memory_stats(compiled))
      if count:
        try:
          # Arguments may be pytrees (a layer's nnx.State): abstract every leaf.
          flops = count_flops(case.fn, *jax.tree.map(
              lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), list(case.args)))
          record.update(flops=flops.flops, matmul_flops=flops.matmul_flops,
                        transcendentals=flops.transcendentals)
        except Exception as error:  # pylint: disable=broad-except
          record["flops_error"] = f"{type(error).__name__}: {error}"
      thunk = functools.partial(compiled, *case.args)
    temp = record.get("temp_bytes")
    if (self.memory_budget_gib is not None and temp is not None
        and temp > self.memory_budget_gib * GIB):
      record.update(status="skipped", reason=(
          f"memory budget: XLA temp {format_bytes(temp)} > {self.memory_budget_gib:g} GiB"))
    elif time_reason:
      record.update(status="skipped", reason=time_reason)
    if record["status"] != "ok":
      self._log(case, f"T={size}: skipped ({record['reason']})")
      return None
    return thunk

  def measure(self, cases: list[Case], size: int = 0, *, repeats: int, min_total_s: float = 0.0,
              max_repeats: int = 50, max_total_s: float | None = None, seed: int = 0,
              count: bool = False) -> None:
    """Runs every case at one size, interleaved (see `time_interleaved`), filling its record.

    Args:
      cases: the cases; their names and passes must be distinct.
      size: the size they run at (T), for the time budget and the log.
      repeats, min_total_s, max_repeats, max_total_s, seed: see `time_interleaved`.
      count: count each compiled case's FLOPs (`dca_jax.flops.count_flops`), and its counted
        FLOP rate once timed (`gflops`).
    """
    ready, finite = {}, {}
    for case in cases:
      thunk = self._prepare(case, size, count)
      if thunk is not None:
        ready[case.key] = (thunk, case)
    if not ready:
      return
    timings = time_interleaved(
        {key: thunk for key, (thunk, _) in ready.items()}, repeats=repeats,
        min_total_s=min_total_s, max_repeats=max_repeats, max_total_s=max_total_s, seed=seed,
        inspect=lambda key, out: finite.__setitem__(key, all_finite(out)))
    for key, (_, case) in ready.items():
      timing, record = timings[key], case.record
      record.update(timing.to_json())
      record["finite"] = finite[key]
      if "flops" in record:
        record["gflops"] = record["flops"] / timing.median_s / 1e9
      self.last_time[key] = (size, timing.median_s)
      if self.time_budget_s is not None and timing.median_s > self.time_budget_s:
        self.exhausted[key] = (f"time budget: {timing.median_s:.1f} s per call at T={size} "
                               f"> {self.time_budget_s:.0f} s")
      self._log(case, f"T={size:>7d}: {format_seconds(timing.median_s):>9s} (x{timing.repeats}) "
                f"temp {format_bytes(record.get('temp_bytes')):>9s}"
                f"{'' if finite[key] else '  NOT FINITE'}")


# ----------------------------------------------------------------------------------------------
# Around a run, and reading records back.


class Session:
  """The bookkeeping around a benchmark run: the machine, the matmul rate at start and end.

  Created at the start of the run (it records the machine and measures the dense-matmul rate);
  `finish()` at its end records the load and measures the rate again.

  Attributes:
    machine: `bookkeeping.machine_info()`, plus `load_average_end` after `finish()`.
    probes: the `matmul_gflops` results, at the start and (after `finish()`) the end.
  """

  def __init__(self, matmul_n: int):
    self.started = time.perf_counter()
    self.matmul_n = matmul_n
    self.machine = machine_info()
    log(f"Machine: {machine_line(self.machine)}")
    self.probes = [matmul_gflops(matmul_n)]
    log(f"Dense matmul {matmul_n}^2: {self.probes[0]['gflops']:.1f} GFLOP/s")

  def finish(self) -> None:
    self.machine["load_average_end"] = load_average()
    self.probes.append(matmul_gflops(self.matmul_n))
    log(f"Dense matmul {self.matmul_n}^2 (end): {self.probes[1]['gflops']:.1f} GFLOP/s")

  @property
  def runtime_s(self) -> float:
    return time.perf_counter() - self.started


def find(records, match: Mapping[str, Any]) -> dict[str, Any] | None:
  """The first record whose fields include `match` (e.g. {"contender": "chunked", "T": 256})."""
  for r in records:
    if all(r.get(k) == v for k, v in match.items()):
      return r
  return None


def median(records, match: Mapping[str, Any], stat: str = "median_s") -> float | None:
  """`stat` of the record `find` gives, when that record ran; else None."""
  r = find(records, match)
  return r[stat] if r and r["status"] == "ok" else None
