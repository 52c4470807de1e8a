"""The README's two commands run on fresh clones, timed and recorded: the figures it quotes.

    python -m experiments.ci_record [--jobs ci,demo] [--repo .] [--out docs/ci_runs.json]
    (~15 min on the 2-core CPU: the whole CI job, then the demo with its install)

Each job clones the repository's committed HEAD into its own temporary folder, checks out that
commit, and runs there, in an environment without the caller's PYTEST_ADDOPTS, XLA_FLAGS and
JAX_PLATFORMS:
- "ci": `.ci/run` (the README's test command: a fresh virtual environment, the install, the main
  suite, then the tests that need 8 devices in their own process);
- "demo": `DEMO_COMMAND`, the README's main-job command (a fresh virtual environment, the
  install, the demo) with `--record docs/demo.json` added; that record is copied to the
  repository's docs/demo.json.
Each appends one entry to the record: job, date, commit, machine, wall seconds (install
included), exit code, and for "ci" pytest's summary line of each of its two processes (e.g.
"824 passed, 1 skipped" in 463.2 s), for "demo" the demo's own time. Earlier entries are kept,
newest last. Exits with the first non-zero exit code.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any

from experiments import bookkeeping

# The README's main-job command, as its first code block gives it (tests/test_docs.py checks it).
DEMO_COMMAND = ('python3 -m venv .venv && .venv/bin/pip install -e ".[dev]" && '
                '.venv/bin/python -m experiments.demo')
JOBS = ("ci", "demo")

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


def _clean_env() -> dict[str, str]:
  return {k: v for k, v in os.environ.items()
          if k not in ("PYTEST_ADDOPTS", "XLA_FLAGS", "JAX_PLATFORMS", "VIRTUAL_ENV",
                       "PYTHONPATH")}


def run_job(job: str, repo: pathlib.Path, commit: str,
            log_path: pathlib.Path | None = None) -> dict[str, Any]:
  """Runs `job` ("ci" or "demo") on a fresh clone of `repo` at `commit`; returns the entry."""
  with tempfile.TemporaryDirectory() as tmp:
    clone = pathlib.Path(tmp) / "clone"
    subprocess.run(["git", "clone", "-q", str(repo), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", "--detach", commit], check=True)
    command = (str(clone / ".ci" / "run") if job == "ci"
               else f"{DEMO_COMMAND} --record docs/demo.json")
    started = bookkeeping.now()
    start = time.perf_counter()
    proc = subprocess.run(command, shell=job == "demo", cwd=clone, capture_output=True,
                          text=True, env=_clean_env())
    wall = time.perf_counter() - start
    demo_record = clone / "docs" / "demo.json"
    entry = {"job": job, "date": started, "commit": commit,
             "command": ".ci/run" if job == "ci" else command,
             "machine": bookkeeping.machine_info(), "wall_s": round(wall, 1),
             "exit_code": proc.returncode}
    if job == "ci":
      entry["pytest"] = pytest_summaries(proc.stdout)
    elif proc.returncode == 0:
      entry["demo_total_s"] = json.loads(demo_record.read_text())["total_s"]
      shutil.copyfile(demo_record, repo / "docs" / "demo.json")
  output = proc.stdout + proc.stderr
  if log_path is not None:
    log_path.write_text(output)
  if proc.returncode != 0:
    entry["output_tail"] = output[-4000:]
  return entry


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--jobs", default="ci,demo", help="comma-separated subset of ci,demo")
  parser.add_argument("--repo", default=".", help="the repository to clone (default: .)")
  parser.add_argument("--out", default="docs/ci_runs.json", help="the record to append to")
  parser.add_argument("--log", default=None, help="also write each job's output to LOG.<job>")
  args = parser.parse_args(argv)
  jobs = args.jobs.split(",")
  if not jobs or any(j not in JOBS for j in jobs):
    parser.error(f"--jobs takes a comma-separated subset of {','.join(JOBS)}, got {args.jobs!r}")
  repo = pathlib.Path(args.repo).resolve()
  commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], check=True,
                          capture_output=True, text=True).stdout.strip()
  out = pathlib.Path(args.out)
  code = 0
  for job in jobs:
    entry = run_job(job, repo, commit,
                    None if args.log is None else pathlib.Path(f"{args.log}.{job}"))
    record = json.loads(out.read_text()) if out.exists() else {"runs": []}
    record["runs"].append(entry)
    bookkeeping.write_json(out, record)
    detail = ("; ".join(f"{p['summary']} in {p['seconds']:.0f} s" for p in entry["pytest"])
              if job == "ci" else f"demo {entry.get('demo_total_s', float('nan')):.0f} s")
    bookkeeping.log(f"{job} at {commit[:7]}: exit {entry['exit_code']} in {entry['wall_s']:.0f} s "
                    f"({detail}); appended to {out}")
    code = code or entry["exit_code"]
  return code


if __name__ == "__main__":
  sys.exit(main())
