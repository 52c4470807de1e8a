"""A fresh-clone CI run, timed and recorded: the figures the README quotes for its test command.

    python -m experiments.ci_record [--repo .] [--out docs/ci_runs.json] [--log FILE]
    (~10 min on the 2-core CPU: it is the whole CI job)

Clones the repository's committed HEAD into a temporary folder, runs its `.ci/run` there (the
README's test command: a fresh virtual environment, the install, the main suite, then the tests
that need 8 devices in their own process) and appends one entry to the record: date, commit,
machine, wall seconds (install included), `.ci/run`'s exit code and pytest's summary line of each
of its two processes (e.g. "824 passed, 1 skipped" in 463.2 s). Earlier entries are kept, newest
last. Exits with `.ci/run`'s exit code.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from typing import Any

from experiments import bookkeeping

# pytest -q's last line: "824 passed, 1 skipped in 463.21s (0:07:43)".
_SUMMARY = re.compile(r"^=*\s*(\d+ (?:passed|failed|error|errors|skipped)[^\n]*?) in "
                      r"([0-9.]+)s\b", re.M)


def pytest_summaries(output: str) -> list[dict[str, Any]]:
  """Pytest's summary lines in `output`, in order: [{"summary": "...", "seconds": float}].

  Example:
    >>> pytest_summaries("....\\n824 passed, 1 skipped in 463.21s (0:07:43)\\n"
    ...                  "15 passed in 60.48s (0:01:00)\\n")
    [{'summary': '824 passed, 1 skipped', 'seconds': 463.21}, {'summary': '15 passed', 'seconds': 60.48}]
  """
  return [{"summary": m.group(1), "seconds": float(m.group(2))}
          for m in _SUMMARY.finditer(output)]


def run_ci(repo: pathlib.Path, log_path: pathlib.Path | None = None) -> dict[str, Any]:
  """Clones `repo`'s HEAD into a temporary folder, runs `.ci/run` there, returns the entry."""
  commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
  with tempfile.TemporaryDirectory() as tmp:
    clone = pathlib.Path(tmp) / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    started = bookkeeping.now()
    start = time.perf_counter()
    proc = subprocess.run([str(clone / ".ci" / "run")], cwd=clone, capture_output=True,
                          text=True)
    wall = time.perf_counter() - start
  output = proc.stdout + proc.stderr
  if log_path is not None:
    log_path.write_text(output)
  entry = {"date": started, "commit": commit, "command": ".ci/run on a fresh clone",
           "machine": bookkeeping.machine_info(), "wall_s": round(wall, 1),
           "exit_code": proc.returncode, "pytest": pytest_summaries(proc.stdout)}
  if proc.returncode != 0:
    entry["output_tail"] = output[-4000:]
  return entry


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repo", default=".", help="the repository to clone (default: .)")
  parser.add_argument("--out", default="docs/ci_runs.json", help="the record to append to")
  parser.add_argument("--log", default=None, help="also write .ci/run's whole output here")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  entry = run_ci(pathlib.Path(args.repo).resolve(), None if args.log is None
                 else pathlib.Path(args.log))
  record = json.loads(out.read_text()) if out.exists() else {"runs": []}
  record["runs"].append(entry)
  bookkeeping.write_json(out, record)
  tests = "; ".join(f"{p['summary']} in {p['seconds']:.0f} s" for p in entry["pytest"])
  bookkeeping.log(f"{entry['commit'][:7]}: exit {entry['exit_code']} in {entry['wall_s']:.0f} s "
                  f"({tests}); appended to {out}")
  return entry["exit_code"]


if __name__ == "__main__":
  sys.exit(main())
