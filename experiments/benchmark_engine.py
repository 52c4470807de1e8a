"""Benchmark of the gated linear attention engine against window and softmax attention.

Launch (regenerates docs/engine_benchmark.{json,md,png}):

    python -m experiments.benchmark_engine            # full run, ~20-25 min on a 2-core CPU
    python -m experiments.benchmark_engine --quick    # subset, ~2-3 min (smoke / CI)
    python -m experiments.benchmark_engine --quick --out /tmp/bench   # elsewhere

Expected cost: the full run peaks at about 6 GiB of XLA temporary memory (the softmax baseline at
T = 8192, fwd+bwd) plus ~5 GiB of inputs and outputs at T = 2^20; nothing larger than
`--memory-budget-gib` (default 6) is ever run.

What is measured (B=1, H=4, K=V=64, float32, jit on the default backend):

* for T = 256 ... 32768, forward and forward+backward wall time (median of repeats after one
  warm-up, contenders interleaved round-robin at each T) and XLA's temporary-memory figure
  (`compiled.memory_analysis().temp_size_in_bytes`) of every form of
  `dca_jax.gated_linear_attention` (chunked and recurrent with per-head and with per-channel
  decay, associative up to T = 4096, quadratic up to T = 2048), of
  `dca_jax.delta_rule_attention` (chunked and recurrent, unit keys, beta = 1/2), of
  `dca_jax.sliding_window_attention` (W = 64) and of
  `jax.nn.dot_product_attention(..., is_causal=True)`, the softmax baseline;
* the linear forms at T = 2^16, 2^18 and 2^20 (chunked and recurrent forward, with a check that
  the output is finite; chunked fwd+bwd at 2^16);
* a planner sweep at T = 8 ... 512 (quadratic, recurrent, chunked with C = 32, 64, 128) that
  checks the rule of `dca_jax.plan_engine`;
* a dense 2048 x 2048 float32 matmul's GFLOP/s, against which the chunked form's counted FLOP
  rate (`dca_jax.flops.count_flops` / time) is reported;
* the issue's ratio targets, all from the same run.

Guards: every program is compiled first and skipped (and recorded as such, with its temporary
bytes) when its temporary memory exceeds the budget; a contender whose call took longer than
`--time-budget-s` at some T (or is predicted to take twice that, from its complexity) is not run
at larger T, except where the targets need it (T <= 8192 for chunked, recurrent, window and
softmax). Slow calls get fewer timed repeats (at least one after the warm-up).

The machine may be shared: the numbers to trust are the ratios, measured side by side.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from dca_jax import (delta_rule_attention, gated_linear_attention, plan_engine,
                     sliding_window_attention)
from experiments import benchmark, benchmark_cli, report
from experiments.bookkeeping import GIB, log, machine_line

FWD = "fwd"
FWD_BWD = "fwd+bwd"
PASSES = (FWD, FWD_BWD)
# (contender, pass) pairs timed on their own from T = ISOLATE_FROM_T (see `run`).
ISOLATED = {("recurrent", FWD_BWD), ("recurrent (per-channel decay)", FWD_BWD),
            ("delta rule, recurrent", FWD_BWD)}
ISOLATE_FROM_T = 8192


@dataclasses.dataclass(frozen=True)
class Config:
  """One benchmark run.

  Attributes:
    batch, heads, key_dim, value_dim: B, H, K, V.
    window: W of the sliding-window contender.
    lengths: T of the main grid (both passes).
    full_grid_max_t: above this T only the contenders the targets need (chunked, recurrent,
      sliding window, softmax) run; None: all contenders at every T.
    long_lengths: T beyond the grid, linear forms only.
    long_fwd_bwd_lengths: long T at which the chunked fwd+bwd is run (timed and its memory read).
    repeats: timed calls per contender and T.
    big_repeats: timed calls from `big_t` on.
    big_t: see `big_repeats`.
    huge_t: from this T on, a single timed call.
    min_total_s: fast contenders get extra calls until their timed calls add up to this.
    max_repeats: cap on those extra calls.
    max_timed_s: slow contenders get fewer timed calls (at least one) to stay within this.
    time_budget_s: a contender whose call took longer than this at some T is not run beyond.
    memory_budget_gib: programs with more XLA temporary memory than this are not run.
    associative_max_t: largest T for the associative form (its memory is O(T K V)).
    quadratic_max_t: largest T for the quadratic form (O(T^2)).
    planner_lengths: T of the planner sweep (empty to skip it).
    planner_chunks: chunk sizes of the planner sweep.
    planner_min_total_s: `min_total_s` of the planner sweep.
    planner_slack: the planner's pick is flagged when slower than the best by more than this.
    ratio_t: T at which the speed targets are checked.
    matmul_n: size of the dense-matmul probe.
    seed: PRNG seed of the inputs.
  """

  batch: int = 1
  heads: int = 4
  key_dim: int = 64
  value_dim: int = 64
  window: int = 64
  lengths: tuple[int, ...] = tuple(2**i for i in range(8, 16))          # 256 ... 32768
  full_grid_max_t: int | None = None
  long_lengths: tuple[int, ...] = (2**16, 2**18, 2**20)
  long_fwd_bwd_lengths: tuple[int, ...] = (2**16,)
  repeats: int = 5
  big_repeats: int = 3
  big_t: int = 8192
  huge_t: int = 2**20
  min_total_s: float = 0.5
  max_repeats: int = 30
  max_timed_s: float = 40.0
  time_budget_s: float = 20.0
  memory_budget_gib: float = 6.0
  associative_max_t: int = 4096
  quadratic_max_t: int = 2048
  planner_lengths: tuple[int, ...] = (8, 16, 32, 64, 128, 256, 512)
  planner_chunks: tuple[int, ...] = (32, 64, 128)
  planner_min_total_s: float = 0.3
  planner_slack: float = 1.2
  ratio_t: int = 8192
  matmul_n: int = 2048
  seed: int = 0


def get_config(quick: bool = False, **overrides: Any) -> Config:
  """The full configuration, or the `--quick` subset (~2-3 min on a 2-core CPU).

  Args:
    quick: the smoke subset: T in {256, 1024, 4096, 8192} with every contender at 256 and only
      those the targets need beyond (compilation dominates its cost), fewer repeats, no long T,
      a tiny planner sweep.
    **overrides: fields of `Config` to replace.

  Returns:
    A frozen `Config`.

  Raises:
    ValueError: on an override that is not a field of `Config`.
  """
  config = Config()
  if quick:
    config = dataclasses.replace(
        config, lengths=(256, 1024, 4096, 8192), full_grid_max_t=256, long_lengths=(),
        long_fwd_bwd_lengths=(), repeats=3, big_repeats=3, min_total_s=0.5, max_repeats=15,
        max_timed_s=15.0, planner_lengths=(16, 64), planner_chunks=(64,),
        planner_min_total_s=0.1)
  return benchmark_cli.replace_checked(config, overrides)


# ----------------------------------------------------------------------------------------------
# Contenders.


@dataclasses.dataclass(frozen=True)
class Contender:
  """A function under test.

  Attributes:
    name: row label.
    fwd: (q, k, v, log_decay) -> output [B, T, H, V]; contenders without decay ignore it.
    decay: "head" ([B, T, H] log decays), "channel" ([B, T, H, K]) or None (no decay input).
    exponent: how its time grows with T (1 linear, 2 quadratic), to predict the next T.
    max_t: largest T it is run at (None: no limit but the budgets).
    core: needed by the targets (run at every T even when `Config.full_grid_max_t` is set, and
      exempt from the time budget up to `Config.ratio_t`).
    every_t: run at every T like `core`, but under the time budget (no target needs it).
  """

  name: str
  fwd: Callable[..., jax.Array]
  decay: str | None
  exponent: int = 1
  max_t: int | None = None
  core: bool = False
  every_t: bool = False


def _gla(mode: str, chunk_size: int | None = None):
  def fwd(q, k, v, g):
    return gated_linear_attention(q, k, v, g, mode=mode, chunk_size=chunk_size)
  return fwd


def _window(window: int):
  def fwd(q, k, v, g):
    del g
    return sliding_window_attention(q, k, v, window=window)
  return fwd


def _delta(mode: str):
  def fwd(q, k, v, g):
    # The delta rule wants unit keys and a write strength beta in [0, 1]; 1/2 stands in for the
    # data-dependent beta of a layer (its value does not change the cost).
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    return delta_rule_attention(q, k, v, jnp.full(g.shape, 0.5, g.dtype), g, mode=mode)
  return fwd


def _softmax(q, k, v, g):
  del g
  return jax.nn.dot_product_attention(q, k, v, is_causal=True)


def main_contenders(config: Config) -> list[Contender]:
  """The rows of the main grid, in table order."""
  return [
      Contender("chunked", _gla("chunked"), "head", core=True),
      Contender("recurrent", _gla("recurrent"), "head", core=True),
      Contender("chunked (per-channel decay)", _gla("chunked"), "channel"),
      Contender("recurrent (per-channel decay)", _gla("recurrent"), "channel"),
      Contender("delta rule, chunked", _delta("chunked"), "head", every_t=True),
      Contender("delta rule, recurrent", _delta("recurrent"), "head", every_t=True),
      Contender("associative", _gla("associative"), "head", max_t=config.associative_max_t),
      Contender("quadratic", _gla("quadratic"), "head", exponent=2, max_t=config.quadratic_max_t),
      Contender(f"sliding window (W={config.window})", _window(config.window), None, core=True),
      Contender("softmax (dot_product_attention)", _softmax, None, exponent=2, core=True),
  ]


def planner_contenders(config: Config) -> list[Contender]:
  """The forms compared by the planner sweep (per-head decay)."""
  rows = [Contender("quadratic", _gla("quadratic"), "head", exponent=2),
          Contender("recurrent", _gla("recurrent"), "head")]
  rows += [Contender(f"chunked C={c}", _gla("chunked", c), "head") for c in config.planner_chunks]
  return rows


def _arg_positions(contender: Contender) -> tuple[int, ...]:
  return (0, 1, 2, 3) if contender.decay else (0, 1, 2)


def build(contender: Contender, pass_name: str) -> tuple[Callable[..., Any], tuple[int, ...]]:
  """The function to time and which of (q, k, v, log_decay, cotangent) it takes.

  The forward returns the output; the fwd+bwd returns the loss <output, cotangent> and its
  gradients with respect to every input (log decays included), the cost of one training step of
  the layer.
  """
  positions = _arg_positions(contender)
  if contender.decay:
    fwd = contender.fwd
  else:
    fwd = lambda q, k, v: contender.fwd(q, k, v, None)  # noqa: E731
  if pass_name == FWD:
    return fwd, positions

  def loss(*args):
    *inputs, cotangent = args
    return jnp.vdot(fwd(*inputs), cotangent)

  grad = jax.value_and_grad(loss, argnums=tuple(range(len(positions))))
  return grad, positions + (4,)


def make_inputs(config: Config, length: int, decays: set[str], cotangent: bool = True
                ) -> dict[str, Any]:
  """Random inputs of length T: q (scaled by K^-1/2), k, v, the log decays asked, the cotangent.

  Log decays are log(sigmoid(x + 4)), x ~ N(0, 1): mostly near 0 (long memory), as in a trained
  gate at initialisation.
  """
  qk_shape = (config.batch, length, config.heads, config.key_dim)
  v_shape = (config.batch, length, config.heads, config.value_dim)
  keys = jax.random.split(jax.random.key(config.seed + length), 6)
  f32 = jnp.float32
  inputs = {
      "q": jax.random.normal(keys[0], qk_shape, f32) * config.key_dim**-0.5,
      "k": jax.random.normal(keys[1], qk_shape, f32),
      "v": jax.random.normal(keys[2], v_shape, f32),
  }
  if cotangent:
    inputs["cotangent"] = jax.random.normal(keys[3], v_shape, f32)
  if "head" in decays:
    inputs["head"] = jax.nn.log_sigmoid(jax.random.normal(keys[4], qk_shape[:3], f32) + 4.0)
  if "channel" in decays:
    inputs["channel"] = jax.nn.log_sigmoid(jax.random.normal(keys[5], qk_shape, f32) + 4.0)
  return jax.block_until_ready(inputs)


def _select(inputs: dict[str, Any], contender: Contender, positions: tuple[int, ...]) -> list[Any]:
  names = ["q", "k", "v", contender.decay, "cotangent"]
  return [inputs[names[i]] for i in positions]


# ----------------------------------------------------------------------------------------------
# Measuring.


def make_runner(config: Config) -> benchmark.Runner:
  """The runner of the whole run (it remembers which contenders ran out of time budget)."""
  return benchmark.Runner(memory_budget_gib=config.memory_budget_gib,
                          time_budget_s=config.time_budget_s, log_width=34)


def repeats_for(config: Config, length: int) -> int:
  """Timed calls at T: `repeats`, `big_repeats` from `big_t`, one from `huge_t`."""
  if length >= config.huge_t:
    return 1
  return config.big_repeats if length >= config.big_t else config.repeats


def measure(runner: benchmark.Runner, config: Config, jobs: list[tuple[Contender, tuple[str, ...]]],
            length: int, *, section: str, repeats: int | None = None,
            min_total_s: float | None = None, count: bool = True) -> list[dict[str, Any]]:
  """Runs every (contender, pass) of `jobs` at one T, interleaved; one record per pair.

  Every contender but the linear forms is run up to the targets' T whatever the load (`core`);
  a form above its `max_t` is recorded as such, not compiled.
  """
  decays = {c.decay for c, _ in jobs if c.decay}
  inputs = make_inputs(config, length, decays, any(FWD_BWD in p for _, p in jobs))
  records, cases = [], []
  for contender, passes in jobs:
    for pass_name in passes:
      record = {"section": section, "contender": contender.name, "pass": pass_name,
                "T": length, "status": "ok", "reason": None}
      records.append(record)
      if contender.max_t is not None and length > contender.max_t:
        record.update(status="skipped", reason=f"form limited to T <= {contender.max_t}")
        continue
      fn, positions = build(contender, pass_name)
      cases.append(benchmark.Case(
          contender.name, pass_name, record, fn=fn,
          args=tuple(_select(inputs, contender, positions)), exponent=contender.exponent,
          exempt=contender.core and length <= config.ratio_t))
  runner.measure(cases, length, repeats=repeats or repeats_for(config, length),
                 min_total_s=config.min_total_s if min_total_s is None else min_total_s,
                 max_repeats=config.max_repeats, max_total_s=config.max_timed_s,
                 seed=config.seed + length, count=count)
  return records


# ----------------------------------------------------------------------------------------------
# Analysis.


def _key(contender: str, pass_name: str, length: int) -> dict[str, Any]:
  return {"contender": contender, "pass": pass_name, "T": length}


def _find(records, contender, pass_name, length):
  return benchmark.find(records, _key(contender, pass_name, length))


def _median(records, contender, pass_name, length, stat="median_s"):
  return benchmark.median(records, _key(contender, pass_name, length), stat)


def _speedup(records, slow, fast, pass_name, length):
  """(median ratio, fastest-call ratio, slow median, fast median) of slow / fast."""
  values = []
  for stat in ("median_s", "min_s"):
    a = _median(records, slow, pass_name, length, stat)
    b = _median(records, fast, pass_name, length, stat)
    values.append(a / b if a and b else None)
  return (values[0], values[1], _median(records, slow, pass_name, length),
          _median(records, fast, pass_name, length))


def planner_analysis(config: Config, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """For each T and pass of the sweep: the best form, the planner's pick and their ratio."""
  rows = []
  for length in config.planner_lengths:
    for pass_name in PASSES:
      times = {r["contender"]: r["median_s"] for r in records
               if r["section"] == "planner" and r["T"] == length and r["pass"] == pass_name
               and r["status"] == "ok"}
      if not times:
        continue
      best = min(times, key=times.get)
      plan = plan_engine(length, config.key_dim, config.value_dim,
                         needs_grad=pass_name == FWD_BWD)
      mode = plan.mode.value
      pick = f"chunked C={plan.chunk_size}" if mode == "chunked" else mode
      pick_s = times.get(pick)
      ratio = None if pick_s is None else pick_s / times[best]
      rows.append({"T": length, "pass": pass_name, "times_s": times, "best": best,
                   "best_s": times[best], "planner": pick, "planner_s": pick_s,
                   "planner_over_best": ratio,
                   "flag": ratio is not None and ratio > config.planner_slack})
  return rows


def ratio_targets(config: Config, records: list[dict[str, Any]], matmul: dict[str, Any]
                  ) -> list[dict[str, Any]]:
  """The issue's targets, each with its numbers and PASS / MISS (or N/A when not measured)."""
  t = config.ratio_t
  out = []

  def add(name, value, target, ok, detail):
    status = "N/A" if value is None else ("PASS" if ok else "MISS")
    out.append({"target": name, "value": value, "goal": target, "status": status,
                "detail": detail})

  fmt = report.format_seconds
  speed = [("softmax (dot_product_attention)", FWD_BWD, 50.0, ">= 50x"),
           ("recurrent", FWD_BWD, 5.0, ">= 5x"),
           ("recurrent", FWD, 1.0, ">= 1x (aim 1.5x)")]
  for slow, pass_name, goal, goal_text in speed:
    value, best_of, slow_s, fast_s = _speedup(records, slow, "chunked", pass_name, t)
    detail = f"{slow.split(' ')[0]} {fmt(slow_s)}, chunked {fmt(fast_s)} (medians)"
    if best_of is not None:
      detail += f"; fastest calls: {best_of:.3g}x"
    if pass_name == FWD and value is not None:
      detail += f"; aim 1.5x {'met' if value >= 1.5 else 'not met'}"
    add(f"{slow.split(' ')[0]} {pass_name} / chunked {pass_name} at T={t}", value, goal_text,
        value is not None and value >= goal, detail)

  memory = {r["T"]: r["temp_bytes"] for r in records
            if r["contender"] == "chunked" and r["pass"] == FWD_BWD
            and r.get("temp_bytes") is not None}
  growth = [(b, memory[b] / memory[a]) for a, b in zip(sorted(memory), sorted(memory)[1:])
            if b == 2 * a and memory[a] > 0]
  worst = max(growth, key=lambda x: x[1]) if growth else None
  add("chunked fwd+bwd temp memory growth per doubling of T (worst)",
      None if worst is None else worst[1], "<= 2.2x", worst is not None and worst[1] <= 2.2,
      "" if worst is None else ("per doubling: " + ", ".join(f"{b}: {g:.2f}x" for b, g in growth)))
  at = 65536
  value = memory.get(at)
  add(f"chunked fwd+bwd temp memory at T={at}", value, "< 1 GiB",
      value is not None and value < GIB,
      "" if value is None else report.format_bytes(value))

  longest = [r for r in records if r["contender"] == "chunked" and r["pass"] == FWD
             and r["status"] == "ok"]
  longest = max(longest, key=lambda r: r["T"]) if longest else None
  big = 2**20
  ok = longest is not None and longest["T"] >= big and longest.get("finite")
  add("chunked fwd at T=2^20 finite", None if longest is None or longest["T"] < big else
      bool(longest.get("finite")), "finite", ok,
      "not run" if longest is None or longest["T"] < big else
      f"T={longest['T']}: {fmt(longest['median_s'])}, temp "
      f"{report.format_bytes(longest.get('temp_bytes'))}, finite={longest.get('finite')}")

  rate = max(matmul["gflops"] for matmul in matmul["probes"])
  for pass_name in PASSES:
    r = _find(records, "chunked", pass_name, t)
    if r and r.get("gflops"):
      out.append({"target": f"chunked {pass_name} rate at T={t} / dense matmul rate",
                  "value": r["gflops"] / rate, "goal": "(reported)", "status": "INFO",
                  "detail": f"{r['gflops']:.2f} GFLOP/s counted vs matmul {rate:.1f} GFLOP/s"})
  return out


# ----------------------------------------------------------------------------------------------
# Reports.


def _table(records, contenders, lengths, pass_name, cell):
  return report.grid_table("contender", contenders, lengths,
                            lambda name, t: cell(_find(records, name, pass_name, t)))


def _target_text(row: dict[str, Any]) -> str:
  value = row["value"]
  if isinstance(value, bool) or value is None:
    return str(value) if value is not None else "-"
  if "memory at" in row["target"]:
    return report.format_bytes(value)
  return f"{value:.3g}x" if "rate" not in row["target"] else f"{value:.1%}"


def write_markdown(path: str, result: dict[str, Any]) -> None:
  config = result["config"]
  records = [r for r in result["records"] if r["section"] in ("grid", "long")]
  lengths = sorted({r["T"] for r in records})
  contenders = list(dict.fromkeys(r["contender"] for r in records))
  machine = result["machine"]
  lines = [
      "# Engine benchmark",
      "",
      f"Produced by `{result['command']}`. Every number here is regenerated by "
      "`python -m experiments.benchmark_engine` (~20-25 min on a 2-core CPU; `--quick` runs a "
      "~2-3 min subset; `--render-only` rewrites this file and the plot from the JSON).",
      "",
      f"Machine: {machine_line(machine)}. Date: {machine['date']}. "
      f"Run time: {result['runtime_s'] / 60:.1f} min."
      + report.load_text(machine),
      "",
      f"Setup: B={config['batch']}, H={config['heads']}, K={config['key_dim']}, "
      f"V={config['value_dim']}, float32, jit. Median of {config['repeats']} calls after one "
      f"warm-up ({config['big_repeats']} from T={config['big_t']}, 1 at T>={config['huge_t']}; "
      f"fast calls are repeated until they add up to {config['min_total_s']} s); the contenders "
      "of one T run interleaved, round-robin (from T=" + str(ISOLATE_FROM_T) + " the token "
      "scan's fwd+bwd, 1-6.3 GiB of temp memory, runs after the others, alone, so that its "
      "allocations cannot touch their timings). The machine may have been shared with other jobs: "
      "trust ratios within one T more than absolute times. fwd+bwd is the loss <o, dO> and its "
      "gradients with respect to every input. Memory is XLA's temporary buffers "
      "(`memory_analysis().temp_size_in_bytes`), excluding inputs and outputs. "
      f"Budgets: {config['memory_budget_gib']:g} GiB temp memory (programs above are compiled, "
      f"not run: 'skip: mem'), {config['time_budget_s']:g} s per call ('skip: time'); "
      "'-' = the form is not run at that T (associative is O(T K V) memory, quadratic O(T^2)).",
      "",
      report.matmul_text(result["matmul"]["probes"]),
      "",
  ]
  lines += report.targets_section(result["targets"], _target_text)
  sections = [("Forward time", FWD, report.cell_time),
              ("Forward + backward time", FWD_BWD, report.cell_time),
              ("Forward temp memory", FWD, report.cell_memory),
              ("Forward + backward temp memory", FWD_BWD, report.cell_memory)]
  lines += report.grid_sections(
      lambda pass_name, cell: _table(records, contenders, lengths, pass_name, cell), sections)

  gflops = [r for r in records if r["status"] == "ok" and r.get("gflops")
            and r["contender"].startswith("chunked")]
  if gflops:
    lines += ["", "## Counted FLOP rate of the chunked forms", "",
              "`dca_jax.flops.count_flops` / median time, as a fraction of the dense matmul rate.",
              "", "| contender | pass | T | GFLOP counted | GFLOP/s | of matmul |",
              "|---|---|---:|---:|---:|---:|"]
    rate = max(p["gflops"] for p in result["matmul"]["probes"])
    for r in gflops:
      lines.append(f"| {r['contender']} | {r['pass']} | {r['T']} | {r['flops'] / 1e9:.3g} | "
                   f"{r['gflops']:.3g} | {r['gflops'] / rate:.1%} |")

  if result["planner"]:
    forms = list(dict.fromkeys(f for row in result["planner"] for f in row["times_s"]))
    lines += ["", "## Planner sweep", "",
              "Per-head decay. Time of each form; **bold** = fastest; planner = "
              "`plan_engine(T, K, V, needs_grad=...)`; flagged when the planner's pick is more "
              f"than {config['planner_slack']}x slower than the fastest.", "",
              "| T | pass | " + " | ".join(forms) + " | planner | planner / best |",
              "|---:|---|" + "---:|" * len(forms) + "---|---:|"]
    for row in result["planner"]:
      cells = []
      for f in forms:
        s = row["times_s"].get(f)
        text = report.format_seconds(s) if s is not None else ""
        cells.append(f"**{text}**" if f == row["best"] else text)
      ratio = row["planner_over_best"]
      ratio_text = "-" if ratio is None else f"{ratio:.2f}x" + (" **FLAG**" if row["flag"] else "")
      lines.append(f"| {row['T']} | {row['pass']} | " + " | ".join(cells)
                   + f" | {row['planner']} | {ratio_text} |")
  lines += ["", "![time and memory vs T](engine_benchmark.png)", ""]
  with open(path, "w", encoding="utf-8") as f:
    f.write("\n".join(lines))


def write_plot(path: str, result: dict[str, Any]) -> None:
  plt = report.pyplot()

  records = [r for r in result["records"] if r["section"] in ("grid", "long")]
  contenders = list(dict.fromkeys(r["contender"] for r in records))
  fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(14, 6.5))
  cmap = plt.get_cmap("tab10")
  for i, name in enumerate(contenders):
    color = cmap(i % 10)
    ok = sorted((r["T"], r["median_s"]) for r in records if r["contender"] == name
                and r["pass"] == FWD_BWD and r["status"] == "ok")
    if ok:
      ax_time.plot(*zip(*ok), "o-", color=color, label=name)
    mem = sorted((r["T"], r["temp_bytes"] / 2**20, r["status"] == "ok") for r in records
                 if r["contender"] == name and r["pass"] == FWD_BWD and r.get("temp_bytes"))
    if mem:
      ax_mem.plot([m[0] for m in mem], [m[1] for m in mem], "-", color=color, label=name)
      run = [m for m in mem if m[2]]
      not_run = [m for m in mem if not m[2]]
      if run:
        ax_mem.plot([m[0] for m in run], [m[1] for m in run], "o", color=color)
      if not_run:
        ax_mem.plot([m[0] for m in not_run], [m[1] for m in not_run], "x", color=color,
                    markersize=9)
  for name, style in (("chunked", "s:"), ("recurrent", "^:")):
    fwd = sorted((r["T"], r["median_s"]) for r in records if r["contender"] == name
                 and r["pass"] == FWD and r["status"] == "ok")
    if fwd:
      ax_time.plot(*zip(*fwd), style, color=cmap(contenders.index(name) % 10), alpha=0.6,
                   label=f"{name} (forward only)")
  report.memory_budget_line(ax_mem, result["config"]["memory_budget_gib"])
  ax_time.axhline(result["config"]["time_budget_s"], color="gray", ls="--", lw=1)
  ax_time.annotate("time budget per call", (0.02, result["config"]["time_budget_s"]),
                   xycoords=("axes fraction", "data"), xytext=(0, 4), textcoords="offset points",
                   color="gray", fontsize=8)
  for ax, title, ylabel in ((ax_time, "Forward + backward time", "median time per call [s]"),
                            (ax_mem, "Forward + backward XLA temp memory", "temp memory [MiB]")):
    report.log_log_axes(ax, title, "sequence length T", ylabel)
  handles, labels = ax_time.get_legend_handles_labels()
  fig.legend(handles, labels, loc="lower center", ncol=5, fontsize=8, frameon=False)
  config = result["config"]
  report.finish_plot(
      fig, path, f"Gated linear attention engine vs window and softmax attention: "
      f"B={config['batch']}, H={config['heads']}, K=V={config['key_dim']}, float32",
      result["machine"], rect=(0, 0.1, 1, 1))


# ----------------------------------------------------------------------------------------------
# Driver.


def run(config: Config, command: str) -> dict[str, Any]:
  """Runs every section and returns the JSON-serialisable result."""
  session = benchmark.Session(config.matmul_n)
  runner = make_runner(config)
  records: list[dict[str, Any]] = []

  contenders = main_contenders(config)
  for length in config.lengths:
    log(f"T={length}")
    full = config.full_grid_max_t is None or length <= config.full_grid_max_t
    jobs = [(c, PASSES) for c in contenders if full or c.core or c.every_t]
    if length < ISOLATE_FROM_T:
      records += measure(runner, config, jobs, length, section="grid")
      continue
    # Autodiff through the token scan stores one K x V state per token (1-6.3 GiB of XLA temp
    # memory from T = 8192). It runs after the other forms, alone. In the full runs of
    # 2026-12-04 13:30 and 15:19 UTC, with it interleaved, the chunked forward at T = 32768
    # measured 276 and 280 ms; at 16:20 UTC, with it apart, 145 ms. The side-by-side check
    # `python -m experiments.isolation_check` (16:25 UTC) found no difference within one
    # process (156 against 153 ms), so the cause is not established; apart, its allocations
    # cannot touch the other forms' timings.
    alone = [(c, tuple(p for p in passes if (c.name, p) in ISOLATED)) for c, passes in jobs]
    shared = [(c, tuple(p for p in passes if (c.name, p) not in ISOLATED)) for c, passes in jobs]
    records += measure(runner, config, [(c, p) for c, p in shared if p], length, section="grid")
    if any(p for _, p in alone):
      records += measure(runner, config, [(c, p) for c, p in alone if p], length,
                         section="grid")

  by_name = {c.name: c for c in contenders}
  for length in config.long_lengths:
    log(f"T={length} (linear forms)")
    chunked_passes = PASSES if length in config.long_fwd_bwd_lengths else (FWD,)
    jobs = [(by_name["chunked"], chunked_passes), (by_name["recurrent"], (FWD,))]
    records += measure(runner, config, jobs, length, section="long", min_total_s=0.0)

  planner_records = []
  if config.planner_lengths:
    sweep = planner_contenders(config)
    for length in config.planner_lengths:
      log(f"planner sweep T={length}")
      planner_records += measure(
          runner, config, [(c, PASSES) for c in sweep], length, section="planner",
          repeats=config.repeats, min_total_s=config.planner_min_total_s, count=False)
  records += planner_records
  planner = planner_analysis(config, planner_records)

  session.finish()
  matmul = {"probes": session.probes}
  result = {
      "command": command,
      "machine": session.machine,
      "config": dataclasses.asdict(config),
      "matmul": matmul,
      "records": records,
      "planner": planner,
  }
  result["targets"] = ratio_targets(config, records, matmul)
  result["runtime_s"] = session.runtime_s
  return result


def print_summary(result: dict[str, Any]) -> None:
  if result["planner"]:
    log("\nPlanner sweep (per-head decay):")
    for row in result["planner"]:
      times = ", ".join(f"{k} {report.format_seconds(v)}" for k, v in row["times_s"].items())
      ratio = row["planner_over_best"]
      log(f"  T={row['T']:4d} {row['pass']:7s} best {row['best']:13s} planner {row['planner']:13s}"
           f" {'-' if ratio is None else f'{ratio:.2f}x'}{'  FLAG' if row['flag'] else ''}"
           f"   [{times}]")
  report.log_targets(result["targets"])
  log(f"\nRun time {result['runtime_s'] / 60:.1f} min")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  """Parses the command line, runs, writes `<out>/engine_benchmark.{json,md,png}`."""
  return benchmark_cli.main(argv, doc=__doc__, module="experiments.benchmark_engine",
                      stem_name="engine_benchmark", noun="contender", get_config=get_config,
                      run=run, print_summary=print_summary, write_markdown=write_markdown,
                      write_plot=write_plot)


if __name__ == "__main__":
  main()
