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

    python -m experiments.onnx_speed --breakdown           # where a batch-1 step's time goes

`--breakdown` times, at batch 1 and one intra-op thread, four ONNX Runtime programs side by side
(interleaved rounds, median): the graph builder's decode step (its cache fed back as the runner
does); the step's own matrix products alone (every MatMul / Gemm with its weights, each fed a
fixed input row: the time to read the weights); a chain of as many elementwise Adds on one
[1, 128] row as the step has nodes (ONNX Runtime's per-node cost); and a one-node program (the
cost of a `run` call from Python). What the step costs beyond the first and the third is its
small ops' own work (ring writes, gathers, softmax, the feature map).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pathlib
import tempfile
import time

import numpy as np

from experiments import bookkeeping, edge


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--contexts", type=int, nargs="+", default=[1024])
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
  parser.add_argument("--threads", type=int, default=1,
                      help="ONNX Runtime intra-op threads (default 1, the runner's for the step)")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved repeats of every cell")
  parser.add_argument("--jax2onnx", action="store_true", help="also time the jax2onnx export")
  parser.add_argument("--out", default=None, help="write the results as JSON here")
  parser.add_argument("--breakdown", action="store_true",
                      help="time the step against its matmuls, a node chain and an empty program")
  args = parser.parse_args(argv)
  for name in ("contexts", "batches"):
    if any(v < 1 for v in getattr(args, name)):
      parser.error(f"--{name} must be integers >= 1, got {getattr(args, name)}")
  if args.threads < 1 or args.rounds < 1:
    parser.error("--threads and --rounds must be >= 1")
  if args.breakdown:
    return breakdown(args.rounds, args.out, argv)

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
  result = {"command": bookkeeping.command_line("experiments.onnx_speed", argv),
            "date": bookkeeping.now(), "threads": args.threads, "exports": exports,
            "cells": cells}
  if args.out:
    bookkeeping.write_json(pathlib.Path(args.out), result)
  return result


def _chain_program(nodes: int, width: int = 128) -> bytes:
  """`nodes` Adds of a constant to one [1, width] row, one after the other."""
  from onnx import TensorProto, helper, numpy_helper  # pylint: disable=import-outside-toplevel
  chain = [helper.make_node("Add", ["x" if i == 0 else f"y{i - 1}", "c"], [f"y{i}"])
           for i in range(nodes)]
  graph = helper.make_graph(
      chain, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width])],
      [helper.make_tensor_value_info(f"y{nodes - 1}", TensorProto.FLOAT, [1, width])],
      initializer=[numpy_helper.from_array(np.ones((1, width), np.float32), "c")])
  return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)]).SerializeToString()


def _matmul_program(step) -> tuple[bytes, dict[str, np.ndarray]]:
  """The step's MatMul / Gemm nodes with constant weights, each on its own input row."""
  from onnx import TensorProto, helper, numpy_helper  # pylint: disable=import-outside-toplevel
  weights = {i.name: numpy_helper.to_array(i) for i in step.graph.initializer}
  nodes, inputs, outputs, inits, feed = [], [], [], [], {}
  for n, node in enumerate(x for x in step.graph.node if x.op_type in ("MatMul", "Gemm")):
    w = next((weights[i] for i in node.input[1:2] if i in weights), None)
    if w is None or w.ndim != 2:
      continue                      # a product of two activations (scores, read-outs)
    inputs.append(helper.make_tensor_value_info(f"x{n}", TensorProto.FLOAT, [1, w.shape[0]]))
    outputs.append(helper.make_tensor_value_info(f"y{n}", TensorProto.FLOAT, [1, w.shape[1]]))
    inits.append(numpy_helper.from_array(w.astype(np.float32), f"w{n}"))
    nodes.append(helper.make_node("MatMul", [f"x{n}", f"w{n}"], [f"y{n}"]))
    feed[f"x{n}"] = np.full((1, w.shape[0]), 0.5, np.float32)
  graph = helper.make_graph(nodes, "matmuls", inputs, outputs, initializer=inits)
  model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 23)])
  return model.SerializeToString(), feed


def breakdown(rounds: int, out: str | None, argv) -> dict:
  """`--breakdown` (module docstring): the step, its matmuls, a node chain, an empty program."""
  import onnx  # pylint: disable=import-outside-toplevel
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel

  from dca_jax.nn import export as export_lib  # pylint: disable=import-outside-toplevel
  from experiments import decode_rate  # pylint: disable=import-outside-toplevel

  model = decode_rate.demo_model(edge.DCA, edge.OPTIONS[edge.DCA])
  max_length = 1024 + edge.TAIL
  data = export_lib.export_onnx(model, max_length, converter="graph").data
  step = onnx.load_from_string(data)
  matmuls, matmul_feed = _matmul_program(step)
  layout = export_lib.cache_layout(model, max_length)
  cache = export_lib.init_cache_arrays(layout, 1)

  def session(program):
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads, options.inter_op_num_threads = 1, 1
    return ort.InferenceSession(program, options, providers=["CPUExecutionProvider"])

  decode = session(data)
  names = [i.name for i in decode.get_inputs()]
  state = {"cache": list(cache), "token": np.zeros((1,), np.int32)}

  def step_call():
    result = decode.run(None, dict(zip(names, [state["token"], *state["cache"]])))
    state["token"], state["cache"] = result[0].argmax(-1).astype(np.int32), result[1:]

  programs = {"decode step": step_call}
  for name, program, feed in (
      ("its matmuls alone", matmuls, matmul_feed),
      (f"{len(step.graph.node)} chained Adds", _chain_program(len(step.graph.node)),
       {"x": np.zeros((1, 128), np.float32)}),
      ("one-node program", _chain_program(1), {"x": np.zeros((1, 128), np.float32)})):
    programs[name] = functools.partial(session(program).run, None, feed)
  times: dict[str, list[float]] = {name: [] for name in programs}
  for _ in range(rounds):
    for name, call in programs.items():
      for _ in range(50):
        call()
      start = time.perf_counter()
      for _ in range(1000):
        call()
      times[name].append((time.perf_counter() - start) / 1000)
  weight_bytes = sum(int(np.prod(i.dims)) * 4 for i in onnx.load_from_string(matmuls)
                     .graph.initializer)
  rows = {name: float(np.median(t)) for name, t in times.items()}
  print(f"\nbatch 1, 1 thread, median of {rounds} rounds of 1,000 calls "
        f"({len(step.graph.node)} nodes; the matmuls read {weight_bytes / 2**20:.2f} MiB of "
        "weights):\n\n| program | us per call |\n|---|---:|")
  for name, seconds in rows.items():
    print(f"| {name} | {1e6 * seconds:.1f} |")
  result = {"command": bookkeeping.command_line("experiments.onnx_speed", argv),
            "date": bookkeeping.now(), "machine": bookkeeping.machine_info(),
            "nodes": len(step.graph.node), "matmul_weight_bytes": weight_bytes,
            "us_per_call": {name: 1e6 * s for name, s in rows.items()},
            "rounds_us": {name: [1e6 * s for s in t] for name, t in times.items()}}
  if out:
    bookkeeping.write_json(pathlib.Path(out), result)
  return result


if __name__ == "__main__":
  main()
