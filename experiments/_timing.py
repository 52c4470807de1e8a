"""Timing helpers shared by the benchmarks in `experiments/`.

Benchmarks run on shared, noisy machines, so every helper here is built for ratios measured side
by side rather than for absolute times:

* a function is compiled once (ahead of time, so that XLA's memory figures can be read and a
  too-large program refused before it runs), warmed up once, then timed as the median of
  repeated calls, each ended by `jax.block_until_ready`;
* `time_interleaved` times several contenders round-robin, so a burst of load from another
  process hits them all alike instead of one of them;
* `matmul_gflops` measures the machine's dense-matmul rate in the same run, the yardstick against
  which a kernel's counted FLOP rate is reported.

Example:
  >>> import jax.numpy as jnp
  >>> x = jnp.ones((64, 64))
  >>> compiled = compile_fn(lambda a: a @ a, x)
  >>> memory_stats(compiled)["temp_bytes"] >= 0
  True
  >>> timing = time_interleaved({"mm": lambda: compiled(x)}, repeats=3)
  >>> timing["mm"].repeats >= 3
  True
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import platform
import random
import statistics
import sys
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class Timing:
  """Wall-clock times of one contender.

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
  load from other processes falls on all of them alike. A
  contender whose warm-up call was short gets extra rounds (up to `max_repeats`) so that its
  timed calls add up to at least `min_total_s`: medians of millisecond calls need more samples.
  One whose warm-up call was long gets fewer (at least one) so that they stay within
  `max_total_s`.

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


def time_fn(fn: Callable[..., Any], *args: Any, repeats: int = 5) -> Timing:
  """Median time of `fn(*args)` after one warm-up call (no compilation included).

  Args:
    fn: a compiled or jitted function.
    *args: its arguments.
    repeats: number of timed calls.

  Returns:
    A `Timing`.
  """
  return time_interleaved({"fn": lambda: fn(*args)}, repeats=repeats)["fn"]


def matmul_gflops(n: int = 2048, *, repeats: int = 10, dtype: Any = jnp.float32) -> dict[str, Any]:
  """The machine's dense-matmul rate: an n x n by n x n product, median over `repeats`.

  Args:
    n: matrix size (2 n^3 FLOPs per product).
    repeats: timed products after one warm-up.
    dtype: element type.

  Returns:
    A dict with `n`, `dtype`, `flops` (per product), `median_s` and `gflops` (2 n^3 / median).
  """
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  compiled = compile_fn(jnp.matmul, a, b)
  timing = time_fn(compiled, a, b, repeats=repeats)
  flops = 2 * n**3
  return {"n": n, "dtype": jnp.dtype(dtype).name, "flops": flops, "median_s": timing.median_s,
          "gflops": flops / timing.median_s / 1e9, "times_s": list(timing.times_s)}


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return round(int(line.split()[1]) * 1024 / GIB, 1)
  except OSError:
    pass
  return None


def machine_info() -> dict[str, Any]:
  """What the numbers were measured on: CPU, cores, memory, software versions, backend, date.

  Returns:
    A JSON-serialisable dict.
  """
  try:
    usable_cores = len(os.sched_getaffinity(0))
  except AttributeError:
    usable_cores = os.cpu_count()
  return {
      "cpu_model": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "usable_cores": usable_cores,
      "memory_gib": _memory_gib(),
      "platform": platform.platform(),
      "python": sys.version.split()[0],
      "jax": jax.__version__,
      "jaxlib": _jaxlib_version(),
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      # Load averages over 1, 5, 15 min: a loaded machine explains noisy absolute times.
      "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def _jaxlib_version() -> str | None:
  try:
    import jaxlib  # pylint: disable=import-outside-toplevel
    return jaxlib.__version__
  except (ImportError, AttributeError):
    return None


def machine_line(info: Mapping[str, Any]) -> str:
  """One line describing the machine of `machine_info()`, for Markdown headers."""
  memory = f", {info['memory_gib']} GiB RAM" if info.get("memory_gib") else ""
  return (f"{info['cpu_model']} ({info['usable_cores']} cores{memory}), backend "
          f"{info['backend']}, jax {info['jax']}, Python {info['python']}")


def format_seconds(seconds: float | None) -> str:
  """Human-readable duration: '1.23 ms', '4.5 s'."""
  if seconds is None:
    return "-"
  if seconds < 1e-3:
    return f"{seconds * 1e6:.0f} us"
  if seconds < 1:
    return f"{_three_digits(seconds * 1e3)} ms"
  return f"{_three_digits(seconds)} s"


def _three_digits(x: float) -> str:
  return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def format_bytes(num: float | None) -> str:
  """Human-readable size: '512 KiB', '1.5 GiB'."""
  if num is None:
    return "-"
  for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if num >= size:
      return f"{_three_digits(num / size)} {unit}"
  return f"{int(num)} B"
