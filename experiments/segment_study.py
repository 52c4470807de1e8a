"""Measures the rule of `dca_jax.ops.segment_length`: one pass against segments, per layer and T.

Usage:
  python -m experiments.segment_study                                  # the planner's table
  python -m experiments.segment_study --layers dca --lengths 4096,8192 --segments none,1024
  python -m experiments.segment_study --engine                         # planner.ENGINE_SEGMENT

For each layer and T: forward+backward of one layer (B = 1, d_model 256, 4 heads, float32, the
layer's defaults) with `segment_length=None` (one pass) and with each segment length, compiled
once each, then timed round-robin (`--repeats` rounds after one warm-up call); prints the median
milliseconds, side by side in one process. With `--engine`: the same for the engine's chunked
form alone, with XLA's temporary memory of each setting. The figures quoted in
dca_jax/ops/planner.py come from this script (2026-12-04); ratios only compare within one run.
`--out FILE` also writes the rows as JSON with the command, machine and date.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.nn import registry
from dca_jax.ops import chunked, scan
from experiments import bookkeeping


def measure_engine(length: int, segments, repeats: int) -> dict:
  """{segment: (forward s, forward+backward s, XLA temp bytes of forward+backward)}: medians.

  `chunked.chunked` on its internal contract (per-head decay, B = 1, H = 4, K = V = 64, C = 64,
  zero initial state), differentiated with respect to q, k, v and the log decays; the
  recurrent form's forward under the key "recurrent".
  """
  keys = jax.random.split(jax.random.key(0), 5)
  q, k, v = (jax.random.normal(key, (1, length, 4, 64)) for key in keys[:3])
  g = jax.nn.log_sigmoid(jax.random.normal(keys[3], (1, length, 4, 1)) + 4.0)
  probe = jax.random.normal(keys[4], q.shape)
  s0 = jnp.zeros((1, 4, 64, 64))
  steps, memory = {}, {}
  for segment in segments:
    def forward(q, k, v, g, segment=segment):
      return chunked.chunked(q, k, v, g, s0, chunk_size=64, segment_size=segment)[0]

    def loss(q, k, v, g, forward=forward):
      return jnp.sum(probe * forward(q, k, v, g))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, k, v, g).compile()
    memory[segment] = grad.memory_analysis().temp_size_in_bytes
    steps[(segment, "fwd")] = jax.jit(forward)
    steps[(segment, "fwd+bwd")] = grad
  steps[("recurrent", "fwd")] = jax.jit(lambda q, k, v, g: scan.recurrent(q, k, v, g, s0)[0])
  for step in steps.values():
    jax.block_until_ready(step(q, k, v, g))          # compile and warm up
  times = {key: [] for key in steps}
  for _ in range(repeats):
    for key, step in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(q, k, v, g))
      times[key].append(time.perf_counter() - start)
  result = {s: (statistics.median(times[(s, "fwd")]), statistics.median(times[(s, "fwd+bwd")]),
                memory[s]) for s in segments}
  result["recurrent"] = (statistics.median(times[("recurrent", "fwd")]), None, None)
  return result


def measure(layer_name: str, length: int, segments, repeats: int) -> dict:
  """Median seconds of a forward+backward per segment setting (None: one pass)."""
  x = jax.random.normal(jax.random.key(0), (1, length, 256))
  probe = jax.random.normal(jax.random.key(5), x.shape)
  steps = {}
  for segment in segments:
    layer = registry.layer_spec(layer_name).layer(256, 4, rngs=nnx.Rngs(0),
                                                  segment_length=segment)
    graph, state = nnx.split(layer)

    def loss(state, x, graph=graph):
      return jnp.sum(probe * nnx.merge(graph, state)(x))

    step = jax.jit(jax.grad(loss, argnums=(0, 1)))
    jax.block_until_ready(step(state, x))            # compile and warm up
    steps[segment] = (step, state)
  times = {segment: [] for segment in steps}
  for _ in range(repeats):
    for segment, (step, state) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(state, x))
      times[segment].append(time.perf_counter() - start)
  return {segment: statistics.median(t) for segment, t in times.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", default="dca,gla,window,gated_deltanet,linear")
  parser.add_argument("--lengths", default="4096,8192,16384,32768")
  parser.add_argument("--segments", default="none,1024,2048",
                      help="comma-separated segment lengths; none = one pass")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--engine", action="store_true",
                      help="the engine's chunked form instead of layers (lengths default "
                           "4096,8192,32768,65536, segments none,512,1024,2048)")
  parser.add_argument("--out", default=None, help="also write the rows as JSON here")
  args = parser.parse_args(argv)
  if args.engine and args.lengths == parser.get_default("lengths"):
    args.lengths = "4096,8192,32768,65536"
  if args.engine and args.segments == parser.get_default("segments"):
    args.segments = "none,512,1024,2048"
  segments = [None if s == "none" else int(s) for s in args.segments.split(",")]
  names = ["one pass" if s is None else f"S={s}" for s in segments]
  record = {"command": bookkeeping.command_line("experiments.segment_study", argv),
            "date": bookkeeping.now(), "machine": bookkeeping.machine_info(),
            "repeats": args.repeats, "rows": []}
  print(f"backend {jax.default_backend()}, {record['date']}")
  if args.engine:
    print("| chunked form, T | " + " | ".join(names)
          + " | recurrent fwd |  (fwd ms, fwd+bwd ms, fwd+bwd XLA temp MiB; medians)")
    for length in (int(t) for t in args.lengths.split(",")):
      result = measure_engine(length, segments, args.repeats)
      print(f"| {length} | " + " | ".join(
          f"{result[s][0] * 1e3:.1f}, {result[s][1] * 1e3:.0f} ms, {result[s][2] / 2**20:.0f} MiB"
          for s in segments) + f" | {result['recurrent'][0] * 1e3:.1f} ms |", flush=True)
      record["rows"].append({"T": length, "recurrent_fwd_s": result["recurrent"][0], **{
          name: {"fwd_s": result[s][0], "fwd_bwd_s": result[s][1], "temp_bytes": result[s][2]}
          for name, s in zip(names, segments)}})
  else:
    print("| layer | T | " + " | ".join(names) + " |")
    for name in args.layers.split(","):
      for length in (int(t) for t in args.lengths.split(",")):
        result = measure(name, length, segments, args.repeats)
        print(f"| {name} | {length} | "
              + " | ".join(f"{result[s] * 1e3:.0f} ms" for s in segments) + " |", flush=True)
        record["rows"].append({"layer": name, "T": length, **{
            label: {"fwd_bwd_s": result[s]} for label, s in zip(names, segments)}})
  if args.out:
    bookkeeping.write_json(args.out, record)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
