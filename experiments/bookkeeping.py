"""What every experiment records beside its numbers: the machine, the date, the code, the log.

One place for the facts that make a result reproducible and comparable: `machine_info` (the
machine, the software versions and the load, the same fields for every experiment),
`machine_line` (its one-line summary for Markdown headers), `now` (UTC, ISO 8601), `git_commit`
(the code's commit, "-dirty" when tracked files differ), `json_default` and `write_json` (NumPy
scalars in JSON files) and `log` (a flushed line on stdout, so progress shows under `tee` and in
subprocess logs).

Example:
  >>> info = machine_info()
  >>> sorted(k for k in ("backend", "cpu_model", "date", "jax") if k in info)
  ['backend', 'cpu_model', 'date', 'jax']
"""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import shlex
import subprocess
import sys
from typing import Any, Mapping

import flax
import jax
import jaxlib
import numpy as np
import optax

GIB = 2**30

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def log(message: str) -> None:
  """Prints `message` and flushes, so that it shows at once in redirected output."""
  print(message, flush=True)


def now() -> str:
  """The current UTC time, ISO 8601 to the second (e.g. '2026-11-28T09:14:03+00:00')."""
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def command_line(module: str, argv: list[str] | None) -> str:
  """The command that ran `module`'s main with `argv` (None: this process's own arguments), as a
  record states it: "python -m experiments.x --flag value"."""
  args = sys.argv[1:] if argv is None else argv
  return " ".join(["python -m", module] + [shlex.quote(a) for a in args])


def json_default(x: Any) -> Any:
  """`json.dumps`'s `default` for NumPy scalars (int, float, bool).

  Raises:
    TypeError: anything else that JSON cannot hold.
  """
  if isinstance(x, np.integer):
    return int(x)
  if isinstance(x, np.floating):
    return float(x)
  if isinstance(x, np.bool_):
    return bool(x)
  raise TypeError(f"not JSON serialisable: {type(x)}")


def write_json(path: str | os.PathLike[str], value: Any, *, indent: int = 2) -> None:
  """Writes `value` as JSON (NumPy scalars allowed) followed by a newline."""
  pathlib.Path(path).write_text(json.dumps(value, indent=indent, default=json_default) + "\n",
                                encoding="utf-8")


def git_commit() -> str | None:
  """The repository's HEAD commit, with "-dirty" when tracked files differ; None without git."""
  try:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=_ROOT, capture_output=True,
                            text=True, timeout=10, check=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=_ROOT,
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return commit + ("-dirty" if dirty else "")


def cpu_model() -> str:
  """The CPU's model name ('AMD EPYC ...'), or the platform's processor name."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
  try:
    with open("/proc/meminfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("MemTotal:"):
          return round(int(line.split()[1]) * 1024 / GIB, 1)
  except OSError:
    pass
  return None


def load_average() -> list[float] | None:
  """The load averages over 1, 5 and 15 min (None where the OS gives none)."""
  return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def machine_info() -> dict[str, Any]:
  """What the numbers were measured on: CPU, cores, memory, software versions, backend, date.

  Returns:
    A JSON-serialisable dict: cpu_model, processor, cpu_count, usable_cores, memory_gib,
    platform, python, jax, jaxlib, flax, optax, numpy, backend, devices, load_average, date.
  """
  try:
    usable_cores = len(os.sched_getaffinity(0))
  except AttributeError:
    usable_cores = os.cpu_count()
  return {
      "cpu_model": cpu_model(),
      "processor": platform.processor() or platform.machine(),
      "cpu_count": os.cpu_count(),
      "usable_cores": usable_cores,
      "memory_gib": _memory_gib(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "jaxlib": jaxlib.__version__,
      "flax": flax.__version__,
      "optax": optax.__version__,
      "numpy": np.__version__,
      "backend": jax.default_backend(),
      "devices": [str(d) for d in jax.devices()],
      # A loaded machine explains noisy absolute times.
      "load_average": load_average(),
      "date": now(),
  }


def machine_line(info: Mapping[str, Any]) -> str:
  """One line describing the machine of `machine_info()`, for Markdown headers."""
  memory = f", {info['memory_gib']} GiB RAM" if info.get("memory_gib") else ""
  return (f"{info['cpu_model']} ({info['usable_cores']} cores{memory}), backend "
          f"{info['backend']}, jax {info['jax']}, Python {info['python']}")
