"""Markdown and plot pieces shared by the reports of `experiments/`.

Human-readable times and sizes (`format_seconds`, `format_bytes`), the cells and tables of the
benchmarks' reports (a time or memory cell that says why a program did not run, a grid of names
by T, the targets table), the machine-load text, and the plots' memory-budget line and log-log
axes. Nothing here measures: the numbers come in as result dicts.

Example:
  >>> format_seconds(0.00123), format_bytes(3 * 2**20)
  ('1.23 ms', '3 MiB')
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from experiments.bookkeeping import GIB, log, machine_line


def format_seconds(seconds: float | None) -> str:
  """Human-readable duration: '1.23 ms', '4.5 s'."""
  if seconds is None:
    return "-"
  if seconds < 1e-3:
    return f"{seconds * 1e6:.0f} us"
  if seconds < 1:
    return f"{_three_digits(seconds * 1e3)} ms"
  return f"{_three_digits(seconds)} s"


def _three_digits(x: float) -> str:
  return f"{x:.0f}" if x >= 100 else f"{x:.3g}"


def format_bytes(num: float | None) -> str:
  """Human-readable size: '512 KiB', '1.5 GiB'."""
  if num is None:
    return "-"
  for unit, size in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
    if num >= size:
      return f"{_three_digits(num / size)} {unit}"
  return f"{int(num)} B"


# ----------------------------------------------------------------------------------------------
# Markdown.


def cell_time(r):
  """A time cell: the median, or why it did not run ('skip: mem', 'skip: time', '-', 'error')."""
  if r is None:
    return ""
  if r["status"] == "ok":
    return format_seconds(r["median_s"]) + ("" if r.get("finite", True) else " (NaN!)")
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
  text = format_bytes(r["temp_bytes"])
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


def matmul_text(probes) -> str:
  """'Dense 2048^2 float32 matmul: a, b GFLOP/s (start, end of run).'"""
  return (f"Dense {probes[0]['n']}^2 float32 matmul: "
          + ", ".join(f"{p['gflops']:.1f}" for p in probes) + " GFLOP/s (start, end of run).")


def targets_section(targets, value_text: Callable[[dict[str, Any]], str]) -> list[str]:
  """The '## Targets' heading and table, one row per target with PASS/MISS/INFO in bold."""
  lines = ["## Targets", "", "| target | value | goal | status | detail |",
           "|---|---:|---|---|---|"]
  for row in targets:
    lines.append(f"| {row['target']} | {value_text(row)} | {row['goal']} | **{row['status']}** | "
                 f"{row['detail']} |")
  return lines


def grid_sections(records_table: Callable[[str, Callable[[Any], str]], str],
                  sections) -> list[str]:
  """One '## title' section per (title, pass, cell); memory sections say what brackets mean."""
  lines = []
  for title, pass_name, cell in sections:
    lines += ["", f"## {title}", ""]
    if "memory" in title:
      lines += ["Parenthesised: compiled but not run (over a budget).", ""]
    lines.append(records_table(pass_name, cell))
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


def pyplot():
  """matplotlib's pyplot on the Agg backend: plots are written to files, never shown.

  matplotlib is a development dependency, imported only when a plot is drawn.
  """
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def finish_plot(fig, path: str, title: str, machine: Mapping[str, Any], *,
                rect: tuple[float, float, float, float] | None = None) -> None:
  """Titles a figure with what was measured, on which machine and when; saves it and closes it.

  Args:
    fig: the matplotlib figure.
    path: the PNG to write (110 dpi).
    title: what the figure shows; the machine line and the date follow it.
    machine: the run's `bookkeeping.machine_info()`.
    rect: `tight_layout`'s rectangle (room left for a legend below the axes), or None.
  """
  plt = pyplot()
  fig.suptitle(f"{title} — {machine_line(machine)}, {machine['date'][:10]}", fontsize=9)
  fig.tight_layout(**({} if rect is None else {"rect": rect}))
  fig.savefig(path, dpi=110)
  plt.close(fig)
