"""What the ops' confinement of non-finite inputs costs inside a layer: the check behind the
layers' `confine_nonfinite=False`.

Usage:
  python -m experiments.confine_check                          # DCA and window, T = 1024 (~1 min)
  python -m experiments.confine_check --layers dca gla --lengths 1024 8192 --repeats 20

Every layer confines a non-finite input x once (`AttentionLayer.__call__`: the token is zeroed,
the outputs that can see it become NaN) and, on its whole-sequence path (one device, no
segments: `_sequence`), calls its attention op with the op's own confinement off
(`confine_nonfinite=False`, `guard=False`); `prefill`, `decode_step`, the segmented path (which
runs `prefill`; with a `segment_length` set) and the sequence-sharded
ops keep it on. This script compiles each layer's
forward+backward (`benchmark_layers.fwd_bwd_fn`: B = 1, d_model 256, 4 heads, float32, the
layer's defaults, W = 64) twice in one process: as the layer runs it, and with the op's
confinement forced back on (by wrapping the op the layer module calls, for this measurement
only). Both programs run round-robin (`benchmark.time_interleaved`, a fresh order each round);
it prints the median of each, their ratio, and the count of HLO instructions of each program;
`--out FILE` also writes them as JSON with the command, machine and date (docs/confine_check.json
is the run the README quotes).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from typing import Any, Callable, Iterator

import jax

import dca_jax.nn.dca as nn_dca
import dca_jax.nn.deltanet as nn_deltanet
import dca_jax.nn.linear as nn_linear
import dca_jax.nn.softmax as nn_softmax
import dca_jax.nn.window as nn_window
from experiments import benchmark, benchmark_layers, profile_ops
from experiments.bookkeeping import command_line, machine_info, machine_line, now, write_json

# layer -> (module, the name of the op it calls, the keyword that turns the op's confinement on).
CALLS = {
    "dca": [(nn_dca.ops, "attention_compress", "confine_nonfinite")],
    "window": [(nn_window, "rotary_window_attention", "confine_nonfinite")],
    "softmax": [(nn_softmax, "blocked_causal_attention", "confine_nonfinite"),
                (nn_softmax, "attend_finite", None)],
    "linear": [(nn_linear, "run_engine", "guard")],
    "gla": [(nn_linear, "run_engine", "guard")],
    "gated_deltanet": [(nn_deltanet, "run_delta_rule", "guard")],
}


@contextlib.contextmanager
def confined(layer: str) -> Iterator[None]:
  """While tracing inside this block, `layer`'s op confines non-finite inputs again."""
  saved = []
  for module, name, keyword in CALLS[layer]:
    original = getattr(module, name)
    if keyword is None:   # the softmax layer's dense path: the op that confines is another one
      replacement = nn_softmax.masked_attention
    else:
      replacement = functools.partial(_forced, original, keyword)
    saved.append((module, name, original))
    setattr(module, name, replacement)
  try:
    yield
  finally:
    for module, name, original in saved:
      setattr(module, name, original)


def _forced(op: Callable[..., Any], keyword: str, *args: Any, **kwargs: Any) -> Any:
  kwargs[keyword] = True
  return op(*args, **kwargs)


def _instructions(compiled: Any) -> int:
  return sum(1 for line in compiled.as_text().splitlines() if " = " in line)


def check(layer: str, length: int, repeats: int) -> dict[str, Any]:
  """Times one layer's fwd+bwd at one T as it runs and with its op's confinement back on."""
  spec, graphdef, state, x = profile_ops.layer_step_inputs(layer, length)
  # A fresh function for each program: jax.jit caches the trace of a function it has seen.
  compile_step = lambda: jax.jit(benchmark_layers.fwd_bwd_fn(graphdef)).lower(state, x).compile()
  programs = {"as the layer runs (op unconfined)": compile_step()}
  with confined(layer):
    programs["op confined again"] = compile_step()
  timings = benchmark.time_interleaved(
      {name: functools.partial(p, state, x) for name, p in programs.items()}, repeats=repeats)
  names = list(programs)
  return {"layer": spec.layer.__name__, "T": length,
          "ms": {n: timings[n].median_s * 1e3 for n in names},
          "instructions": {n: _instructions(programs[n]) for n in names},
          "ratio": timings[names[0]].median_s / timings[names[1]].median_s}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", nargs="+", default=["dca", "window"], choices=sorted(CALLS))
  parser.add_argument("--lengths", nargs="+", type=int, default=[1024])
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--out", default=None, help="also write the results as JSON here")
  args = parser.parse_args(argv)
  if min(args.lengths) < 1 or args.repeats < 1:
    parser.error(f"--lengths and --repeats must be >= 1, got {args.lengths} and {args.repeats}")
  result = {"command": command_line("experiments.confine_check", argv),
            "date": now(), "machine": machine_info(), "repeats": args.repeats, "rows": []}
  print(f"{result['date']}, {machine_line(result['machine'])}", flush=True)
  for length in args.lengths:
    for layer in args.layers:
      r = check(layer, length, args.repeats)
      result["rows"].append(r)
      cells = ", ".join(f"{n} {ms:.2f} ms ({r['instructions'][n]} HLO instructions)"
                        for n, ms in r["ms"].items())
      print(f"{r['layer']} T={length}: {cells}; ratio {r['ratio']:.3f}", flush=True)
  if args.out:
    write_json(args.out, result)
  return result


if __name__ == "__main__":
  main()
