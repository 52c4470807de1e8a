"""Per-op profile of a layer's forward+backward: where XLA spends the time, op by op.

Launch (regenerates docs/profile_ops.{md,json}):

    python -m experiments.profile_ops                  # DCA and GLA at T = 1024 and 8192, ~2 min
    python -m experiments.profile_ops --layers dca --lengths 1024 --out /tmp/profile

For each (layer, T), the layer's forward+backward as the layer benchmark times it
(`benchmark_layers.fwd_bwd_fn`: B = 1, d_model 256, 4 heads, float32, the layer's defaults, W = 64)
is compiled and run `--repeats` times under `jax.profiler.trace`. XLA:CPU records one trace event
per executed op (a fusion, a dot, a copy, ...); each is matched by name to its instruction in the
compiled HLO and summed over the repeats. The report gives, per (layer, T):

* the wall time of one step (median of the traced runs) and the sum of its op times: XLA runs
  independent ops of one step on its threads at once, so the op sum may exceed the wall time;
* the op time by class, from the instruction: "matmul" (a `dot`, or a fusion XLA:CPU hands to
  its YNNPACK matmul library, fusion kind `__ynn_fusion`), "data movement" (a copy, transpose,
  concatenate, pad, slice, broadcast, select, dynamic-update-slice, gather or scatter, or a loop
  fusion whose name XLA built from those ops only) and "elementwise / reduce" (the other loop
  fusions: arithmetic, exp, compare, reductions, with whatever data movement XLA fused in);
* the op time by part of the layer, from the op's name in the HLO metadata (the innermost
  `jax.jit` it was traced in: `_compiled_weights` is `compute_weights`, `_compiled_compress`
  `attention_compress`, ...; ops of a `custom_jvp` or `custom_vjp` region carry no name and are
  shown as "(no metadata)"), forward or backward (a name under `transpose(...)`);
* the slowest ops with their HLO shape;
* the counted FLOPs of the step (`dca_jax.flops.count_flops`), the achieved rate, and the
  machine's dense 2048^3 float32 matmul rate measured in the same run, with the rate of a
  batched [64, 64, 64] product (`benchmark.batched_matmul_gflops`), the size of the blocks the
  window and the chunked engine multiply at T = 1024.

The machine may be shared: compare ops within one run.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.flops import count_flops
from dca_jax.nn import layer_spec
from experiments import benchmark, benchmark_layers
from experiments.bookkeeping import log, machine_info, machine_line, now, write_json

DEFAULT_LAYERS = ("dca", "gla")
DEFAULT_LENGTHS = (1024, 8192)
# Words of the op names (opcodes split at "-", fusion names at "_" and "-") that only move data.
_MOVEMENT = {"copy", "transpose", "concatenate", "pad", "slice", "broadcast", "bitcast", "dynamic",
             "update", "gather", "scatter", "reshape", "wrapped", "select", "iota", "constant",
             "reverse"}
_INSTRUCTION = re.compile(r"\s*(?:ROOT )?%?([\w.\-]+) = (\S+) (.*)")


def parse_hlo(text: str) -> dict[str, dict[str, str]]:
  """Instruction name -> {"shape", "opcode", "line"} for every instruction of an HLO module's text
  (the first definition of a name wins: XLA's names are unique within a module)."""
  out: dict[str, dict[str, str]] = {}
  for line in text.splitlines():
    m = _INSTRUCTION.match(line)
    if m and m.group(1) not in out:
      opcode = re.match(r"([\w\-]+)\(", m.group(3))
      out[m.group(1)] = {"shape": m.group(2), "opcode": opcode.group(1) if opcode else "?",
                         "line": line.strip()}
  return out


def op_class(name: str, instruction: dict[str, str]) -> str:
  """"matmul", "data movement" or "elementwise / reduce" (see the module docstring)."""
  if instruction["opcode"] in ("dot", "convolution") or "__ynn_fusion" in instruction["line"]:
    return "matmul"
  fusion = instruction["opcode"] == "fusion"
  label = re.sub(r"\.\d+$", "", name) if fusion else instruction["opcode"]
  words = set(re.split(r"[_\-]", label)) - {"fusion", ""}
  return "data movement" if words <= _MOVEMENT else "elementwise / reduce"


# The library's compiled entry points (`jax.jit` names in the HLO metadata) -> the public function.
PARTS = {"_compiled_weights": "compute_weights", "_compiled_compress": "attention_compress",
         "_compiled_engine": "gated_linear_attention",
         "_compiled_window": "sliding_window_attention",
         "_compiled_blocked": "blocked_causal_attention"}
LAYER_PART = "layer (projections, convolution, masks)"
NO_METADATA = "(no metadata: custom_jvp / custom_vjp regions)"


def op_part(instruction: dict[str, str]) -> str:
  """The part of the layer an op belongs to (the outermost library entry point among the jits
  of its metadata name, see `PARTS`), and whether it is forward or backward."""
  m = re.search(r'op_name="([^"]+)"', instruction["line"])
  if not m:
    return NO_METADATA
  names = re.findall(r"jit\((\w+|<lambda>)\)", m.group(1))[1:]   # [0]: the profiled step
  part = next((PARTS[n] for n in names if n in PARTS), LAYER_PART)
  return f"{part}, {'backward' if 'transpose(' in m.group(1) else 'forward'}"


def trace_events(log_dir: pathlib.Path) -> list[dict[str, Any]]:
  """The complete events ("ph": "X") of the trace `jax.profiler.trace(log_dir)` wrote."""
  path, = log_dir.glob("plugins/profile/*/*.trace.json.gz")
  with gzip.open(path) as f:
    return [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]


def layer_step_inputs(layer_name: str, length: int, *, d_model: int = 256, heads: int = 4,
                      window: int = 64) -> tuple[Any, Any, Any, jax.Array]:
  """(spec, graphdef, state, x [1, T, d_model]) of a registered layer with its defaults (W =
  `window` for the windowed ones), parameters from seed 0: the step this module profiles and
  `experiments.confine_check` times."""
  spec = layer_spec(layer_name)
  options = {"window": window} if hasattr(spec.parse_options(), "window") else {}
  graphdef, state = nnx.split(spec.build(d_model, heads, options, rngs=nnx.Rngs(0)))
  x = jax.random.normal(jax.random.key(1), (1, length, d_model), jnp.float32)
  return spec, graphdef, state, x


def profile_step(layer_name: str, length: int, *, repeats: int = 10, d_model: int = 256,
                 heads: int = 4, window: int = 64, top: int = 12) -> dict[str, Any]:
  """Profiles one layer's forward+backward at one length (see the module docstring)."""
  spec, graphdef, state, x = layer_step_inputs(layer_name, length, d_model=d_model, heads=heads,
                                               window=window)
  step = benchmark_layers.fwd_bwd_fn(graphdef)
  compiled = jax.jit(step).lower(state, x).compile()
  hlo = parse_hlo(compiled.as_text())
  for _ in range(2):
    jax.block_until_ready(compiled(state, x))
  walls = []
  with tempfile.TemporaryDirectory() as log_dir:
    with jax.profiler.trace(log_dir):
      for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(state, x))
        walls.append(time.perf_counter() - start)
    events = trace_events(pathlib.Path(log_dir))
  per_op: collections.Counter[str] = collections.Counter()
  for e in events:
    if e["name"] in hlo:
      per_op[e["name"]] += e.get("dur", 0.0) / 1e3 / repeats          # ms per step
  by_class: collections.Counter[str] = collections.Counter()
  by_part: collections.Counter[str] = collections.Counter()
  for name, ms in per_op.items():
    by_class[op_class(name, hlo[name])] += ms
    by_part[op_part(hlo[name])] += ms
  flops = count_flops(step, state, x).flops
  wall = statistics.median(walls)
  return {
      "layer": spec.layer.__name__, "T": length, "repeats": repeats,
      "wall_ms": wall * 1e3, "op_ms": sum(per_op.values()), "ops_seen": len(per_op),
      "flops": flops, "gflops": flops / wall / 1e9,
      "by_class_ms": dict(by_class.most_common()), "by_part_ms": dict(by_part.most_common()),
      "top_ops": [{"name": n, "ms": ms, "class": op_class(n, hlo[n]), "part": op_part(hlo[n]),
                   "shape": hlo[n]["shape"]} for n, ms in per_op.most_common(top)],
  }


def _batched_line(batched: dict[str, Any] | None) -> list[str]:
  """The small-product yardstick's sentence (absent from reports written before it existed)."""
  if not batched:
    return []
  b, n = batched["batch"], batched["n"]
  return [f"Batched [{b}, {n}, {n}] x [{b}, {n}, {n}] float32 matmul in the same run (the shape "
          f"of the window's and the chunked engine's blocks at T = 1024: 4 heads x 16 blocks of "
          f"64 tokens): {batched['gflops']:.0f} GFLOP/s."]


def write_markdown(path: pathlib.Path, result: dict[str, Any]) -> None:
  lines = [
      "# Per-op profile of the layers' forward+backward",
      "",
      f"Generated by `{result['command']}` on {result['date']}.",
      f"Machine: {machine_line(result['machine'])}.",
      f"Dense 2048^3 float32 matmul in the same run: {result['matmul']['gflops']:.0f} GFLOP/s.",
      *_batched_line(result.get("batched_matmul")),
      "",
      "B = 1, d_model 256, 4 heads, float32, each layer's defaults (W = 64). Op times are per "
      "step, summed over XLA's trace events of the ops; XLA runs independent ops on its threads "
      "at once, so they may add to more than the wall time. How ops are classed and attributed: "
      "`experiments/profile_ops.py`.",
      "",
      "| layer | T | wall ms | op ms | GFLOP | GFLOP/s | % of matmul rate | matmul | data movement "
      "| elementwise / reduce |",
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  rate = result["matmul"]["gflops"]
  for r in result["profiles"]:
    c = r["by_class_ms"]
    share = lambda k: f"{c.get(k, 0.0):.1f} ({100 * c.get(k, 0.0) / r['op_ms']:.0f}%)"
    lines.append(
        f"| {r['layer']} | {r['T']} | {r['wall_ms']:.1f} | {r['op_ms']:.1f} | "
        f"{r['flops'] / 1e9:.2f} | {r['gflops']:.1f} | {100 * r['gflops'] / rate:.0f}% | "
        f"{share('matmul')} | {share('data movement')} | {share('elementwise / reduce')} |")
  for r in result["profiles"]:
    lines += ["", f"## {r['layer']}, T = {r['T']}", "", "| part of the layer | op ms |",
              "|---|---:|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in r["by_part_ms"].items()]
    lines += ["", "| slowest ops | class | part | HLO shape | ms |", "|---|---|---|---|---:|"]
    lines += [f"| `{o['name']}` | {o['class']} | {o['part']} | `{o['shape']}` | {o['ms']:.2f} |"
              for o in r["top_ops"]]
  path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--layers", nargs="+", default=list(DEFAULT_LAYERS))
  parser.add_argument("--lengths", nargs="+", type=int, default=list(DEFAULT_LENGTHS))
  parser.add_argument("--repeats", type=int, default=10)
  parser.add_argument("--out", default="docs", help="folder for profile_ops.{md,json}")
  args = parser.parse_args(argv)
  command = "python -m experiments.profile_ops" + ("" if argv is None or not argv else
                                                   " " + " ".join(argv))
  matmul = benchmark.matmul_gflops()
  batched = benchmark.batched_matmul_gflops()
  profiles = []
  for layer in args.layers:
    for length in args.lengths:
      log(f"profiling {layer} at T={length}")
      profiles.append(profile_step(layer, length, repeats=args.repeats))
  result = {"command": command, "date": now(), "machine": machine_info(), "matmul": matmul,
            "batched_matmul": batched, "profiles": profiles}
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  write_json(out / "profile_ops.json", result)
  write_markdown(out / "profile_ops.md", result)
  for r in profiles:
    log(f"{r['layer']} T={r['T']}: wall {r['wall_ms']:.1f} ms, ops {r['op_ms']:.1f} ms, "
        f"{r['gflops']:.1f} GFLOP/s; " + ", ".join(f"{k} {v:.1f}" for k, v in
                                                     r["by_class_ms"].items()))
  return result


if __name__ == "__main__":
  main()
