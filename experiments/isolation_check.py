"""Does a big program interleaved with the engine's forms slow them? The check behind
`benchmark_engine.ISOLATED`.

Usage:
  python -m experiments.isolation_check              # T = 32768, 3 repeats (~2 min)
  python -m experiments.isolation_check --length 8192

Times the chunked form (forward, forward+backward) and the recurrent form's forward at one T
with `benchmark_engine.measure` (interleaved, round-robin, as the benchmark does), twice: once
without and once with the recurrent form's forward+backward among them (autodiff through the
token scan: one K x V state per token, 4.2 GiB of XLA temp memory at T = 32768). Prints the
median milliseconds of each pair per setting, side by side in one process.
"""

from __future__ import annotations

import argparse
import time

from experiments import benchmark_engine


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--length", type=int, default=32768)
  parser.add_argument("--repeats", type=int, default=3)
  args = parser.parse_args(argv)
  config = benchmark_engine.get_config(lengths=(args.length,), full_grid_max_t=256,
                                       long_lengths=(), repeats=args.repeats,
                                       big_repeats=args.repeats)
  runner = benchmark_engine.make_runner(config)
  forms = {c.name: c for c in benchmark_engine.main_contenders(config)}
  fwd, fwd_bwd = benchmark_engine.FWD, benchmark_engine.FWD_BWD
  print(f"T = {args.length}, {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
  for with_scan_grad in (False, True):
    jobs = [(forms["chunked"], (fwd, fwd_bwd)),
            (forms["recurrent"], (fwd, fwd_bwd) if with_scan_grad else (fwd,))]
    records = benchmark_engine.measure(runner, config, jobs, args.length, section="check",
                                       count=False)
    label = "with the scan's fwd+bwd" if with_scan_grad else "without it"
    print(f"{label}: " + ", ".join(f"{r['contender']} {r['pass']} {r['median_s'] * 1e3:.0f} ms"
                                   for r in records if r.get("median_s")), flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
