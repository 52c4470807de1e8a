"""Reporting and command-line pieces shared by `benchmark_engine` and `benchmark_layers`.

Both benchmarks write `<out>/<stem>.{json,md,png}` from one result dict; this module holds what
their reports and drivers have in common: the table cells, the grid and target tables, the
machine-load text, the plot's budget line and log-log axes, the JSON encoder and the command line
(`--quick`, `--out`, the budgets, `--render-only`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from typing import Any, Callable, Mapping

import numpy as np

from experiments import _timing


def replace_checked(config, overrides: Mapping[str, Any]):
  """`dataclasses.replace(config, **overrides)`, naming any key the config does not have."""
  fields = {f.name for f in dataclasses.fields(config)}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"Unknown config keys {unknown}; expected some of {sorted(fields)}.")
  return dataclasses.replace(config, **overrides)


def log(message: str) -> None:
  print(message, flush=True)


def json_default(x):
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  if isinstance(x, np.bool_):
    return bool(x)
  raise TypeError(f"not JSON serialisable: {type(x)}")


# ----------------------------------------------------------------------------------------------
# Markdown.


def cell_time(r):
  """A time cell: the median, or why it did not run ('skip: mem', 'skip: time', '-', 'error')."""
  if r is None:
    return ""
  if r["status"] == "ok":
    return _timing.format_seconds(r["median_s"]) + ("" if r.get("finite", True) else " (NaN!)")
  reason = r.get("reason") or ""
  if reason.startswith("memory"):
    return "skip: mem"
  if reason.startswith("time"):
    return "skip: time"
  return "-" if reason.startswith("form limited") else "error"


def cell_memory(r):
  """A memory cell: XLA temp bytes, parenthesised when compiled but not run."""
  if r is None or r.get("temp_bytes") is None:
    return ""
  text = _timing.format_bytes(r["temp_bytes"])
  return text if r["status"] == "ok" else f"({text})"


def grid_table(label: str, names, lengths, cell: Callable[[Any, int], str]) -> str:
  """A Markdown table: a row per name (rows with no cell left out), a column per T."""
  lines = [f"| {label} | " + " | ".join(f"T={t}" for t in lengths) + " |",
           "|---|" + "---:|" * len(lengths)]
  for name in names:
    cells = [cell(name, t) for t in lengths]
    if any(cells):
      lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def load_text(machine: Mapping[str, Any]) -> str:
  """' Load average (1 min) at start: x, at end: y.' when recorded (a loaded machine is noisy)."""
  start, end = machine.get("load_average"), machine.get("load_average_end")
  if not start:
    return ""
  text = f" Load average (1 min) at start: {start[0]:.1f}"
  return text + (f", at end: {end[0]:.1f}." if end else ".")


def targets_section(targets, value_text: Callable[[dict[str, Any]], str]) -> list[str]:
  """The '## Targets' heading and table, one row per target with PASS/MISS/INFO in bold."""
  lines = ["## Targets", "", "| target | value | goal | status | detail |",
           "|---|---:|---|---|---|"]
  for row in targets:
    lines.append(f"| {row['target']} | {value_text(row)} | {row['goal']} | **{row['status']}** | "
                 f"{row['detail']} |")
  return lines


def log_targets(targets, none_text: str = "None") -> None:
  """The targets on stdout, one line each."""
  log("\nTargets:")
  for row in targets:
    value = row["value"]
    if value is None:
      text = none_text
    else:
      text = value if isinstance(value, bool) else f"{value:.4g}"
    log(f"  {row['status']:4s} {row['target']}: {text} (goal {row['goal']}) {row['detail']}")


# ----------------------------------------------------------------------------------------------
# Plots.


def memory_budget_line(ax, memory_budget_gib: float) -> None:
  """The dashed memory-budget line (in MiB) on a temp-memory axis."""
  budget = memory_budget_gib * 1024
  ax.axhline(budget, color="gray", ls="--", lw=1)
  ax.annotate("memory budget (x: compiled, not run)", (0.02, budget),
              xycoords=("axes fraction", "data"), xytext=(0, 4), textcoords="offset points",
              color="gray", fontsize=8)


def log_log_axes(ax, title: str, xlabel: str, ylabel: str) -> None:
  ax.set_xscale("log", base=2)
  ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, which="major", alpha=0.3)


# ----------------------------------------------------------------------------------------------
# Driver.


def main(argv: list[str] | None, *, doc: str, module: str, stem_name: str, noun: str,
         get_config: Callable[..., Any], run: Callable[[Any, str], dict[str, Any]],
         print_summary: Callable[[dict[str, Any]], None],
         write_markdown: Callable[[str, dict[str, Any]], None],
         write_plot: Callable[[str, dict[str, Any]], None]) -> dict[str, Any]:
  """Parses the command line, runs (or re-renders), writes `<out>/<stem_name>.{json,md,png}`."""
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
  with open(stem + ".json", "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1, default=json_default)
  write_markdown(stem + ".md", result)
  write_plot(stem + ".png", result)
  log(f"Wrote {stem}.json, {stem}.md, {stem}.png")
  return result
