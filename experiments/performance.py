"""The performance benchmark: one command, every contender side by side, the issue's targets.

    python -m experiments.performance            # full run, ~30 min on the 2-core CPU
    python -m experiments.performance --quick    # ~5 min subset (T <= 4096, fewer repeats)
    python -m experiments.performance --render-only   # .md, .png and targets from the .json

Writes `docs/performance.{json,md,png}` (`--out` elsewhere). One run, one process, one machine:

1. The dense-matmul rate (2048^3 float32) at the start and the end: the yardstick for counted
   FLOP rates.
2. Layers (B = 1, d_model 256, 4 heads, float32; W = 64 for the windowed ones): the five layers
   of `dca_jax.nn` and the external peer, PyTorch's CPU flash softmax layer
   (`experiments.torch_peer`, optional extra `.[bench]`; skipped with the reason when absent),
   forward and forward+backward at T = 256, 1024 ... 32768, all of one T timed round-robin (median of
   repeats after warm-up), with XLA's temporary memory and the counted FLOPs of each JAX layer.
3. Engine (`gated_linear_attention`, B = 1, H = 4, K = V = 64): chunked and recurrent forms with
   per-head and per-channel decay, the sliding window and `jax.nn.dot_product_attention` at the
   same T, then the linear forms at T = 65536 (forward+backward memory included); counted FLOPs
   and the fraction of the matmul rate; the engine planner's sweep
   (`experiments.benchmark_engine`).
4. LM training steps: `lm_dca` against `lm_softmax` (the demo's model, 2 layers, d_model 128),
   tokens/s at T = 256 (batch 8) and T = 2048 (batch 1), with the sliding-window and GLA models of
   `lm_softmax`'s config beside them as references (`TRAINING_MODELS`).
5. Decoding: `generate` on the demo-size model after a 4k prompt, tokens/s at batch 1 and 32
   (`experiments.decode_rate`), against the bound set by the bytes a step reads.

Every ratio in the report comes from this one run; the machine and the date are recorded. The
result is saved after each section to `<out>/performance.partial.json`: a rerun resumes from it
(sections already measured are kept), and `--sections` runs a subset.
Speed is never asserted in the tests: the tests prove that every form computes the same function.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import shlex
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from experiments import benchmark, benchmark_engine, benchmark_layers, bookkeeping, decode_rate
from experiments import configs as configs_lib
from experiments import model as model_lib
from experiments import report, suite_speed, tasks as tasks_lib, torch_peer
from experiments.bookkeeping import GIB, log

FWD, FWD_BWD = "fwd", "fwd+bwd"
DCA, GLA, SOFTMAX = "DCAttention", "GatedLinearAttention", "SoftmaxAttention"


@dataclasses.dataclass(frozen=True)
class Config:
  """One run. Attributes: the T grids of each section, repeats, budgets, decode batches."""

  layer_lengths: tuple[int, ...] = (256, 1024, 2048, 4096, 8192, 16384, 32768)
  engine_lengths: tuple[int, ...] = (256, 1024, 4096, 8192, 32768)
  engine_full_grid_max_t: int = 256
  engine_long_lengths: tuple[int, ...] = (65536,)
  train_lengths: tuple[tuple[int, int], ...] = ((256, 8), (2048, 1))      # (T, batch)
  decode_batches: tuple[int, ...] = (1, 32)
  decode_prompt: int = 4096
  decode_repeats: int = 3
  repeats: int = 5
  big_repeats: int = 3
  time_budget_s: float = 25.0
  memory_budget_gib: float = 8.0
  matmul_n: int = 2048
  quick: bool = False


def get_config(quick: bool) -> Config:
  if not quick:
    return Config()
  return Config(layer_lengths=(256, 1024, 4096), engine_lengths=(256, 1024, 4096),
                engine_full_grid_max_t=256,
                engine_long_lengths=(), train_lengths=((256, 8),), decode_batches=(1,),
                decode_prompt=1024, decode_repeats=2, repeats=3, big_repeats=2, matmul_n=1024,
                quick=True)


# ----------------------------------------------------------------------------------------------
# Sections.


def measure_layers(config: Config) -> dict[str, Any]:
  """Section 2: the five layers and the torch peer, round-robin at every T."""
  layer_config = benchmark_layers.get_config(
      lengths=config.layer_lengths, repeats=config.repeats, big_repeats=config.big_repeats,
      time_budget_s=config.time_budget_s, memory_budget_gib=config.memory_budget_gib)
  under_test = benchmark_layers.layers(layer_config)
  splits, params = benchmark_layers.split_layers(layer_config, under_test)
  why_not = torch_peer.available()
  peers, peer_info, peer = {}, {"name": torch_peer.NAME, "available": why_not is None,
                                "reason": why_not}, None
  if why_not is None:
    peer = torch_peer.PeerProcess(layer_config.d_model, layer_config.num_heads,
                                  threads=os.cpu_count())
    peers[torch_peer.NAME] = (peer.calls, 2)
    peer_info["version"] = peer.version
    params[torch_peer.NAME] = peer.num_params
  else:
    log(f"  {torch_peer.NAME}: skipped ({why_not})")
  runner = benchmark.Runner(memory_budget_gib=config.memory_budget_gib,
                            time_budget_s=config.time_budget_s, compile_exhausted=False)
  records, _ = benchmark_layers.measure_lengths(runner, layer_config, splits,
                                                config.layer_lengths, peers=peers, peer=peer)
  return {"records": records, "params": params, "peer": peer_info,
          "options": {layer.name: layer.options_text for layer in under_test}}


def measure_engine(config: Config) -> dict[str, Any]:
  """Section 3: the engine's forms, window and softmax baselines, long T, planner sweep."""
  engine_config = benchmark_engine.get_config(
      lengths=config.engine_lengths, full_grid_max_t=config.engine_full_grid_max_t,
      long_lengths=config.engine_long_lengths, long_fwd_bwd_lengths=config.engine_long_lengths,
      repeats=config.repeats, big_repeats=config.big_repeats,
      time_budget_s=config.time_budget_s, memory_budget_gib=config.memory_budget_gib,
      planner_lengths=(64, 256) if not config.quick else (64,))
  return benchmark_engine.run(engine_config, "(section of experiments.performance)")


# Section 4's models: (row name, experiment config, overrides). The targets compare lm_dca with
# lm_softmax; the sliding-window and GLA models (lm_softmax's config with another attention
# layer: the same widths and depth; GLA's layer has a few more parameters) are the references
# that say where DCA's step time goes: DCA is the window plus the compressed memory.
TRAINING_MODELS = (
    ("lm_dca", "lm_dca", {}),
    ("lm_softmax", "lm_softmax", {}),
    ("lm_window (reference)", "lm_softmax", {"attention": "window",
                                              "attention_options": {"window": 64}}),
    ("lm_gla (reference)", "lm_softmax", {"attention": "gla", "attention_options": {}}),
)


def measure_training(config: Config) -> list[dict[str, Any]]:
  """Section 4: LM training steps of `TRAINING_MODELS`, round-robin at each (T, batch)."""
  rows = []
  for length, batch in config.train_lengths:
    cases = []
    for name, base, overrides in TRAINING_MODELS:
      exp = configs_lib.load_config(base, overrides={"seq_len": length, "batch_size": batch,
                                                     **overrides})
      _, tx, train_step, _ = model_lib.compiled_steps(exp)
      model = model_lib.build_model(exp)
      _, params, rest = nnx.split(model, nnx.Param, ...)
      params = jax.tree.map(jnp.copy, params)
      data = tasks_lib.make_task(exp).train_batch(0)
      record = {"experiment": name, "T": length, "batch": batch}
      rows.append(record)
      cases.append(benchmark.Case(name, f"train/{length}", record, thunk=suite_speed.TrainSteps(
          train_step, params, rest, tx.init(params), data)))
    log(f"training steps T={length} x {batch}")
    benchmark.Runner(log_width=None).measure(cases, repeats=config.repeats, min_total_s=2.0,
                                             max_repeats=30)
    for record in rows[-len(TRAINING_MODELS):]:
      record["tokens_per_s"] = length * batch / record["median_s"]
  return rows


def measure_decoding(config: Config) -> list[dict[str, Any]]:
  """Section 5: generate's decode tokens/s on the demo-size model, per layer and batch, beside
  the bound set by the bytes a step reads (parameters once, each row's cache once) at the
  memory read rate measured in the same section."""
  rows = []
  bandwidth = decode_rate.read_bandwidth()
  log(f"memory read rate {bandwidth / 1e9:.1f} GB/s")
  for batch in config.decode_batches:
    for attention, options in decode_rate.LAYERS:
      log(f"decoding {attention} batch {batch}")
      rate = decode_rate.decode_rate(attention, options, config.decode_prompt,
                                     config.decode_repeats, batch=batch)
      rows.append({"attention": attention, "batch": batch, "prompt": config.decode_prompt,
                   "read_bytes_per_s": bandwidth,
                   "bound_tokens_per_s": decode_rate.bandwidth_bound(rate, batch, bandwidth),
                   **rate})
  return rows


# ----------------------------------------------------------------------------------------------
# Analysis.


def _layer_time(result, layer, pass_name, length):
  return benchmark.median(result["layers"]["records"],
                          {"layer": layer, "pass": pass_name, "T": length})


def _engine_record(result, contender, pass_name, length):
  return benchmark.find(result["engine"]["records"],
                        {"contender": contender, "pass": pass_name, "T": length})


def _worst_engine_ratio(result, numerator, denominator, pass_name, min_length=0):
  """The largest time ratio numerator / denominator over the engine's grid (T >= min_length)."""
  ratios = []
  for length in result["config"]["engine_lengths"]:
    top, bottom = (_engine_record(result, name, pass_name, length)
                   for name in (numerator, denominator))
    if length >= min_length and top and bottom and top.get("median_s") and bottom.get("median_s"):
      ratios.append(top["median_s"] / bottom["median_s"])
  return max(ratios, default=None)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
  """The issue's targets, each with its measured value (None: not measured in this run)."""
  rows = []

  def add(name, value, goal, ok, detail=""):
    rows.append({"target": name, "value": value, "goal": goal,
                 "status": "-" if value is None else ("PASS" if ok else "MISS"),
                 "detail": detail})

  peer = torch_peer.NAME
  for length, goal in ((1024, 1.0), (8192, 4.0), (32768, 10.0)):
    mine, theirs = (_layer_time(result, n, FWD_BWD, length) for n in (DCA, peer))
    ratio = theirs / mine if mine and theirs else None
    add(f"DCA layer fwd+bwd vs torch flash softmax at T={length}", ratio, f">= {goal}x",
        ratio is not None and ratio >= goal, "torch time / DCA time")
  ratios = []
  for length in result["config"]["layer_lengths"]:
    mine, gla = (_layer_time(result, n, FWD_BWD, length) for n in (DCA, GLA))
    if mine and gla:
      ratios.append(mine / gla)
  worst = max(ratios) if ratios else None
  add("DCA layer within 1.5x of the GatedLinearAttention layer (fwd+bwd, worst T)", worst,
      "<= 1.5x", worst is not None and worst <= 1.5, "DCA time / GLA time")

  engine = result.get("engine")
  if engine:
    worst = _worst_engine_ratio(result, "chunked", "recurrent", FWD, min_length=1024)
    add("engine: chunked fwd <= recurrent fwd from T=1024 (per-head, worst T)", worst,
        "<= 1.0x", worst is not None and worst <= 1.0, "chunked time / recurrent time")
    # The dense rate measured beside the engine's forms (the engine section's own probes; the
    # report's probes may come from other runs, whose machine state differed).
    probes = engine.get("matmul", {}).get("probes") or result["matmul"]["probes"]
    rate = max((p["gflops"] for p in probes), default=None)
    fractions = []
    for length in result["config"]["engine_lengths"]:
      rec = _engine_record(result, "chunked", FWD_BWD, length)
      if length >= 4096 and rec and rec.get("gflops") and rate:
        fractions.append(rec["gflops"] / rate)
    low = min(fractions) if fractions else None
    add("engine: chunked fwd+bwd at >= 40% of the dense matmul rate (T >= 4096, K=V=64)", low,
        ">= 0.40", low is not None and low >= 0.40, "counted GFLOP/s / matmul GFLOP/s")
    memory = None
    for length in result["config"]["engine_long_lengths"]:
      rec = _engine_record(result, "chunked", FWD_BWD, length)
      if rec and rec.get("temp_bytes") is not None:
        memory = rec["temp_bytes"] / GIB
    add("engine: chunked fwd+bwd XLA temp memory at T=65536", memory, "< 1 GiB",
        memory is not None and memory < 1.0, "GiB")
    worst = _worst_engine_ratio(result, "chunked (per-channel decay)", "chunked", FWD_BWD)
    add("engine: per-channel decay within 3x of per-head (chunked fwd+bwd, worst T)", worst,
        "<= 3x", worst is not None and worst <= 3.0, "per-channel time / per-head time")

  for row_length, goal in ((256, 0.9), (2048, 2.0)):
    times = {r["experiment"]: r.get("tokens_per_s") for r in result.get("training", [])
             if r["T"] == row_length}
    ratio = (times["lm_dca"] / times["lm_softmax"]
             if times.get("lm_dca") and times.get("lm_softmax") else None)
    add(f"LM training tokens/s, lm_dca / lm_softmax at T={row_length}", ratio, f">= {goal}x",
        ratio is not None and ratio >= goal)
  for batch, goal in ((1, 10_000), (32, 100_000)):
    rate = next((r["tokens_per_s"] for r in result.get("decoding", [])
                 if r["attention"] == "dca" and r["batch"] == batch), None)
    add(f"DCA demo model decodes at batch {batch} (aggregate tokens/s)", rate, f">= {goal:,}",
        rate is not None and rate >= goal)
  return rows


# ----------------------------------------------------------------------------------------------
# Report.


def _fmt_time(seconds):
  return "-" if seconds is None else report.format_seconds(seconds)


def write_markdown(path: pathlib.Path, result: dict[str, Any]) -> None:
  """The report: headline table, targets, then each section's tables."""
  lines = ["# Performance", "",
           f"Generated by `{result['command']}` on {bookkeeping.machine_line(result['machine'])}, "
           f"{result['date']} "
           f"(run time {result['runtime_s'] / 60:.1f} min). Medians of round-robin repeats "
           "after warm-up; every ratio below comes from one run of its section.", ""]
  provenance = result.get("sections", {})
  if len({(p["command"], p.get("run", p["date"])) for p in provenance.values()}) > 1:
    lines += ["Sections measured by separate runs (a full `python -m experiments.performance` "
              "measures them all in one): " + "; ".join(
                  f"{name}: `{p['command']}`, {p['date']}" for name, p in provenance.items()) + ".",
              ""]
  probes = result["matmul"]["probes"]
  runs = "the run" if len(probes) <= 2 else "each run whose sections this report holds, in order"
  lines.append(f"Dense matmul rate (float32), start / end of {runs}: "
               + " / ".join(f"{p['gflops']:.1f} GFLOP/s ({p['n']}^3)" for p in probes) + ".")
  lines.append("")
  layers = result["layers"]
  peer = layers["peer"]
  names = list(layers["params"])
  lengths = result["config"]["layer_lengths"]
  lines += ["## Headline: one attention layer, forward+backward", "",
            "B = 1, d_model 256, 4 heads, float32, W = 64 for DCA and the sliding window. "
            "Softmax is the library's `SoftmaxAttention` (dense below 64 MiB of scores, blocked "
            "flash-style above); the peer is "
            + (f"{peer['name']} ({peer['version']})." if peer["available"]
               else f"absent: {peer['reason']}."), ""]
  lines.append("| layer | params | " + " | ".join(f"T={t}" for t in lengths) + " |")
  lines.append("|---|---|" + "---|" * len(lengths))
  for name in names:
    cells = [_fmt_time(_layer_time(result, name, FWD_BWD, t)) for t in lengths]
    lines.append(f"| {name} | {layers['params'][name]:,} | " + " | ".join(cells) + " |")
  if peer["available"]:
    cells = []
    for t in lengths:
      mine, theirs = (_layer_time(result, n, FWD_BWD, t) for n in (DCA, peer["name"]))
      cells.append(f"{theirs / mine:.2f}x" if mine and theirs else "-")
    lines.append("| **torch / DCA** | | " + " | ".join(cells) + " |")
  lines += ["", "## Targets", "", "| target | measured | goal | status |", "|---|---|---|---|"]
  for row in result["targets"]:
    value = row["value"]
    shown = "-" if value is None else (f"{value:,.0f}" if value >= 100 else f"{value:.3g}")
    measured = f"{shown} {row['detail']}".strip()
    lines.append(f"| {row['target']} | {measured} | {row['goal']} | {row['status']} |")
  lines += ["", "Where the time of a missed target goes, op by op (matmuls, data movement, "
            "elementwise; by part of the layer): docs/profile_ops.md, "
            "`python -m experiments.profile_ops`."]
  lines += ["", "## Layers, forward only", "",
            "| layer | " + " | ".join(f"T={t}" for t in lengths) + " |",
            "|---|" + "---|" * len(lengths)]
  for name in names:
    cells = [_fmt_time(_layer_time(result, name, FWD, t)) for t in lengths]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  lines += ["", "## Layers: XLA temporary memory and counted FLOP rate (fwd+bwd)", "",
            "| layer | " + " | ".join(f"T={t}" for t in lengths) + " |",
            "|---|" + "---|" * len(lengths)]
  for name in names:
    cells = []
    for t in lengths:
      rec = benchmark.find(layers["records"], {"layer": name, "pass": FWD_BWD, "T": t})
      if not rec or rec.get("status") != "ok":
        cells.append("-" if not rec else rec["status"])
        continue
      temp = rec.get("temp_bytes")
      rate = rec.get("gflops")
      cells.append(f"{report.format_bytes(temp) if temp is not None else '-'}"
                   f"{'' if rate is None else f', {rate:.1f} GF/s'}")
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  skipped = [r for r in layers["records"] if r.get("status") not in (None, "ok")]
  if skipped:
    lines += ["", "Not run: " + "; ".join(f"{r['layer']} {r['pass']} at T={r['T']} "
                                           f"({r['reason']})" for r in skipped) + "."]
  engine = result.get("engine")
  if engine:
    lines += ["", "## Engine (`gated_linear_attention`, B = 1, H = 4, K = V = 64)", "",
              "From T = 8192 the recurrent form's fwd+bwd (autodiff through the token scan, "
              "1-6.3 GiB of XLA temp memory, the delta rule's the most) is timed after the "
              "other forms of its T, alone (`benchmark_engine.ISOLATED`).", ""]
    contenders = []
    for rec in engine["records"]:
      if rec["section"] in ("grid", "long") and rec["contender"] not in contenders:
        contenders.append(rec["contender"])
    all_t = sorted({r["T"] for r in engine["records"] if r["section"] in ("grid", "long")})
    for pass_name in (FWD, FWD_BWD):
      lines += [f"{pass_name}: time (counted GFLOP/s; XLA temp memory)", "",
                "| form | " + " | ".join(f"T={t}" for t in all_t) + " |",
                "|---|" + "---|" * len(all_t)]
      for name in contenders:
        cells = []
        for t in all_t:
          rec = _engine_record(result, name, pass_name, t)
          if not rec or rec.get("median_s") is None:
            cells.append("-")
            continue
          rate = rec.get("gflops")
          temp = rec.get("temp_bytes")
          cells.append(f"{_fmt_time(rec['median_s'])} ({'-' if rate is None else f'{rate:.1f}'}; "
                       f"{'-' if temp is None else report.format_bytes(temp)})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
      lines.append("")
  if result.get("training"):
    lines += ["## LM training steps (demo model: 2 layers, d_model 128)", "",
              "The references are `lm_softmax`'s config with the sliding-window (W = 64) or the "
              "GLA layer in place of softmax (`performance.TRAINING_MODELS`): DCA's layer is "
              "that window plus the compressed memory.", "",
              "| experiment | T x batch | step | tokens/s |", "|---|---|---|---|"]
    for r in result["training"]:
      lines.append(f"| {r['experiment']} | {r['T']} x {r['batch']} | {_fmt_time(r.get('median_s'))}"
                   f" | {r.get('tokens_per_s', 0):,.0f} |")
    lines.append("")
  if result.get("decoding"):
    lines += ["## Decoding (`generate`, demo-size model, after a prompt)", ""]
    bandwidth = result["decoding"][0].get("read_bytes_per_s")
    if bandwidth:
      lines += [f"Memory read rate measured in this section (jitted sum over 512 MiB of float32): "
                f"{bandwidth / 1e9:.1f} GB/s. The bound is the aggregate rate if a step only read "
                "the parameters once and each row's cache once at that rate "
                "(batch x rate / (parameter bytes + batch x cache bytes per row); compute ignored).",
                ""]
    lines += ["FLOPs per step are counted exactly (`dca_jax.flops.count_flops` of one "
              "`decode_step`, sampling excluded); their rate is FLOPs per step / step time, to set "
              "beside the dense matmul rate above: at batch 32 a step is mostly small matmuls "
              "([32, d] rows through the projections and the MLP).", ""]
    lines += ["| layer | batch | prompt | tokens/s (aggregate) | ms per step | parameters | "
              "cache per row | bandwidth bound, tokens/s | MFLOP per step (matmul) | GFLOP/s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["decoding"]:
      extra = ("| - | - | - |" if "param_bytes" not in r else
               f"| {report.format_bytes(r['param_bytes'])} | "
               f"{report.format_bytes(r['cache_bytes_per_row'])} | {r['bound_tokens_per_s']:,.0f} |")
      flops = (" - | - |" if "step_flops" not in r else
               f" {r['step_flops'] / 1e6:.1f} ({r['step_matmul_flops'] / 1e6:.1f}) | "
               f"{r['step_flops'] / r['step_s'] / 1e9:.1f} |")
      lines.append(f"| {r['attention']} | {r['batch']} | {r['prompt']} | {r['tokens_per_s']:,.0f}"
                   f" | {1e3 * r['step_s']:.3f} " + extra + flops)
    lines.append("")
  path.write_text("\n".join(lines) + "\n")


def write_plot(path: pathlib.Path, result: dict[str, Any]) -> None:
  """Layer fwd+bwd time against T, log-log, one line per layer and the peer."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
  for ax, pass_name in zip(axes, (FWD_BWD, FWD)):
    for name in result["layers"]["params"]:
      points = [(t, _layer_time(result, name, pass_name, t))
                for t in result["config"]["layer_lengths"]]
      points = [(t, s) for t, s in points if s]
      if points:
        ax.plot(*zip(*points), marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("T (tokens)")
    ax.set_ylabel("seconds")
    ax.set_title(f"one layer, {pass_name} (d_model 256, 4 heads, batch 1)")
    ax.grid(True, which="both", alpha=0.3)
  axes[0].legend(fontsize=8)
  fig.suptitle(f"{bookkeeping.machine_line(result['machine'])}, {result['date']}", fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


SECTIONS = ("layers", "engine", "training", "decoding")


def run(config: Config, command: str, partial: pathlib.Path | None = None,
        sections: tuple[str, ...] = SECTIONS, remeasure: tuple[str, ...] = (),
        previous: pathlib.Path | None = None) -> dict[str, Any]:
  """Runs the sections, saving the result to `partial` after each (a rerun with the same file
  skips the sections it already holds, so a long run resumes where it stopped; the sections in
  `remeasure` are measured again). Sections that neither the partial file holds nor this run
  measures are taken from `previous` (the committed docs/performance.json) when it was made with
  the same configuration, with their own commands and dates. Each section records the command
  and date that measured it."""
  session = benchmark.Session(config.matmul_n)
  same_config = json.loads(json.dumps(dataclasses.asdict(config)))
  result = {}
  if partial is not None and partial.exists():
    result = json.loads(partial.read_text())
    if result.get("config") != same_config:
      result = {}                                       # another configuration: start afresh
  if previous is not None and previous.exists():
    earlier = json.loads(previous.read_text())
    if earlier.get("config") == same_config:
      provenance = result.setdefault("sections", {})
      for name in SECTIONS:
        if name not in result and name in earlier and name not in sections + remeasure:
          result[name] = earlier[name]
          provenance[name] = earlier.get("sections", {}).get(
              name, {"command": earlier.get("command"), "date": earlier.get("date")})
      if "matmul" not in result and "matmul" in earlier:
        result["matmul"] = earlier["matmul"]
  for name in remeasure:
    result.pop(name, None)
    result.get("sections", {}).pop(name, None)
  provenance = result.setdefault("sections", {})
  for name in SECTIONS:                 # sections measured before provenance was recorded
    if name in result and name not in provenance:
      provenance[name] = {"command": result.get("command"), "date": result.get("date")}
  result.update(command=command, machine=session.machine, date=bookkeeping.now(),
                config=dataclasses.asdict(config))
  measures = {"layers": measure_layers, "engine": measure_engine,
              "training": measure_training, "decoding": measure_decoding}
  # Each probe records the run that made it, and a report keeps the probes of the runs its
  # sections come from, no others (an untagged probe predates the tags: kept while a section
  # without a run tag is). The partial file gets this run's probes with each section it
  # measures, so a run resumed after an interruption keeps the interrupted run's rate beside
  # its sections; it is rewritten with the final result at the end.
  probes = result.get("matmul", {}).get("probes", [])

  def held_probes():
    runs_held = {p.get("run") for p in provenance.values()}
    mine = [dict(p, run=result["date"]) for p in session.probes]
    return [p for p in probes + mine if p.get("run") in runs_held]

  started = time.perf_counter()
  for name in sections:
    if name in result:
      log(f"{name}: kept from {partial}")
      continue
    result[name] = measures[name](config)
    provenance[name] = {"command": command, "date": bookkeeping.now(), "run": result["date"]}
    if partial is not None:
      result["matmul"] = {"probes": held_probes()}
      partial.write_text(json.dumps(result, indent=1, default=bookkeeping.json_default) + "\n")
  session.finish()
  result["matmul"] = {"probes": held_probes()}
  # This command's measuring time (the report's header names the command): sections kept from
  # an earlier run do not add theirs.
  result["runtime_s"] = time.perf_counter() - started
  result["targets"] = targets(result)
  if partial is not None:
    partial.write_text(json.dumps(result, indent=1, default=bookkeeping.json_default) + "\n")
  return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="the ~5 min subset")
  parser.add_argument("--out", default="docs", help="output folder (default: docs)")
  parser.add_argument("--sections", default=None,
                      help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
  parser.add_argument("--remeasure", default=None,
                      help="comma-separated sections to measure again even if the partial "
                           "result (docs/performance.partial.json) holds them")
  parser.add_argument("--render-only", action="store_true",
                      help="measure nothing: rewrite the .md and .png from the .json in --out")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  stem = out / "performance"
  if args.render_only:
    result = json.loads(stem.with_suffix(".json").read_text())
    result["targets"] = targets(result)           # the rules as the code states them now
    stem.with_suffix(".json").write_text(
        json.dumps(result, indent=1, default=bookkeeping.json_default) + "\n")
  else:
    command = "python -m experiments.performance " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    out.mkdir(parents=True, exist_ok=True)
    sections = tuple(args.sections.split(",")) if args.sections else SECTIONS
    remeasure = tuple(args.remeasure.split(",")) if args.remeasure else ()
    for name in sections + remeasure:
      if name not in SECTIONS:
        parser.error(f"unknown section {name!r}; expected some of {', '.join(SECTIONS)}")
    result = run(get_config(args.quick), command.strip(), partial=stem.with_suffix(".partial.json"),
                 sections=sections, remeasure=remeasure, previous=stem.with_suffix(".json"))
    stem.with_suffix(".json").write_text(
        json.dumps(result, indent=1, default=bookkeeping.json_default) + "\n")
  write_markdown(stem.with_suffix(".md"), result)
  write_plot(stem.with_suffix(".png"), result)
  report.log_targets(result["targets"], none_text="-")
  log(f"Wrote {stem}.json, {stem}.md, {stem}.png")
  return result


if __name__ == "__main__":
  main()
