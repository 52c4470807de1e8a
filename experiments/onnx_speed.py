"""DCA's exported decode step in ONNX Runtime against JAX `generate`, side by side in one run.

    python -m experiments.onnx_speed                       # contexts 1k, batches 1 and 8 (~3 min)
    python -m experiments.onnx_speed --contexts 1024 8192 --jax2onnx

For the demo-size DCA model (`experiments.decode_rate.demo_model`, window 64, untrained) it
times, at each batch and context: JAX `generate` (`decode_rate.generate_step_time`), and the
decode step exported by `export_onnx` (the graph builder, `dca_jax.nn.onnx_graph`) in ONNX
Runtime fp32 and int8 (`experiments.export.quantize_int8`, as the export CLI's --int8), each
from a cache filled by a JAX prefill of the context (`experiments.edge.time_ort`: warm-up
steps, then the median over repeats of N consecutive steps). With --jax2onnx the jax2onnx
export of the same step is timed too (fp32), the path the graph builder replaces. Prints one
JSON line per cell and a Markdown table with the ratios to JAX; `--out FILE` writes the JSON.
Each configuration is measured `--rounds` times, interleaved, and the median kept, since this
2-core machine is shared. Timing only; the equality with JAX is tests/test_export.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import tempfile
import time

import numpy as np

from experiments import bookkeeping, edge


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--contexts", type=int, nargs="+", default=[1024])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every cell")
  parser.add_argument("--jax2onnx", action="store_true", help="also time the jax2onnx export")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  args = parser.parse_args(argv)
  for name in ("contexts", "batches"):
    if any(v < 1 for v in getattr(args, name)):
      parser.error(f"--{name} must be integers >= 1, got {getattr(args, name)}")
  if args.threads < 1 or args.rounds < 1:
    parser.error("--threads and --rounds must be >= 1")

  import jax  # pylint: disable=import-outside-toplevel
  import onnx  # pylint: disable=import-outside-toplevel

  from dca_jax.nn import export as export_lib  # pylint: disable=import-outside-toplevel
  from experiments import decode_rate  # pylint: disable=import-outside-toplevel
  from experiments import export as export_cli  # pylint: disable=import-outside-toplevel

  model = decode_rate.demo_model(edge.DCA, edge.OPTIONS[edge.DCA])
  max_length = max(args.contexts) + edge.TAIL
  layout = [e.to_dict() for e in export_lib.cache_layout(model, max_length)]
  config = dataclasses.replace(edge.Config(), ort_repeats=5, ort_warmup=3, min_repeat_s=0.2)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix="onnx_speed_"))
  programs, exports = {}, {}
  for converter in ["graph"] + (["jax2onnx"] if args.jax2onnx else []):
    start = time.perf_counter()
    result = export_lib.export_onnx(model, max_length, converter=converter)
    path = tmp / f"{converter}.onnx"
    path.write_bytes(result.data)
    exports[converter] = {"nodes": len(onnx.load(str(path)).graph.node), "batch": result.batch,
                          "bytes": path.stat().st_size, "export_s": time.perf_counter() - start}
    programs[f"ort-fp32-{converter}"] = path
    if converter == "graph":
      with edge._quiet_root_logger():  # pylint: disable=protected-access
        export_cli.quantize_int8(path, tmp / "graph.int8.onnx")
      programs["ort-int8-graph"] = tmp / "graph.int8.onnx"
      exports["graph"]["int8_bytes"] = (tmp / "graph.int8.onnx").stat().st_size
  print(json.dumps({"exports": exports}), flush=True)
  caches = edge.context_caches(model, max_length, args.contexts)
  sessions = {name: edge._session(path, args.threads)  # pylint: disable=protected-access
              for name, path in programs.items()}
  times: dict[tuple[str, int, int], list[float]] = {}
  for _ in range(args.rounds):
    for context in args.contexts:
      for batch in args.batches:
        prompt = jax.random.randint(jax.random.key(0), (batch, context), 0, 256)
        step, _ = decode_rate.generate_step_time(model, prompt, 1)
        times.setdefault(("jax-generate", batch, context), []).append(step)
        cache = edge.rows(caches[context], layout, batch)
        for name, session in sessions.items():
          step = edge.time_ort(session, cache, batch, config)["step_s"]
          times.setdefault((name, batch, context), []).append(step)
  cells = []
  for (runtime, batch, context), steps in times.items():
    step = float(np.median(steps))
    cells.append({"runtime": runtime, "batch": batch, "context": context, "step_s": step,
                  "tokens_per_s": batch / step, "rounds": [batch / s for s in steps]})
    print(json.dumps(cells[-1]), flush=True)
  rate = {(c["runtime"], c["batch"], c["context"]): c["tokens_per_s"] for c in cells}
  runtimes = list(dict.fromkeys(c["runtime"] for c in cells))
  print("\n| batch | context | " + " | ".join(runtimes) + " |")
  print("|---:|---:|" + "---:|" * len(runtimes))
  for context in args.contexts:
    for batch in args.batches:
      jax_rate = rate[("jax-generate", batch, context)]
      row = [f"{rate[(r, batch, context)]:,.0f} ({rate[(r, batch, context)] / jax_rate:.2f}x)"
             for r in runtimes]
      print(f"| {batch} | {context} | " + " | ".join(row) + " |")
  result = {"command": "python -m experiments.onnx_speed " + " ".join(argv or sys.argv[1:]),
            "date": bookkeeping.now(), "threads": args.threads, "exports": exports,
            "cells": cells}
  if args.out:
    bookkeeping.write_json(pathlib.Path(args.out), result)
  return result


if __name__ == "__main__":
  main()
