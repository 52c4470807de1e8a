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
3. engine: the planner's sweep on this backend (quadratic, recurrent, chunked C = 32/64/128,
   forward and forward+backward, B = 1, H = 4, K = V = 64, T = 64 ... 65536), with the planner's
   pick against the best form at each T: the GPU row of `dca_jax.ops.planner` comes from it.
4. layers: the five layers of `dca_jax.nn` (d_model 256, 4 heads, batch 1, float32, as in
   docs/performance.md) and PyTorch's SDPA layer on CUDA (`experiments.torch_peer`), forward and
   forward+backward at T = 1024 ... 32768.
5. training: LM training steps of `lm_dca` against `lm_softmax` (tokens/s at T = 256 x 8 and
   T = 2048 x 1), as in docs/performance.md.

A section that would start after `--budget-s` seconds is recorded as not run. The result is
written to DIR/gpu_check.json after every section (a run that is cut off keeps what it
measured); `--render` writes docs/gpu.md from such a file.

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

from dca_jax.nn import count_params
from experiments import benchmark, benchmark_engine, benchmark_layers, bookkeeping, torch_peer
from experiments.bookkeeping import log

SECTIONS = ("env", "precision", "engine", "layers", "training")
ENGINE_LENGTHS = (64, 256, 1024, 4096, 16384, 65536)
LAYER_LENGTHS = (1024, 4096, 16384, 32768)
TRAIN_LENGTHS = ((256, 8), (2048, 1))
MATMUL_N = 8192
# --smoke: the same code paths at sizes a CPU runs in a minute or two (to try the script before
# a lease, not to measure).
SMOKE = {"ENGINE_LENGTHS": (64, 256), "LAYER_LENGTHS": (256,), "TRAIN_LENGTHS": ((128, 2),),
         "MATMUL_N": 512}


def _gpu_name() -> str | None:
  try:
    out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.SubprocessError):
    return None
  return out.stdout.strip() or None


def _rates(n: int) -> dict[str, Any]:
  """Dense n x n matmul rates: float32 default and highest precision, bfloat16."""
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
  from dca_jax.nn import DCAttention  # pylint: disable=import-outside-toplevel
  from dca_jax.ops import gated_linear_attention  # pylint: disable=import-outside-toplevel
  rows = {}
  layer = DCAttention(256, 4, window=64, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(1), (1, 1024, 256), jnp.float32)
  forward = jax.jit(benchmark_layers.forward_fn(graphdef))
  y_default = forward(state, x)
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


def section_engine(deadline: float) -> dict[str, Any]:
  config = benchmark_engine.get_config(
      lengths=(), long_lengths=(), planner_lengths=ENGINE_LENGTHS, planner_chunks=(32, 64, 128),
      repeats=5, big_repeats=5, min_total_s=0.2, max_repeats=30, max_timed_s=5.0,
      time_budget_s=4.0, memory_budget_gib=60.0, quadratic_max_t=8192)
  runner = benchmark_engine.make_runner(config)
  sweep = benchmark_engine.planner_contenders(config)
  sweep = [c if c.name != "quadratic" else
           benchmark_engine.Contender(c.name, c.fwd, c.decay, c.exponent, max_t=8192)
           for c in sweep]
  records, not_run = [], []
  for length in ENGINE_LENGTHS:
    if time.monotonic() > deadline:
      not_run.append(length)
      continue
    log(f"engine T={length}")
    records += benchmark_engine.measure(
        runner, config, [(c, benchmark_engine.PASSES) for c in sweep], length,
        section="planner", repeats=config.repeats, min_total_s=config.min_total_s, count=True)
  planner = benchmark_engine.planner_analysis(
      benchmark_engine.get_config(planner_lengths=ENGINE_LENGTHS), records)
  return {"config": {"batch": config.batch, "heads": config.heads, "key_dim": config.key_dim,
                     "value_dim": config.value_dim}, "records": records, "planner": planner,
          "not_run_T": not_run}


def section_layers(deadline: float) -> dict[str, Any]:
  config = benchmark_layers.get_config(lengths=LAYER_LENGTHS, repeats=5, big_repeats=5,
                                       min_total_s=0.2, max_timed_s=5.0, time_budget_s=4.0,
                                       memory_budget_gib=60.0)
  splits, params = {}, {}
  for layer in benchmark_layers.layers(config):
    module = layer.make(config)
    params[layer.name] = count_params(module)
    splits[layer.name] = (layer, *nnx.split(module))
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
  records, not_run = [], []
  try:
    for length in LAYER_LENGTHS:
      if time.monotonic() > deadline:
        not_run.append(length)
        continue
      log(f"layers T={length}")
      records += benchmark_layers.measure_grid(runner, config, splits, length, peers=peers,
                                               count=True)
  finally:
    if peer is not None:
      peer.close()
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
  return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True, help="folder for gpu_check.json")
  parser.add_argument("--budget-s", type=float, default=300.0,
                      help="no section or length starts after this many seconds")
  parser.add_argument("--smoke", action="store_true",
                      help="tiny sizes, to try the script on a CPU (measures nothing useful)")
  parser.add_argument("--sections", default=",".join(SECTIONS),
                      help=f"comma-separated subset of {','.join(SECTIONS)}")
  args = parser.parse_args(argv)
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
