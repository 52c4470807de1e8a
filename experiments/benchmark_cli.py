"""The command line that `benchmark_engine` and `benchmark_layers` share.

Both benchmarks write `<out>/<stem>.{json,md,png}` from one result dict; `main` parses `--quick`,
`--out`, the budgets and `--render-only`, runs the benchmark (or reads its JSON back) and writes
the three files. `replace_checked` applies the budget overrides to a benchmark's frozen config,
naming any key it does not have.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from typing import Any, Callable, Mapping

from experiments.bookkeeping import log, write_json


def replace_checked(config, overrides: Mapping[str, Any]):
  """`dataclasses.replace(config, **overrides)`, naming any key the config does not have.

  Raises:
    ValueError: an override that is not a field of the config.
  """
  fields = {f.name for f in dataclasses.fields(config)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"Unknown config keys {unknown}; expected some of {sorted(fields)}.")
  return dataclasses.replace(config, **overrides)


def main(argv: list[str] | None, *, doc: str, module: str, stem_name: str, noun: str,
         get_config: Callable[..., Any], run: Callable[[Any, str], dict[str, Any]],
         print_summary: Callable[[dict[str, Any]], None],
         write_markdown: Callable[[str, dict[str, Any]], None],
         write_plot: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]:
  """Parses the command line, runs (or re-renders), writes `<out>/<stem_name>.{json,md,png}`.

  Args:
    argv: the arguments (None: `sys.argv[1:]`).
    doc: the benchmark's module docstring (its first paragraph is the help text).
    module: the benchmark's module name, for the command recorded in the result.
    stem_name: the output files' name without suffix.
    noun: what the time budget stops growing ("contender", "layer"), for the help text.
    get_config: (quick, **overrides) -> the benchmark's config.
    run: (config, command) -> the result dict.
    print_summary: prints the result's summary on stdout.
    write_markdown, write_plot: (path, result) -> writes that file.

  Returns:
    The result dict.
  """
  parser = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--quick", action="store_true", help="the ~2-3 min subset")
  parser.add_argument("--out", default="docs", help="output folder (default: docs)")
  parser.add_argument("--memory-budget-gib", type=float, default=None,
                      help="skip programs whose XLA temp memory exceeds this (default 6)")
  parser.add_argument("--time-budget-s", type=float, default=None,
                      help=f"stop growing T for a {noun} once a call takes longer (default 20)")
  parser.add_argument("--render-only", action="store_true",
                      help="measure nothing: rewrite the .md and .png from the .json in --out")
  args = parser.parse_args(argv)
  stem = os.path.join(args.out, stem_name)
  if args.render_only:
    with open(stem + ".json", encoding="utf-8") as f:
      result = json.load(f)
    write_markdown(stem + ".md", result)
    write_plot(stem + ".png", result)
    log(f"Rewrote {stem}.md, {stem}.png from {stem}.json")
    return result
  overrides = {}
  if args.memory_budget_gib is not None:
    overrides["memory_budget_gib"] = args.memory_budget_gib
  if args.time_budget_s is not None:
    overrides["time_budget_s"] = args.time_budget_s
  config = get_config(args.quick, **overrides)
  command = f"python -m {module} " + " ".join(
      shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
  result = run(config, command.strip())
  print_summary(result)
  os.makedirs(args.out, exist_ok=True)
  write_json(stem + ".json", result, indent=1)
  write_markdown(stem + ".md", result)
  write_plot(stem + ".png", result)
  log(f"Wrote {stem}.json, {stem}.md, {stem}.png")
  return result
