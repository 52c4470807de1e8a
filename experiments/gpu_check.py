"""The GPU check: the library's forms and layers measured on a GPU, in one short run.

    python -m experiments.gpu_check --out DIR [--budget-s 300] [--sections env,precision,...]

The project's own machine has no GPU; this script is what runs when one is lent for a few
minutes (docs/gpu.md has the figures, the machine, the date and the exact command). Everything
it measures comes from one process on one device, side by side, as the CPU benchmarks do
(`experiments.benchmark`: median of repeats after a warm-up, contenders round-robin):

1. env: JAX's version and device, the dense-matmul rate in float32 at JAX's default precision
   (on NVIDIA GPUs since Ampere that is TF32 for float32 matmuls) and at "highest" (true float32),
   and in bfloat16.
2. precision: how far the default precision moves DCA's outputs from "highest" (the tests run
   at "highest": JAX_DEFAULT_MATMUL_PRECISION=highest), the engine's chunked form against its
   recurrent form under both.
3. layers: the five layers of `dca_jax.nn` (d_model 256, 4 heads, batch 1, float32, as in
   docs/performance.md) and PyTorch's SDPA layer on CUDA (`experiments.torch_peer`), forward and
   forward+backward at T = 1024 ... 32768.
4. engine: the planner's sweep on this backend (quadratic, recurrent, chunked C = 32/64/128,
   forward and forward+backward, B = 1, H = 4, K = V = 64, T = 64 ... 65536), with the planner's
   pick against the best form at each T: the GPU row of `dca_jax.ops.planner` comes from it.
   Beside it from T = 1024, softmax on the same shape three ways (XLA's dot_product_attention,
   the library's blocked form, cuDNN's fused kernel in bfloat16), to choose the GPU's route for
   `SoftmaxAttention`.
5. training: LM training steps of `lm_dca` against `lm_softmax` (tokens/s at T = 256 x 8 and
   T = 2048 x 1), as in docs/performance.md.

A section that would start after `--budget-s` seconds is recorded as not run. The result is
written to DIR/gpu_check.json after every section (a run that is cut off keeps what it
measured). Rendering, on any machine:

    python -m experiments.gpu_check --render --inputs A/gpu_check.json B/gpu_check.json \
        --pytest-log A/pytest.log --out docs

merges the sections of one or more such files (a later file's section replaces an earlier's),
adds the counts of the pytest log of the same lease (tests run on the GPU) and writes
docs/gpu_check.json and docs/gpu.md.

Run with XLA_PYTHON_CLIENT_PREALLOCATE=false, so that the PyTorch peer's process finds GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dca_jax.nn import DCAttention
from dca_jax.nn import softmax as softmax_layer
from dca_jax.ops import gated_linear_attention, planner
from dca_jax.ops.blocked_softmax import blocked_causal_attention
from experiments import benchmark, benchmark_engine, benchmark_layers, bookkeeping, torch_peer
from experiments.bookkeeping import log

# Layers before the engine: the 2026-12-04 lease ran out of time inside the engine's sweep (GPU
# compilation, ~5 s per program, dominates) and never reached T >= 16384 of the layers.
SECTIONS = ("env", "precision", "layers", "engine", "training")
ENGINE_LENGTHS = (64, 256, 1024, 4096, 16384, 65536)
LAYER_LENGTHS = (1024, 4096, 16384, 32768)
TRAIN_LENGTHS = ((256, 8), (2048, 1))
MATMUL_N = 8192
SOFTMAX_MIN_T = 1024      # the engine section's softmax contenders run from this T
# --smoke: the same code paths at sizes a CPU runs in a minute or two (to try the script before
# a lease, not to measure).
SMOKE = {"ENGINE_LENGTHS": (64, 256), "LAYER_LENGTHS": (256,), "TRAIN_LENGTHS": ((128, 2),),
         "MATMUL_N": 512, "SOFTMAX_MIN_T": 256}


def _gpu_name() -> str | None:
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None


def _rates(n: int) -> dict[str, Any]:
  """Dense n x n matmul rates: float32 default and highest precision, bfloat16."""
  with jax.default_matmul_precision("default"):
    rates = {"float32 default": benchmark.matmul_gflops(n, repeats=20)}
  with jax.default_matmul_precision("highest"):
    rates["float32 highest"] = benchmark.matmul_gflops(n, repeats=20)
  rates["bfloat16"] = benchmark.matmul_gflops(n, repeats=20, dtype=jnp.bfloat16)
  return rates


def section_env() -> dict[str, Any]:
  device = jax.devices()[0]
  info = {"jax": jax.__version__, "backend": jax.default_backend(),
          "device_kind": getattr(device, "device_kind", str(device)),
          "device_count": jax.device_count(), "nvidia_smi": _gpu_name(),
          "python": platform.python_version(), "machine": bookkeeping.machine_info()}
  info["matmul"] = _rates(MATMUL_N)
  for name, rate in info["matmul"].items():
    log(f"matmul {MATMUL_N}^3 {name}: {rate['gflops']:.0f} GFLOP/s")
  return info


def _relative(a: jax.Array, b: jax.Array) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def section_precision() -> dict[str, Any]:
  """Default (TF32 on recent NVIDIA GPUs) against highest precision: DCA layer and engine."""
  rows = {}
  layer = DCAttention(256, 4, window=64, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (1, 1024, 256), jnp.float32)
  # Explicit contexts: a JAX_DEFAULT_MATMUL_PRECISION in the environment must not change what
  # "default" means here.
  with jax.default_matmul_precision("default"):
    y_default = jax.jit(benchmark_layers.forward_fn(graphdef))(state, x)
  with jax.default_matmul_precision("highest"):
    y_highest = jax.jit(benchmark_layers.forward_fn(graphdef))(state, x)
  rows["DCAttention T=1024: default vs highest"] = _relative(y_default, y_highest)
  config = benchmark_engine.get_config(batch=1, heads=4)
  inputs = benchmark_engine.make_inputs(config, 4096, {"head"}, cotangent=False)
  args = (inputs["q"], inputs["k"], inputs["v"], inputs["head"])
  outputs = {}
  for precision in ("default", "highest"):
    with jax.default_matmul_precision(precision):
      for mode in ("chunked", "recurrent"):
        fn = jax.jit(lambda *a, mode=mode: gated_linear_attention(*a, mode=mode))
        outputs[mode, precision] = fn(*args)
  for precision in ("default", "highest"):
    rows[f"engine T=4096 chunked vs recurrent, {precision}"] = _relative(
        outputs["chunked", precision], outputs["recurrent", precision])
  rows["engine T=4096 chunked: default vs highest"] = _relative(
      outputs["chunked", "default"], outputs["chunked", "highest"])
  for name, value in rows.items():
    log(f"{name}: max relative difference {value:.2e}")
  return {"max_relative_difference": rows}


def _softmax_xla(q, k, v, g):
  del g
  return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")


def _softmax_blocked(q, k, v, g):
  del g
  return blocked_causal_attention(q, k, v, scale=q.shape[-1]**-0.5, block=128)


def _softmax_cudnn(q, k, v, g):
  del g
  bf16 = jnp.bfloat16
  return jax.nn.dot_product_attention(q.astype(bf16), k.astype(bf16), v.astype(bf16),
                                      is_causal=True, implementation="cudnn").astype(q.dtype)


def section_engine(deadline: float) -> dict[str, Any]:
  config = benchmark_engine.get_config(
      lengths=(), long_lengths=(), planner_lengths=ENGINE_LENGTHS, planner_chunks=(32, 64, 128),
      repeats=5, big_repeats=5, min_total_s=0.2, max_repeats=30, max_timed_s=5.0,
      time_budget_s=4.0, memory_budget_gib=60.0, quadratic_max_t=8192)
  runner = benchmark_engine.make_runner(config)
  sweep = benchmark_engine.planner_contenders(config)
  # Limits from the lease of 2026-12-04 (docs/gpu.md): the token scan was 77-307x slower than
  # the chunked form from T = 1024 (one launch per token), so it stops at 4096.
  limits = {"quadratic": 8192, "recurrent": 4096}
  sweep = [benchmark_engine.Contender(c.name, c.fwd, c.decay, c.exponent,
                                      max_t=limits.get(c.name, c.max_t)) for c in sweep]
  # Softmax on the same shape, to decide the GPU's softmax route (docs/gpu.md: the library's
  # blocked form took 34.5 ms at T = 4096 in the layer): XLA's dot_product_attention, the
  # blocked form, and cuDNN's fused kernel (bfloat16 inputs: cuDNN's flash attention takes
  # half precision only).
  softmax = [
      benchmark_engine.Contender("softmax, XLA dot_product_attention", _softmax_xla, None, 2,
                                 max_t=16384),
      benchmark_engine.Contender("softmax, blocked (SoftmaxAttention's long form)",
                                 _softmax_blocked, None, 2)]
  if jax.default_backend() == "gpu":
    softmax.append(benchmark_engine.Contender("softmax, cuDNN (bfloat16 inputs)", _softmax_cudnn,
                                              None, 2))
  records, not_run = [], []
  for length in ENGINE_LENGTHS:
    if time.monotonic() > deadline:
      not_run.append(length)
      continue
    log(f"engine T={length}")
    records += benchmark_engine.measure(
        runner, config, [(c, benchmark_engine.PASSES) for c in sweep], length,
        section="planner", repeats=config.repeats, min_total_s=config.min_total_s, count=True)
    if length >= SOFTMAX_MIN_T:
      records += benchmark_engine.measure(
          runner, config, [(c, benchmark_engine.PASSES) for c in softmax], length,
          section="softmax", repeats=config.repeats, min_total_s=config.min_total_s, count=True)
  planner = benchmark_engine.planner_analysis(
      benchmark_engine.get_config(planner_lengths=ENGINE_LENGTHS), records)
  return {"config": {"batch": config.batch, "heads": config.heads, "key_dim": config.key_dim,
                     "value_dim": config.value_dim}, "records": records, "planner": planner,
          "not_run_T": not_run}


def section_layers(deadline: float) -> dict[str, Any]:
  config = benchmark_layers.get_config(lengths=LAYER_LENGTHS, repeats=5, big_repeats=5,
                                       min_total_s=0.2, max_timed_s=5.0, time_budget_s=4.0,
                                       memory_budget_gib=60.0)
  splits, params = benchmark_layers.split_layers(config)
  peers, peer, peer_info = {}, None, {"name": torch_peer.name("cuda")}
  why_not = torch_peer.available()
  if why_not is None:
    try:
      peer = torch_peer.PeerProcess(config.d_model, config.num_heads, device="cuda")
    except RuntimeError as error:
      why_not = str(error)
  if peer is not None:
    peers[torch_peer.name("cuda")] = (peer.calls, 2)
    peer_info.update(version=peer.version, available=True)
    params[torch_peer.name("cuda")] = peer.num_params
  else:
    peer_info.update(available=False, reason=why_not)
    log(f"  torch peer skipped: {why_not}")
  runner = benchmark.Runner(memory_budget_gib=config.memory_budget_gib,
                            time_budget_s=config.time_budget_s, compile_exhausted=False)
  records, not_run = benchmark_layers.measure_lengths(runner, config, splits, LAYER_LENGTHS,
                                                      peers=peers, peer=peer, deadline=deadline)
  return {"records": records, "params": params, "peer": peer_info, "not_run_T": not_run}


def section_training(deadline: float) -> dict[str, Any]:
  from experiments import performance  # pylint: disable=import-outside-toplevel
  rows = []
  for length, batch in TRAIN_LENGTHS:
    if time.monotonic() > deadline:
      rows.append({"T": length, "batch": batch, "status": "not run (budget)"})
      continue
    rows += performance.measure_training(performance.Config(train_lengths=((length, batch),)))
  return {"rows": rows}


def run(out: pathlib.Path, sections: tuple[str, ...], budget_s: float,
        command: str) -> dict[str, Any]:
  start = time.monotonic()
  deadline = start + budget_s
  out.mkdir(parents=True, exist_ok=True)
  path = out / "gpu_check.json"
  result: dict[str, Any] = {"command": command, "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                      time.gmtime()),
                            "sections": {}, "not_run": []}
  for name in sections:
    if time.monotonic() > deadline:
      result["not_run"].append(name)
      continue
    log(f"== {name}")
    began = time.monotonic()
    try:
      if name == "env":
        value = section_env()
      elif name == "precision":
        value = section_precision()
      else:
        value = {"engine": section_engine, "layers": section_layers,
                 "training": section_training}[name](deadline)
    except Exception as error:  # pylint: disable=broad-except
      # One failing section must not cost the others their (rare) device time.
      value = {"error": f"{type(error).__name__}: {error}"}
      log(f"  section {name} failed: {value['error']}")
    value["runtime_s"] = time.monotonic() - began
    result["sections"][name] = value
    result["runtime_s"] = time.monotonic() - start
    path.write_text(json.dumps(result, indent=1, default=str))
  path.write_text(json.dumps(result, indent=1, default=str))     # with the sections not run
  return result


# ----------------------------------------------------------------------------------------------
# Rendering.


def parse_pytest_log(text: str) -> dict[str, Any]:
  """Per test file: passed / failed / error / skipped counts of a `pytest -v` log (xdist or not),
  and whether the log has pytest's final summary line (absent: the run was cut off)."""
  import re  # pylint: disable=import-outside-toplevel
  counts: dict[str, dict[str, int]] = {}
  for outcome, path in re.findall(r"\b(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) (tests/[\w/]+\.py)",
                                  text):
    counts.setdefault(path, {}).setdefault(outcome.lower(), 0)
    counts[path][outcome.lower()] += 1
  finished = re.search(r"^=+ .*\b(passed|failed)\b.* in [\d.]+s", text, re.M) is not None
  totals: dict[str, int] = {}
  for per_file in counts.values():
    for outcome, n in per_file.items():
      totals[outcome] = totals.get(outcome, 0) + n
  return {"files": counts, "totals": totals, "finished": finished}


def merge(paths: list[pathlib.Path]) -> dict[str, Any]:
  """One result from several runs' files: sections of later files replace earlier ones."""
  merged: dict[str, Any] = {"runs": [], "sections": {}}
  for path in paths:
    result = json.loads(path.read_text())
    merged["runs"].append({"command": result["command"], "date": result["date"],
                           "sections": sorted(result["sections"]),
                           "not_run": result.get("not_run", [])})
    merged["sections"].update(result["sections"])
  return merged


def _reading(result: dict[str, Any]) -> list[str]:
  """The few conclusions the figures support, each computed from them."""
  sections, out = result["sections"], []
  env, precision = sections.get("env", {}), sections.get("precision", {})
  rates = env.get("matmul", {})
  if "float32 default" in rates and "float32 highest" in rates:
    diffs = precision.get("max_relative_difference", {})
    dca = diffs.get("DCAttention T=1024: default vs highest")
    out.append(
        f"- JAX's default precision for float32 matmuls on this GPU is TF32: "
        f"{rates['float32 default']['gflops'] / rates['float32 highest']['gflops']:.1f}x the "
        "rate of true float32 (`highest`)"
        + (f", and it moves DCA's outputs by up to {dca:.0e} (relative)" if dca else "")
        + ". Training needs no more; comparisons against float64 do: the tests set "
        "`JAX_DEFAULT_MATMUL_PRECISION=highest` on a GPU, and so should a user who checks "
        "equivalence (`with jax.default_matmul_precision('highest'):`).")
  engine = sections.get("engine", {})
  ratios = [row["planner_over_best"] for row in engine.get("planner", [])
            if row["planner_over_best"] is not None]
  if ratios:
    lengths = sorted({row["T"] for row in engine["planner"]})
    out.append(f"- The engine planner's GPU rule (the quadratic form up to "
               f"T = {planner.QUADRATIC_MAX_T}, the chunked form with C = "
               f"{planner.CHUNK_SIZE['gpu']} above) picks a form within {max(ratios):.2f}x of the best "
               f"measured at every T from {lengths[0]} to {lengths[-1]}, both passes.")
    slow = [r for r in engine["records"] if r["contender"] == "recurrent"
            and r["status"] == "ok" and r["T"] == lengths[-1]]
    fast = [r for r in engine["records"] if r["contender"] == "chunked C=64"
            and r["status"] == "ok" and r["T"] == lengths[-1]]
    if slow and fast:
      pairs = {r["pass"]: r["median_s"] for r in slow}
      fast_by = {r["pass"]: r["median_s"] for r in fast}
      out.append(f"- The recurrent form, the CPU's choice for the forward pass, is "
                 f"{pairs['fwd'] / fast_by['fwd']:.0f}x slower than the chunked form here at "
                 f"T = {lengths[-1]}: a GPU runs the token scan as one small kernel launch per "
                 "token.")
  layers = sections.get("layers", {})
  if layers.get("records"):
    lengths = sorted({r["T"] for r in layers["records"]})
    soft = {t: benchmark.median(layers["records"], {"layer": "SoftmaxAttention",
                                                    "pass": "fwd+bwd", "T": t})
            for t in lengths}
    if len(lengths) > 1 and all(soft.values()):
      out.append(f"- `SoftmaxAttention` goes from {_ms(soft[lengths[0]])} at T = {lengths[0]} "
                 f"to {_ms(soft[lengths[-1]])} at T = {lengths[-1]} (fwd+bwd): from the size "
                 f"where its score matrix passes {softmax_layer.DENSE_SCORES_BYTES // 2**20} MiB "
                 "it runs the blocked form, a loop over key "
                 "blocks written for the CPU's memory. On a GPU a fused attention kernel "
                 "(cuDNN through `jax.nn.dot_product_attention`) is the fast route; not "
                 "measured in this lease.")
    out.append("- The PyTorch peer is eager PyTorch at batch 1, timed through a pipe to its own "
               "process (a round trip of tens of microseconds per call): at these sizes every "
               "contender leaves the GPU mostly idle, so the bracketed ratios measure launch "
               "and call overheads more than attention kernels. They are not the CPU "
               "benchmark's kind of comparison.")
  return out


def _ms(seconds: float | None) -> str:
  return "-" if seconds is None else f"{seconds * 1e3:.3g} ms"


def write_markdown(path: pathlib.Path, result: dict[str, Any]) -> None:
  sections = result["sections"]
  env = sections.get("env", {})
  lines = ["# DCA on a GPU: one lease's measurements", "",
           "Written by `python -m experiments.gpu_check --render` from docs/gpu_check.json. The "
           "project's own machine has no GPU; these figures come from one short lease of a GPU "
           "machine and are not refreshed by the CPU benchmarks.", "",
           f"- Device: {env.get('nvidia_smi') or env.get('device_kind')}; JAX {env.get('jax')} "
           f"(backend {env.get('backend')}), Python {env.get('python')}.",
           "- Runs (each one process, contenders side by side, median of repeats after warm-up):"]
  for run in result["runs"]:
    lines.append(f"  - {run['date']}: `{run['command']}` (sections {', '.join(run['sections'])}"
                 + (f"; not run for lack of time: {', '.join(run['not_run'])}" if run["not_run"]
                    else "") + ")")
  lines += ["", "## What it shows", ""] + _reading(result)
  tests = result.get("pytest")
  if tests:
    totals = tests["totals"]
    lines += ["", "## The tests on the GPU", "",
              f"Command: `{tests['command']}`.", "",
              f"{totals.get('passed', 0)} passed, {totals.get('failed', 0)} failed, "
              f"{totals.get('error', 0)} errors, {totals.get('skipped', 0)} skipped"
              + ("." if tests["finished"] else
                 " before the time limit stopped the run (the files below were reached; the "
                 "others were not)."), "",
              "| test file | passed | failed |", "| --- | ---: | ---: |"]
    for name, per_file in sorted(tests["files"].items()):
      lines.append(f"| {name} | {per_file.get('passed', 0)} | {per_file.get('failed', 0)} |")
  if "matmul" in env:
    lines += ["", "## Matmul precision", "",
              "| dense 8192^3 matmul | TFLOP/s |", "| --- | ---: |"]
    for name, rate in env["matmul"].items():
      lines.append(f"| {name} | {rate['gflops'] / 1e3:.1f} |")
  if "precision" in sections:
    lines += ["", "| comparison | max relative difference |", "| --- | ---: |"]
    for name, value in sections["precision"]["max_relative_difference"].items():
      lines.append(f"| {name} | {value:.1e} |")
  engine = sections.get("engine")
  if engine and "planner" in engine:
    config = engine["config"]
    forms = list(dict.fromkeys(r["contender"] for r in engine["records"]))
    lines += ["", "## The engine's forms and the planner", "",
              f"`gated_linear_attention`, per-head decay, B = {config['batch']}, "
              f"H = {config['heads']}, K = V = {config['key_dim']}, float32.", ""]
    for pass_name in benchmark_engine.PASSES:
      lengths = sorted({r["T"] for r in engine["records"] if r["pass"] == pass_name})
      lines += [f"{pass_name}:", "", "| form | " + " | ".join(f"T={t}" for t in lengths) + " |",
                "| --- |" + " ---: |" * len(lengths)]
      for form in forms:
        cells = []
        for length in lengths:
          record = benchmark.find(engine["records"], {"contender": form, "pass": pass_name,
                                                      "T": length})
          cells.append(_ms(record.get("median_s")) if record and record["status"] == "ok"
                       else "-")
        lines.append(f"| {form} | " + " | ".join(cells) + " |")
      lines.append("")
    lines += ["| T | pass | best form | planner's pick | pick / best |",
              "| ---: | --- | --- | --- | ---: |"]
    for row in engine["planner"]:
      ratio = row["planner_over_best"]
      lines.append(f"| {row['T']} | {row['pass']} | {row['best']} | {row['planner']} | "
                   + ("-" if ratio is None else f"{ratio:.2f}") + " |")
    if engine.get("not_run_T"):
      lines.append(f"\nNot reached in the time of the lease: T = "
                   f"{', '.join(map(str, engine['not_run_T']))}.")
  layers = sections.get("layers")
  if layers and "records" in layers:
    names = list(dict.fromkeys(r["layer"] for r in layers["records"]))
    lengths = sorted({r["T"] for r in layers["records"]})
    peer = layers["peer"]["name"]
    lines += ["", "## The layers", "",
              "d_model 256, 4 heads, batch 1, float32, W = 64 (as docs/performance.md); "
              f"peer: {layers['peer'].get('version', layers['peer'].get('reason'))}. "
              "Median time; in brackets, the peer's time over the layer's (above 1: the layer "
              "is faster).", "",
              "| layer | " + " | ".join(f"{p} T={t}" for t in lengths
                                      for p in benchmark_layers.PASSES) + " |",
              "| --- |" + " ---: |" * (len(lengths) * 2)]
    for name in names:
      cells = []
      for length in lengths:
        for pass_name in benchmark_layers.PASSES:
          mine = benchmark.median(layers["records"], {"layer": name, "pass": pass_name,
                                                      "T": length})
          theirs = benchmark.median(layers["records"], {"layer": peer, "pass": pass_name,
                                                        "T": length})
          cell = _ms(mine)
          if mine and theirs and name != peer:
            cell += f" ({theirs / mine:.2f}x)"
          cells.append(cell)
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if layers.get("not_run_T"):
      lines.append(f"\nNot reached in the time of the lease: T = "
                   f"{', '.join(map(str, layers['not_run_T']))}.")
  path.write_text("\n".join(lines) + "\n")


def render(inputs: list[pathlib.Path], pytest_log: pathlib.Path | None,
           pytest_command: str | None, out: pathlib.Path) -> dict[str, Any]:
  result = merge(inputs)
  if pytest_log is not None:
    result["pytest"] = {"command": pytest_command or "(not given)",
                        **parse_pytest_log(pytest_log.read_text())}
  out.mkdir(parents=True, exist_ok=True)
  (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
  write_markdown(out / "gpu.md", result)
  return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder for gpu_check.json (and gpu.md)")
  parser.add_argument("--render", action="store_true",
                      help="write OUT/gpu_check.json and OUT/gpu.md from --inputs")
  parser.add_argument("--inputs", nargs="*", default=[], help="gpu_check.json files to merge")
  parser.add_argument("--pytest-log", help="the `pytest -v` log of the same lease")
  parser.add_argument("--pytest-command", help="the command that wrote --pytest-log")
  parser.add_argument("--budget-s", type=float, default=300.0,
                      help="no section or length starts after this many seconds")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes, to try the script on a CPU (measures nothing useful)")
  parser.add_argument("--sections", default=",".join(SECTIONS),
                      help=f"comma-separated subset of {','.join(SECTIONS)}")
  args = parser.parse_args(argv)
  if args.render:
    if not args.inputs:
      parser.error("--render needs --inputs (one or more gpu_check.json files)")
    return render([pathlib.Path(p) for p in args.inputs],
                  pathlib.Path(args.pytest_log) if args.pytest_log else None,
                  args.pytest_command, pathlib.Path(args.out))
  sections = tuple(s for s in args.sections.split(",") if s)
  unknown = [s for s in sections if s not in SECTIONS]
  if unknown:
    parser.error(f"--sections: unknown {unknown}; expected a subset of {SECTIONS}")
  if args.budget_s <= 0:
    parser.error(f"--budget-s must be positive, got {args.budget_s}")
  command = "python -m experiments.gpu_check " + " ".join(shlex.quote(a) for a in (argv or
                                                                                    sys.argv[1:]))
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if args.smoke:
    globals().update(SMOKE)
  return run(pathlib.Path(args.out), sections, args.budget_s, command)


if __name__ == "__main__":
  main()
