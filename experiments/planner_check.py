"""A focused planner sweep: the engine's forms side by side at a few T, with more repeats.

    python -m experiments.planner_check --lengths 64,96,128,192 [--rounds 3] [--out FILE.json]

The full engine benchmark (`experiments.benchmark_engine`) sweeps T = 8 ... 512 once; a
threshold of `dca_jax.ops.planner` that rests on one cell of it (the quadratic form's upper T,
`QUADRATIC_MAX_T`) is checked here: every form of the sweep (quadratic, recurrent, chunked with
C = 32, 64, 128; per-head decay, B = 1, H = 4, K = V = 64, float32), forward and forward+backward,
timed round-robin at each T (median of the repeats after warm-up), the whole sweep run `--rounds`
times in one process, and each round's fastest form and the planner's pick printed and saved.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
from typing import Any

from experiments import benchmark_engine
from experiments.bookkeeping import log, machine_info, machine_line


def run(lengths: tuple[int, ...], rounds: int) -> dict[str, Any]:
  config = benchmark_engine.get_config(planner_lengths=lengths, repeats=9,
                                       planner_min_total_s=1.0)
  runner = benchmark_engine.make_runner(config)
  sweep = benchmark_engine.planner_contenders(config)
  machine = machine_info()
  log(f"Machine: {machine_line(machine)}")
  per_round = []
  for index in range(rounds):
    records = []
    for length in lengths:
      log(f"round {index + 1} T={length}")
      records += benchmark_engine.measure(
          runner, config, [(c, benchmark_engine.PASSES) for c in sweep], length,
          section="planner", repeats=config.repeats, min_total_s=config.planner_min_total_s,
          count=False)
    per_round.append(benchmark_engine.planner_analysis(config, records))
  summary = []
  for length in lengths:
    for pass_name in benchmark_engine.PASSES:
      rows = [row for analysis in per_round for row in analysis
              if row["T"] == length and row["pass"] == pass_name]
      forms = rows[0]["times_s"]
      medians = {form: statistics.median(row["times_s"][form] for row in rows)
                 for form in forms}
      best = min(medians, key=medians.get)
      pick = rows[0]["planner"]
      summary.append({"T": length, "pass": pass_name, "median_over_rounds_s": medians,
                      "best": best, "planner": pick,
                      "planner_over_best": medians[pick] / medians[best],
                      "best_per_round": [row["best"] for row in rows]})
      log(f"T={length:5d} {pass_name:8s} best {best:14s} planner {pick:14s} "
          f"{medians[pick] / medians[best]:.2f}x  " + "  ".join(
              f"{form} {seconds * 1e3:.3g} ms" for form, seconds in medians.items()))
  return {"machine": machine, "lengths": list(lengths), "rounds": rounds,
          "per_round": per_round, "summary": summary}


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--lengths", default="64,96,128,192", help="comma-separated T")
  parser.add_argument("--rounds", type=int, default=3, help="times the whole sweep is run")
  parser.add_argument("--out", help="write the result here (JSON)")
  args = parser.parse_args(argv)
  try:
    lengths = tuple(int(t) for t in args.lengths.split(","))
  except ValueError:
    parser.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
  if not lengths or min(lengths) < 1:
    parser.error(f"--lengths must be integers >= 1, got {args.lengths!r}")
  if args.rounds < 1:
    parser.error(f"--rounds must be >= 1, got {args.rounds}")
  result = run(lengths, args.rounds)
  if args.out:
    pathlib.Path(args.out).write_text(json.dumps(result, indent=1, default=str))
  return result


if __name__ == "__main__":
  main()
