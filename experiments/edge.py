"""Edge inference: the exported decode step in ONNX Runtime against JAX `generate`, DCA vs softmax.

    python -m experiments.edge                  # full run, ~12 min on the 2-core CPU
    python -m experiments.edge --quick          # contexts 1k and 8k, batch 1 (~3 min, one core)
    python -m experiments.edge --render-only    # rewrite the .md from the .json

Writes `<out>/edge.json` and `<out>/edge.md` (`--out docs` by default). Measured, for the
demo-size model (`experiments.decode_rate.demo_model`: 2 layers, d_model 128, 4 heads, window 64
for DCA; untrained, because a step's speed does not depend on the weights) of DCA and of softmax
attention, at batch 1 and 8 and at contexts of 1k, 8k and 32k tokens already in the cache:

1. Decode tokens/s of three runtimes:
   * JAX `generate`, timed as `experiments.decode_rate` does (544 minus 32 new tokens after a
     prompt of `context` tokens, median of the pairs);
   * ONNX Runtime, fp32 and int8 (dynamic int8 weights, `experiments.export.quantize_int8`, as
     the export CLI's `--int8`), the decode step exported with a fixed batch (the CLI's
     `--batch B`); for DCA also the symbolic-batch export (the CLI's default), fp32. The cache is
     filled by a JAX prefill of the context (chunks of 1,024 random bytes, batch 1, the rows then
     copied to the batch) and converted to NumPy; then, as `experiments/onnx_generate.py` runs
     it, each step's cache goes back into the next call: warm-up steps, then the median over
     repeats of the time of N consecutive steps, once for each intra_op_num_threads in
     `--threads` (1 and 2 by default) with inter_op_num_threads = 1; the table shows the fastest
     and its thread count (a batch-1 step is ~180 small nodes: one thread avoids the pool's
     synchronisation, while softmax's long caches gain from two).
   Softmax's cache holds context + 1,024 slots (the same length `generate` allocates with
   decode_rate's budget): its exported programs are rebuilt for each context.
2. Bytes of the .onnx files (fp32, int8) and of one row's decode state (from the cache layout
   that the export's manifest.json lists), at each context.
3. Energy per token of one decode step at batch 1, from the counting model of
   `experiments.energy` (FLOPs of the step counted by `dca_jax.flops`, plus reading every
   parameter and the row's whole cache from DRAM).
4. Int8 against fp32 accuracy: `lm_dca` trained briefly (its tiny variant with `--quick`),
   exported by `experiments.export.export_model` with `--int8`, bits per byte of a slice of the
   test split through the runner's `bits_per_byte`; with `--trained RUN` (repeatable) the same
   check on checkpoints trained elsewhere, e.g. the corpus comparison's 3000-step DCA run.
5. The targets (`targets`): DCA in ONNX Runtime at batch 1 at least as fast as JAX `generate`;
   its rate at the longest context within 15% of its rate at 1k; at 8k at least 5x softmax's
   through the same runtime.

Every measured cell is saved at once to `<out>/edge.partial.json`: a rerun with the same
settings skips the cells it holds (`--fresh` starts over). Exports and the trained run are kept
in `--workdir` (runs/edge) and reused.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import pathlib
import shlex
import sys
import time
from typing import Any, Mapping, Sequence

import numpy as np

from experiments import bookkeeping, energy, report
from experiments.bookkeeping import log

DCA, SOFTMAX = "dca", "softmax"
JAX, ORT_FP32, ORT_INT8, ORT_SYMBOLIC = "jax-generate", "ort-fp32", "ort-int8", "ort-fp32-symbolic"
RUNTIME_TEXT = {JAX: "JAX generate", ORT_FP32: "ONNX Runtime fp32", ORT_INT8: "ONNX Runtime int8",
                ORT_SYMBOLIC: "ONNX Runtime fp32, symbolic-batch export"}
OPTIONS = {DCA: {"window": 64}, SOFTMAX: {}}
TAIL = 1024          # cache slots past the context (decode_rate's generate budget)
CHUNK = 1024         # tokens per JAX prefill call when filling the ONNX caches
FLAT_TOLERANCE = 0.15
SOFTMAX_FACTOR = 5.0


@dataclasses.dataclass(frozen=True)
class Config:
  """One run's settings (recorded; a partial file made with other settings is not resumed).

  Attributes:
    contexts: tokens in the cache before the timed steps.
    batches: rows decoded together.
    attentions: the models compared.
    symbolic_row: also time DCA's symbolic-batch export (fp32).
    ort_repeats: timed repeats of N consecutive ONNX Runtime steps.
    ort_warmup: untimed steps first (they also estimate N).
    min_repeat_s: N is chosen so that a repeat takes about this long (4 <= N <= 64).
    jax_repeats: generate pairs per cell, at most.
    jax_budget_s: no new pair once a cell's pairs took this long (at least one pair).
    jax_max_quadratic: JAX cells of softmax with batch * context^2 above this are not measured
      (every generate call prefills the whole prompt through quadratic attention).
    train_config / train_tiny / train_steps: the run trained for the int8 comparison.
    bpb_rows / bpb_batch: test-split rows (of the run's seq_len + 1 bytes) and the batch of
      the exported prefill program.
  """

  contexts: tuple[int, ...] = (1024, 8192, 32768)
  batches: tuple[int, ...] = (1, 8)
  attentions: tuple[str, ...] = (DCA, SOFTMAX)
  symbolic_row: bool = True
  ort_repeats: int = 5
  ort_warmup: int = 3
  min_repeat_s: float = 0.2
  jax_repeats: int = 3
  jax_budget_s: float = 15.0
  jax_max_quadratic: float = 2.0**32
  train_config: str = "lm_dca"
  train_tiny: bool = False
  train_steps: int = 100
  bpb_rows: int = 128
  bpb_batch: int = 8
  quick: bool = False


def get_config(quick: bool) -> Config:
  """The full run, or the `--quick` subset (1k and 8k, batch 1, fewer repeats, tiny training)."""
  if not quick:
    return Config()
  return Config(contexts=(1024, 8192), batches=(1,), symbolic_row=False, ort_repeats=3,
                min_repeat_s=0.1,
                jax_repeats=2, jax_budget_s=8.0, train_tiny=True, train_steps=30, bpb_rows=64,
                bpb_batch=4, quick=True)


# --- pure pieces ------------------------------------------------------------------------------


def cell_key(attention: str, runtime: str, batch: int, context: int) -> str:
  """The key of one speed cell in the result's "speed" dict, e.g. 'dca/ort-fp32/b1/c1024'."""
  return f"{attention}/{runtime}/b{batch}/c{context}"


def runtimes(config: Config, attention: str) -> list[str]:
  """The runtimes timed for `attention`."""
  names = [JAX, ORT_FP32, ORT_INT8]
  if attention == DCA and config.symbolic_row:
    names.append(ORT_SYMBOLIC)
  return names


def cells(config: Config) -> list[tuple[str, str, int, int]]:
  """Every (attention, runtime, batch, context) of a run, in the order they are measured."""
  return [(a, r, b, c) for a in config.attentions for c in config.contexts
          for b in config.batches for r in runtimes(config, a)]


def missing(result: Mapping[str, Any], config: Config) -> list[tuple[str, str, int, int]]:
  """The cells of `config` that `result` (a partial result) does not hold yet."""
  speed = result.get("speed", {})
  return [c for c in cells(config) if cell_key(*c) not in speed]


def state_bytes_per_row(cache: Sequence[Mapping[str, Any]]) -> int:
  """Bytes of one row's decode state, from a manifest's "cache" list (name, shape with "B",
  dtype): every array at batch 1, per-model scalars included (as manifest.json's
  cache_bytes_per_row).

  Example:
    >>> state_bytes_per_row([{"shape": ["B", 64, 4, 32], "dtype": "float32"},
    ...                      {"shape": [], "dtype": "int32"}])
    32772
  """
  total = 0
  for entry in cache:
    shape = [1 if d == "B" else int(d) for d in entry["shape"]]
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(entry["dtype"]).itemsize
  return total


def steps_per_repeat(step_estimate_s: float, min_repeat_s: float, most: int) -> int:
  """N, the consecutive steps of one timed repeat: about `min_repeat_s` of work, 4 to `most`.

  Example:
    >>> steps_per_repeat(0.001, 0.1, 64), steps_per_repeat(0.5, 0.1, 64)
    (64, 4)
  """
  wanted = math.ceil(min_repeat_s / max(step_estimate_s, 1e-9))
  return int(max(4, min(most, wanted)))


def jax_skip_reason(config: Config, attention: str, batch: int, context: int) -> str | None:
  """Why a JAX generate cell is not measured (None: it is)."""
  work = batch * float(context) ** 2
  if attention == SOFTMAX and work > config.jax_max_quadratic:
    return (f"not measured: each generate call prefills {batch} x {context} tokens through "
            f"quadratic attention (batch x context^2 = {work:.2g} > {config.jax_max_quadratic:.2g})")
  return None


def rate(result: Mapping[str, Any], attention: str, runtime: str, batch: int,
         context: int) -> float | None:
  """Measured tokens/s of a cell, or None (not measured, skipped)."""
  record = result.get("speed", {}).get(cell_key(attention, runtime, batch, context))
  return None if not record or "tokens_per_s" not in record else record["tokens_per_s"]


def targets(result: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The targets of the edge work, each with its measured value (None: not measured)."""
  contexts = sorted(result["config"]["contexts"])
  out = []

  def add(name, value, goal, ok, detail):
    out.append({"target": name, "value": value, "goal": goal,
                 "status": "-" if value is None else ("PASS" if ok else "MISS"),
                 "detail": detail})

  ratios, parts = [], []
  for c in contexts:
    ort, jx = rate(result, DCA, ORT_FP32, 1, c), rate(result, DCA, JAX, 1, c)
    if ort and jx:
      ratios.append(ort / jx)
      int8 = rate(result, DCA, ORT_INT8, 1, c)
      parts.append(f"{c}: {ort / jx:.2f}x" + (f" (int8 {int8 / jx:.2f}x)" if int8 else ""))
  worst = min(ratios) if ratios else None
  add("DCA in ONNX Runtime fp32 at batch 1 at least as fast as JAX generate (worst context)",
      worst, ">= 1.0x", worst is not None and worst >= 1.0,
      "ONNX Runtime tokens/s / JAX generate tokens/s; " + ", ".join(parts))
  first, last = contexts[0], contexts[-1]
  a, b = rate(result, DCA, ORT_FP32, 1, first), rate(result, DCA, ORT_FP32, 1, last)
  flat = b / a if a and b and last != first else None
  add(f"DCA's ONNX Runtime fp32 rate at batch 1 does not depend on the context "
      f"({last} vs {first})", flat, f">= {1 - FLAT_TOLERANCE:.2f}x",
      flat is not None and flat >= 1 - FLAT_TOLERANCE,
      f"tokens/s at {last} / tokens/s at {first}")
  mine, theirs = rate(result, DCA, ORT_FP32, 1, 8192), rate(result, SOFTMAX, ORT_FP32, 1, 8192)
  ratio = mine / theirs if mine and theirs else None
  add("DCA vs softmax in ONNX Runtime fp32 at 8k context, batch 1", ratio,
      f">= {SOFTMAX_FACTOR:g}x", ratio is not None and ratio >= SOFTMAX_FACTOR,
      "DCA tokens/s / softmax tokens/s")
  return out


# --- rendering ------------------------------------------------------------------------------


def _k(context: int) -> str:
  return f"{context // 1024}k" if context % 1024 == 0 else str(context)


def _speed_cell(record: Mapping[str, Any] | None) -> str:
  if not record:
    return "-"
  if "tokens_per_s" not in record:
    return "n/m"
  threads = f", {record['threads']} thr" if "threads" in record else ""
  return f"{record['tokens_per_s']:,.0f} ({1e3 * record['step_s']:.2f} ms{threads})"


def _threads_text(threads: int | Sequence[int]) -> str:
  """`threads` of a result: one count (runs before 2026-12-04 afternoon) or the counts tried."""
  if isinstance(threads, int):
    return str(threads)
  return " and ".join(map(str, threads)) + " (each ONNX Runtime cell: the fastest, its count shown)"


POWER_RUNTIMES = (JAX, ORT_FP32)   # the runtimes whose programs the estimate counts (fp32)


def implied_watts(result: Mapping[str, Any], table: Mapping[str, Any], attention: str,
                  runtime: str, context: int) -> float | None:
  """The estimate's joules per token at batch 1 x the measured tokens/s (None: either missing)."""
  e = table.get(str(context), {}).get(attention)
  tokens_per_s = rate(result, attention, runtime, 1, context)
  if not e or not tokens_per_s:
    return None
  return energy.implied_watts(e["joules"], tokens_per_s)


def _energy_vs_measured(result, table, contexts) -> list[str]:
  """Implied watts at each measured batch-1 rate, where speed contradicts the estimate, and
  the brain's figure with what the model leaves out."""
  config = result["config"]
  lines = ["The watts those joules imply at the measured batch-1 rates of the decode table "
           "(µJ per token x tokens/s; the fp32 runtimes only: the estimate counts fp32 "
           "parameters):", "",
           "| attention | runtime | " + " | ".join(f"W @ {_k(c)}" for c in contexts) + " |",
           "|---|---|" + "---:|" * len(contexts)]
  for attention in config["attentions"]:
    for runtime in POWER_RUNTIMES:
      watts = [implied_watts(result, table, attention, runtime, c) for c in contexts]
      if any(w is not None for w in watts):
        lines.append(f"| {attention} | {RUNTIME_TEXT[runtime]} | " + " | ".join(
            "-" if w is None else f"{w:.2f}" for w in watts) + " |")
  found = []
  for runtime in POWER_RUNTIMES:
    for c in contexts:
      estimates = {a: e["ratio_to_softmax"] for a, e in table.get(str(c), {}).items()}
      rates = {a: rate(result, a, runtime, 1, c) for a in estimates}
      found.append(energy.contradiction_text(energy.contradictions(estimates, rates),
                                             f"{RUNTIME_TEXT[runtime]} at {_k(c)}, batch 1"))
  found = [f for f in found if f]
  lines.append("")
  if found:
    lines += [" ".join(found) + " At equal power energy follows time, so there the estimate is "
              "not borne out by the measurement.", ""]
  else:
    lines += ["Measured speed agrees in direction with the estimate in every cell above (the "
              "attention estimated cheaper was measured faster, in both fp32 runtimes).", ""]
  lines += [energy.brain_text(), ""]
  return lines


def render(result: Mapping[str, Any]) -> str:
  """The Markdown report of a result (see the module docstring)."""
  config = result["config"]
  contexts, batches = config["contexts"], config["batches"]
  machine = result["machine"]
  command = result["command"]
  where = (f"`{command}`, {result['date']} (UTC), {bookkeeping.machine_line(machine)}; "
           f"ONNX Runtime {result.get('onnxruntime', '?')} with intra_op_num_threads = "
           f"{_threads_text(result['threads'])}, inter_op_num_threads = 1; XLA_FLAGS = "
           f"`{result.get('xla_flags') or '(unset)'}`; the process could use "
           f"{machine.get('usable_cores')} of the machine's {machine.get('cpu_count')} cores; "
           f"commit {result.get('git_commit')}."
           + report.load_text(machine))
  lines = ["# Edge inference: the exported decode step in ONNX Runtime", ""]
  if config["quick"]:
    load = machine.get("load_average")
    busy = (f" of a busy machine (load average {load[0]:.1f} at the start)"
            if load and load[0] >= 1.0 else "")
    lines += [f"**Quick validation run** (`--quick`: contexts {', '.join(map(_k, contexts))}, "
              f"batch {', '.join(map(str, batches))}, fewer repeats, the tiny training run) on "
              f"{machine.get('usable_cores')} core(s){busy}, ONNX Runtime on "
              f"{_threads_text(result['threads'])} thread(s): it shows that the script works "
              "and roughly where the numbers lie; it is not the measurement of record. "
              "`python -m experiments.edge` (full run, ~12 min on 2 cores) rewrites this file.",
              ""]
  lines += [f"Every figure below: {where}", "",
            "Model: the demo-size language model (`experiments.decode_rate.demo_model`: 2 layers, "
            "d_model 128, 4 heads, byte vocabulary; DCA with window 64), untrained: a decode "
            "step's time does not depend on the weights. Context = tokens already in the cache "
            "before the timed steps.", "",
            "## Decode tokens/s", "",
            "Aggregate tokens/s over the batch rows (milliseconds per step). JAX generate: "
            "`experiments.decode_rate`'s measure (time for 544 new tokens minus time for 32, "
            "over 512, after a prompt of `context` random bytes; median of up to "
            f"{config['jax_repeats']} pairs). ONNX Runtime: the decode step exported with a "
            "fixed batch (`python -m experiments.export --batch B`; int8: `--int8`, dynamic int8 "
            "weights) and run as `experiments/onnx_generate.py` runs it, each call's cache fed "
            f"to the next; after {config['ort_warmup']} warm-up steps, the median over "
            f"{config['ort_repeats']} repeats of N consecutive steps (N in 4..64, about "
            f"{config['min_repeat_s']} s of work). Its cache was filled by a JAX prefill of the "
            f"context (chunks of {CHUNK} random bytes at batch 1, converted to NumPy, the row "
            "copied to every batch row), not by ONNX Runtime. Softmax's cache holds context + "
            f"{TAIL} slots in both runtimes. n/m: not measured (reason below the table).", "",
            "| attention | runtime | batch | " + " | ".join(
                f"context {_k(c)}" for c in contexts) + " |",
            "|---|---|---:|" + "---:|" * len(contexts)]
  speed = result.get("speed", {})
  reasons = {}
  for attention in config["attentions"]:
    for runtime in (JAX, ORT_FP32, ORT_INT8, ORT_SYMBOLIC):
      for batch in batches:
        records = [speed.get(cell_key(attention, runtime, batch, c)) for c in contexts]
        if not any(records):
          continue
        for r in records:
          if r and "skipped" in r:
            reasons[f"{attention}, {RUNTIME_TEXT[runtime]}, batch {batch}"] = r["skipped"]
        lines.append(f"| {attention} | {RUNTIME_TEXT[runtime]} | {batch} | "
                     + " | ".join(_speed_cell(r) for r in records) + " |")
  for what, why in reasons.items():
    lines += ["", f"n/m ({what}): {why}."]
  lines.append("")

  exports = result.get("exports", {})
  if exports:
    lines += ["## Model files and decode state", "",
              "The decode-step programs timed above (parameters baked in as constants). Nodes: "
              "the top-level ONNX graph's node count before ONNX Runtime's optimisations.", "",
              "| attention | contexts | export batch | max_length | fp32 .onnx | int8 .onnx | "
              "nodes | export s |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for key in sorted(exports):
      e = exports[key]
      int8 = report.format_bytes(e["int8_bytes"]) if e.get("int8_bytes") else "-"
      used = ", ".join(_k(c) for c in sorted(e.get("contexts", [])))
      lines.append(f"| {e['attention']} | {used} | {e['batch']} | {e['max_length']:,} | "
                   f"{report.format_bytes(e['fp32_bytes'])} | {int8} | {e['nodes']:,} | "
                   f"{e['export_s']:.1f} |")
    lines.append("")
  state = result.get("state_bytes_per_row", {})
  if state:
    lines += ["Decode state of one row (the manifest's cache layout, every array at batch 1; "
              "softmax at max_length = context + " + f"{TAIL}):", "",
              "| attention | " + " | ".join(f"context {_k(c)}" for c in contexts) + " |",
              "|---|" + "---:|" * len(contexts)]
    for attention, row in state.items():
      lines.append(f"| {attention} | " + " | ".join(
          report.format_bytes(row[str(c)]) if str(c) in row else "-" for c in contexts) + " |")
    lines.append("")

  table = result.get("energy", {})
  if table:
    lines += ["## Energy per token (estimate)", "",
              "One decode step at batch 1, from the counting model of `experiments/energy.py` "
              f"(the one of docs/benchmark_results.md): {energy.E_FLOP_PJ} pJ per FLOP and "
              f"{energy.E_DRAM_PJ_PER_BYTE:.0f} pJ per DRAM byte ({energy.ENERGY_SOURCE}); "
              "FLOPs of the step counted exactly by `dca_jax.flops.count_flops`, DRAM bytes = "
              "fp32 parameters + the row's whole cache. An estimate, not a measurement.", "",
              "| attention | " + " | ".join(f"µJ @ {_k(c)}" for c in contexts) + " | "
              + " | ".join(f"vs softmax @ {_k(c)}" for c in contexts) + " |",
              "|---|" + "---:|" * (2 * len(contexts))]
    for attention in config["attentions"]:
      cells_ = [table.get(str(c), {}).get(attention) for c in contexts]
      lines.append(f"| {attention} | " + " | ".join(
          f"{1e6 * e['joules']:.3g}" if e else "-" for e in cells_) + " | " + " | ".join(
              f"{e['ratio_to_softmax']:.3f}" if e else "-" for e in cells_) + " |")
    lines.append("")
    lines += _energy_vs_measured(result, table, contexts)

  acc = result.get("accuracy")
  if acc:
    lines += ["## Int8 against fp32: bits per byte", "",
              f"`{acc['train_command']}` ({acc['steps']} steps, {acc['train_s']:.0f} s), then "
              f"`experiments.export.export_model` with int8 (prefill length {acc['prefill_length']}"
              f", batch {acc['batch']}), then `experiments.onnx_generate.bits_per_byte` on the "
              f"first {acc['rows']} rows of {acc['prefill_length'] + 1} bytes of the test split "
              f"({acc['bytes']:,} predicted bytes; each row from an empty cache). "
              + ("The tiny config (1 layer, d_model 32) trained for a few steps: this checks the "
                 "path, the figures say little about int8 on a real model. " if acc["tiny"] else "")
              + "Run through ONNX Runtime with the same threads as above.", "",
              "| program | bits per byte | prefill .onnx | seconds |", "|---|---:|---:|---:|"]
    for name in ("fp32", "int8"):
      r = acc[name]
      lines.append(f"| {name} | {r['bpb']:.4f} | {report.format_bytes(r['prefill_bytes'])} | "
                   f"{r['seconds']:.2f} |")
    lines += ["", f"int8 - fp32: {acc['int8']['bpb'] - acc['fp32']['bpb']:+.4f} bits per byte. "
              f"The trained export's manifest.json gives cache_bytes_per_row = "
              f"{acc['cache_bytes_per_row']:,} bytes"
              + ("." if acc["tiny"] else " (the lm_dca config is the demo model's DCA: the same "
                 "figure as the state table above)."), ""]

  trained = result.get("accuracy_trained")
  if trained:
    lines += ["### The same check on longer-trained runs", "",
              "Checkpoints of runs trained elsewhere (`--trained RUN`), exported and scored as "
              "above (prefill length = the run's T).", "",
              "| run | attention | steps | fp32 bpb | int8 bpb | int8 - fp32 | decode step .onnx "
              "fp32 / int8 | prefill .onnx fp32 / int8 |", "|---|---|---:|---:|---:|---:|---|---|"]
    for name, r in trained.items():
      lines.append(
          f"| {name} | {r['attention']} | {r['steps']} | {r['fp32']['bpb']:.4f} | "
          f"{r['int8']['bpb']:.4f} | {r['int8']['bpb'] - r['fp32']['bpb']:+.4f} | "
          f"{report.format_bytes(r['fp32']['decode_bytes'])} / "
          f"{report.format_bytes(r['int8']['decode_bytes'])} | "
          f"{report.format_bytes(r['fp32']['prefill_bytes'])} / "
          f"{report.format_bytes(r['int8']['prefill_bytes'])} |")
    lines.append("")

  if result.get("targets"):
    lines += report.targets_section(result["targets"], lambda r: "-" if r["value"] is None
                                    else f"{r['value']:.2f}x")
    lines.append("")
  if "runtime_s" in result:
    lines += [f"Wall time of the run: {result['runtime_s'] / 60:.1f} min (summed over the "
              "invocations that filled the partial file).", ""]
  return "\n".join(lines)


# --- measurement ----------------------------------------------------------------------------


def _session(path: pathlib.Path, threads: int):
  """An ONNX Runtime CPU session with the runner's options (`OnnxLM`'s)."""
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  options = ort.SessionOptions()
  options.log_severity_level = 3
  options.intra_op_num_threads = threads
  options.inter_op_num_threads = 1
  return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def time_ort(session, cache: Sequence[np.ndarray], batch: int, config: Config) -> dict[str, Any]:
  """Median seconds per decode step of `session` from `cache` (see the module docstring)."""
  names = [i.name for i in session.get_inputs()]

  def steps(n, cache, token):
    for _ in range(n):
      out = session.run(None, dict(zip(names, [token, *cache])))
      token, cache = out[0].argmax(-1).astype(np.int32), out[1:]
    return cache, token

  token = np.zeros((batch,), np.int32)
  start = time.perf_counter()
  cache, token = steps(config.ort_warmup, list(cache), token)
  estimate = (time.perf_counter() - start) / config.ort_warmup
  most = min(64, (TAIL - config.ort_warmup) // config.ort_repeats)
  n = steps_per_repeat(estimate, config.min_repeat_s, most)
  times = []
  for _ in range(config.ort_repeats):
    start = time.perf_counter()
    cache, token = steps(n, cache, token)
    times.append(time.perf_counter() - start)
  step = sorted(times)[len(times) // 2] / n
  return {"tokens_per_s": batch / step, "step_s": step, "steps_per_repeat": n,
          "repeats": config.ort_repeats}


def _max_length(model, context: int, contexts: Sequence[int]) -> int:
  """The export's max_length: context + TAIL, or one length for every context when the cache
  does not grow with it (then one export serves them all)."""
  from dca_jax.nn import export as export_lib  # pylint: disable=import-outside-toplevel
  longest = max(contexts) + TAIL
  shapes = [e.shape for e in export_lib.cache_layout(model, longest)]
  if shapes == [e.shape for e in export_lib.cache_layout(model, longest + 1)]:
    return longest
  return context + TAIL


@contextlib.contextmanager
def _quiet_root_logger():
  """ONNX Runtime's quantiser logs (root logger) every tensor whose type it cannot infer; those
  are not errors, and they would bury the progress lines."""
  root = logging.getLogger()
  level = root.level
  root.setLevel(logging.ERROR)
  try:
    yield
  finally:
    root.setLevel(level)


def export_decode(model, max_length: int, batch: int | None, directory: pathlib.Path,
                  int8: bool = True) -> dict[str, Any]:
  """The decode step exported to `directory` (reused when already there): fp32 .onnx with a fixed
  batch (None: symbolic), its int8 version; returns what the report lists."""
  import onnx  # pylint: disable=import-outside-toplevel

  from dca_jax.nn import export as export_lib  # pylint: disable=import-outside-toplevel
  from dca_jax.nn import onnx_graph  # pylint: disable=import-outside-toplevel
  from experiments import export as export_cli  # pylint: disable=import-outside-toplevel
  meta = directory / "export.json"
  # An export written by another converter than export_onnx would pick now (e.g. a jax2onnx
  # export from before the graph builder) is redone, so that a rerun times the current path.
  converter = "graph" if onnx_graph.unsupported_reason(model) is None else "jax2onnx"
  if meta.exists():
    record = json.loads(meta.read_text())
    if record.get("converter", "jax2onnx") == converter:
      return record
  directory.mkdir(parents=True, exist_ok=True)
  start = time.perf_counter()
  result = export_lib.export_onnx(model, max_length, fallback_batch=batch or 1,
                                  symbolic_batch=batch is None)
  fp32 = directory / "decode_step.onnx"
  fp32.write_bytes(result.data)
  int8_path = directory / "decode_step.int8.onnx"
  if int8:
    with _quiet_root_logger():
      export_cli.quantize_int8(fp32, int8_path)
  record = {"attention": model.config.attention, "batch": result.batch, "max_length": max_length,
            "fp32_bytes": fp32.stat().st_size,
            "int8_bytes": int8_path.stat().st_size if int8 else None,
            "nodes": len(onnx.load(str(fp32)).graph.node),
            "converter": result.converter,
            "export_s": time.perf_counter() - start,
            "fallback_reason": result.fallback_reason,
            "cache": [e.to_dict() for e in export_lib.cache_layout(model, max_length)]}
  bookkeeping.write_json(meta, record)
  return record


def context_caches(model, max_length: int, contexts: Sequence[int],
                   seed: int = 0) -> dict[int, list[np.ndarray]]:
  """Batch-1 caches after the first c tokens of one random byte stream, for every c in
  `contexts`, from one chunked JAX prefill (as NumPy arrays in the export's layout)."""
  import jax  # pylint: disable=import-outside-toplevel

  from dca_jax.nn import export as export_lib  # pylint: disable=import-outside-toplevel
  layout = export_lib.cache_layout(model, max_length)
  prefill = jax.jit(export_lib.prefill_function(model, max_length))
  tokens = np.random.default_rng(seed).integers(0, 256, (1, max(contexts)), dtype=np.int32)
  cache = export_lib.init_cache_arrays(layout, 1)
  done, out = 0, {}
  for context in sorted(contexts):
    while done < context:
      n = min(CHUNK, context - done)
      _, *cache = prefill(tokens[:, done:done + n], *cache)
      done += n
    out[context] = [np.asarray(x) for x in cache]
  return out


def rows(cache: Sequence[np.ndarray], layout: Sequence[Mapping[str, Any]],
         batch: int) -> list[np.ndarray]:
  """A batch-1 cache copied to `batch` rows along each array's batch axis."""
  return [np.repeat(a, batch, axis=e["batch_axis"]) if e["batch_axis"] is not None else a
          for a, e in zip(cache, layout)]


class Run:
  """One run's state: the result dict, its partial file, and what is built on the way."""

  def __init__(self, config: Config, result: dict[str, Any], partial: pathlib.Path | None,
               workdir: pathlib.Path, threads: Sequence[int]):
    self.config, self.result, self.partial = config, result, partial
    self.workdir, self.threads = workdir, threads
    self.models: dict[str, Any] = {}
    self.caches: dict[tuple[str, int], dict[int, list[np.ndarray]]] = {}
    self.sessions: dict[str, Any] = {}

  def save(self) -> None:
    if self.partial is not None:
      bookkeeping.write_json(self.partial, self.result, indent=1)

  def model(self, attention: str):
    if attention not in self.models:
      from experiments import decode_rate  # pylint: disable=import-outside-toplevel
      self.models[attention] = decode_rate.demo_model(attention, OPTIONS[attention])
    return self.models[attention]

  def export(self, attention: str, batch: int | None, max_length: int,
             context: int) -> dict[str, Any]:
    name = f"{attention}_b{batch or 'B'}_L{max_length}"
    record = export_decode(self.model(attention), max_length, batch, self.workdir / "onnx" / name,
                           int8=batch is not None)
    record["dir"] = str(self.workdir / "onnx" / name)
    exports = self.result.setdefault("exports", {})
    used = sorted(set(exports.get(name, {}).get("contexts", [])) | {context})
    exports[name] = {**{k: v for k, v in record.items() if k not in ("cache", "dir")},
                     "contexts": used}
    return record

  def cache(self, attention: str, max_length: int, context: int) -> list[np.ndarray]:
    key = (attention, max_length)
    if key not in self.caches or context not in self.caches[key]:
      self.caches = {k: v for k, v in self.caches.items() if k[0] == attention}
      wanted = [c for c in self.config.contexts
                if _max_length(self.model(attention), c, self.config.contexts) == max_length]
      start = time.perf_counter()
      self.caches[key] = context_caches(self.model(attention), max_length, wanted)
      log(f"  {attention}: JAX prefill of contexts {wanted} (max_length {max_length}) "
          f"{time.perf_counter() - start:.1f} s")
    return self.caches[key][context]

  def measure_cell(self, attention: str, runtime: str, batch: int, context: int) -> dict:
    config = self.config
    record = {"attention": attention, "runtime": runtime, "batch": batch, "context": context}
    if runtime == JAX:
      reason = jax_skip_reason(config, attention, batch, context)
      if reason:
        return {**record, "skipped": reason}
      import jax  # pylint: disable=import-outside-toplevel

      from experiments import decode_rate  # pylint: disable=import-outside-toplevel
      prompt = jax.random.randint(jax.random.key(0), (batch, context), 0, 256)
      step, pairs = decode_rate.generate_step_time(self.model(attention), prompt,
                                                   config.jax_repeats, config.jax_budget_s)
      return {**record, "tokens_per_s": batch / step, "step_s": step, "repeats": pairs,
              "date": bookkeeping.now()}
    max_length = _max_length(self.model(attention), context, config.contexts)
    export = self.export(attention, None if runtime == ORT_SYMBOLIC else batch, max_length,
                         context)
    path = pathlib.Path(export["dir"]) / ("decode_step.int8.onnx" if runtime == ORT_INT8
                                          else "decode_step.onnx")
    cache = rows(self.cache(attention, max_length, context), export["cache"], batch)
    by_threads = {}
    for threads in self.threads:   # one session held at a time
      session = _session(path, threads)
      by_threads[threads] = time_ort(session, cache, batch, config)
      del session
    best = min(by_threads, key=lambda n: by_threads[n]["step_s"])
    return {**record, **by_threads[best], "threads": best,
            "by_threads": {str(n): t["step_s"] for n, t in by_threads.items()},
            "export": pathlib.Path(export["dir"]).name, "date": bookkeeping.now()}

  def measure_speed(self) -> None:
    speed = self.result.setdefault("speed", {})
    todo = missing(self.result, self.config)
    if len(todo) < len(cells(self.config)):
      log(f"{len(cells(self.config)) - len(todo)} cells kept from {self.partial}")
    for cell in todo:
      start = time.perf_counter()
      record = self.measure_cell(*cell)
      speed[cell_key(*cell)] = record
      self.save()
      log(f"{cell_key(*cell)}: {_speed_cell(record)} [{time.perf_counter() - start:.1f} s]")

  def measure_sizes(self) -> None:
    """State bytes per row and the energy estimate per context (counted, not timed)."""
    import jax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from dca_jax.flops import count_flops  # pylint: disable=import-outside-toplevel
    from dca_jax.nn import export as export_lib  # pylint: disable=import-outside-toplevel
    state = self.result.setdefault("state_bytes_per_row", {})
    table = self.result.setdefault("energy", {})
    params = {}
    for context in self.config.contexts:
      info = {}
      for attention in self.config.attentions:
        model = self.model(attention)
        max_length = _max_length(model, context, self.config.contexts)
        layout = export_lib.cache_layout(model, max_length)
        cache_bytes = state_bytes_per_row([e.to_dict() for e in layout])
        state.setdefault(attention, {})[str(context)] = cache_bytes
        params[attention] = int(sum(x.nbytes for x in jax.tree_util.tree_leaves(
            nnx.state(model, nnx.Param))))
        flops = count_flops(export_lib.decode_step_function(model, max_length),
                            *export_lib.input_specs(layout, 1)).flops
        info[attention] = {f"decode_flops_per_token/{context}": flops,
                           "param_bytes": params[attention],
                           f"cache_bytes/{context}": cache_bytes, "forward_flops_per_token": {}}
      rows_ = energy.energy_table(info, [context], [])
      table[str(context)] = {a: {"joules": rows_[a][f"decode_joules/{context}"],
                                 "ratio_to_softmax": rows_[a][f"decode/{context}"],
                                 "flops": info[a][f"decode_flops_per_token/{context}"],
                                 "dram_bytes": info[a]["param_bytes"] + info[a][
                                     f"cache_bytes/{context}"]} for a in info}
    self.result["param_bytes"] = params
    self.save()

  def int8_bits_per_byte(self, model, prefill_length: int, out: pathlib.Path):
    """({"fp32": ..., "int8": ...} bits per byte through the runner, manifest) of `model`
    exported with int8 to `out` (reused when there), on the first `bpb_rows` test rows."""
    from experiments import corpus as corpus_lib  # pylint: disable=import-outside-toplevel
    from experiments import export as export_cli  # pylint: disable=import-outside-toplevel
    from experiments import onnx_generate  # pylint: disable=import-outside-toplevel
    c, p = self.config, prefill_length
    if not (out / "manifest.json").exists():
      with _quiet_root_logger():
        export_cli.export_model(model, out, prefill_length=p, max_length=p, batch=c.bpb_batch,
                                int8=True, log=log)
    manifest = json.loads((out / "manifest.json").read_text())
    corpus = corpus_lib.build_default_corpus()
    data = b"".join(corpus.splits["test"])[:c.bpb_rows * p + 1]
    figures = {}
    for name, int8 in (("fp32", False), ("int8", True)):
      lm = onnx_generate.OnnxLM(out, int8=int8, threads=max(self.threads))
      bpb = onnx_generate.bits_per_byte(lm, data, rows=c.bpb_rows, batch_size=c.bpb_batch)
      prefill = "prefill.int8.onnx" if int8 else "prefill.onnx"
      decode = "decode_step.int8.onnx" if int8 else "decode_step.onnx"
      figures[name] = {**bpb, "prefill_bytes": manifest["files"][prefill]["bytes"],
                       "decode_bytes": manifest["files"][decode]["bytes"]}
      log(f"int8 check: {name} {bpb['bpb']:.4f} bits per byte ({bpb['seconds']:.1f} s)")
    return figures, manifest

  def measure_trained(self, runs: Sequence[pathlib.Path]) -> None:
    """The int8 check on runs trained elsewhere (e.g. the corpus comparison's), when given."""
    from experiments import checkpoints as checkpoints_lib  # pylint: disable=import-outside-toplevel
    table = self.result.setdefault("accuracy_trained", {})
    for run_dir in runs:
      name = run_dir.name
      if name in table:
        log(f"int8 check on {run_dir}: kept from {self.partial}")
        continue
      config, model, step = checkpoints_lib.load_checkpoint(run_dir)
      figures, _ = self.int8_bits_per_byte(model, config.seq_len,
                                           self.workdir / f"trained_{name}_export")
      table[name] = {"workdir": str(run_dir), "steps": step, "seq_len": config.seq_len,
                     "attention": config.attention, **figures, "date": bookkeeping.now()}
      self.save()

  def measure_accuracy(self) -> None:
    """Trains the config briefly (reused when done), exports with int8, bits per byte."""
    if "accuracy" in self.result:
      log(f"accuracy: kept from {self.partial}")
      return
    from experiments import checkpoints as checkpoints_lib  # pylint: disable=import-outside-toplevel
    from experiments import configs as configs_lib  # pylint: disable=import-outside-toplevel
    from experiments import train as train_lib  # pylint: disable=import-outside-toplevel
    c = self.config
    steps = c.train_steps
    overrides = {"steps": steps, "eval_every": steps, "checkpoint_every": steps}
    config = configs_lib.load_config(c.train_config, tiny=c.train_tiny, overrides=overrides)
    run_dir = self.workdir / f"{c.train_config}{'_tiny' if c.train_tiny else ''}_{steps}"
    start = time.perf_counter()
    done = checkpoints_lib.latest_step(run_dir) if (run_dir / "run.json").exists() else None
    if done != steps:
      log(f"accuracy: training {c.train_config}{' (tiny)' if c.train_tiny else ''} for "
          f"{steps} steps in {run_dir}")
      train_lib.train(config, run_dir, resume=done is not None, progress=False)
    train_s = time.perf_counter() - start
    _, model, step = checkpoints_lib.load_checkpoint(run_dir)
    p = config.seq_len
    figures, manifest = self.int8_bits_per_byte(model, p, run_dir / "export")
    sets = " ".join(f"--set {k}={v}" for k, v in overrides.items())
    self.result["accuracy"] = {
        "train_command": f"python -m experiments.train --config {c.train_config}"
                         f"{' --tiny' if c.train_tiny else ''} {sets} --workdir RUN",
        "steps": step, "tiny": c.train_tiny, "train_s": train_s, "prefill_length": p,
        "batch": c.bpb_batch, "rows": figures["fp32"]["rows"], "bytes": figures["fp32"]["bytes"],
        "cache_bytes_per_row": manifest["cache_bytes_per_row"], **figures,
        "date": bookkeeping.now()}
    self.save()


def run(config: Config, command: str, partial: pathlib.Path | None, workdir: pathlib.Path,
        threads: Sequence[int], fresh: bool = False,
        trained: Sequence[pathlib.Path] = ()) -> dict[str, Any]:
  """Measures everything `config` asks for, resuming from `partial` (see the module docstring)."""
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  result: dict[str, Any] = {}
  settings = {"config": dataclasses.asdict(config), "threads": list(threads)}
  if partial is not None and partial.exists() and not fresh:
    result = json.loads(partial.read_text())
    if {k: result.get(k) for k in settings} != json.loads(json.dumps(settings)):
      log(f"{partial} was made with other settings: starting afresh")
      result = {}
  result.update(settings, command=command, machine=bookkeeping.machine_info(),
                date=bookkeeping.now(), git_commit=bookkeeping.git_commit(),
                xla_flags=os.environ.get("XLA_FLAGS"), onnxruntime=ort.__version__)
  state = Run(config, result, partial, workdir, threads)
  started = time.perf_counter()
  state.measure_sizes()
  state.measure_speed()
  state.measure_accuracy()
  state.measure_trained(trained)
  result["runtime_s"] = result.get("runtime_s", 0.0) + time.perf_counter() - started
  result["machine"]["load_average_end"] = bookkeeping.load_average()
  result["targets"] = targets(result)
  state.save()
  return result


def _thread_counts(parser: argparse.ArgumentParser, text: str) -> tuple[int, ...]:
  """--threads "1,2" -> (1, 2); a parser error for anything but positive integers."""
  try:
    counts = tuple(int(n) for n in text.split(","))
  except ValueError:
    counts = ()
  if not counts or min(counts) < 1:
    parser.error(f"--threads takes comma-separated integers >= 1, got {text!r}")
  return tuple(sorted(set(counts)))


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="contexts 1k and 8k, batch 1 (~3 min)")
  parser.add_argument("--out", default="docs", help="output folder (default: docs)")
  parser.add_argument("--workdir", default="runs/edge",
                      help="exports and the trained run, reused by reruns (default: runs/edge)")
  parser.add_argument("--threads", default="1,2",
                      help="comma-separated intra_op_num_threads to time each ONNX Runtime cell "
                           "with; the fastest is reported (default: 1,2)")
  parser.add_argument("--fresh", action="store_true", help="ignore the partial file")
  parser.add_argument("--trained", action="append", default=[], metavar="RUN",
                      help="also run the int8 check on this trained run's checkpoint (e.g. "
                           "runs/corpus/lm_dca_x3; repeatable)")
  parser.add_argument("--render-only", action="store_true",
                      help="measure nothing: rewrite the .md from the .json in --out")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  stem = out / "edge"
  if args.render_only:
    result = json.loads(stem.with_suffix(".json").read_text())
  else:
    command = "python -m experiments.edge " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    out.mkdir(parents=True, exist_ok=True)
    result = run(get_config(args.quick), command.strip(), stem.with_suffix(".partial.json"),
                 pathlib.Path(args.workdir), _thread_counts(parser, args.threads),
                 fresh=args.fresh, trained=[pathlib.Path(t) for t in args.trained])
    bookkeeping.write_json(stem.with_suffix(".json"), result, indent=1)
  stem.with_suffix(".md").write_text(render(result) + "\n", encoding="utf-8")
  report.log_targets(result["targets"], none_text="-")
  log(f"Wrote {stem}.json, {stem}.md")
  return result


if __name__ == "__main__":
  main()
