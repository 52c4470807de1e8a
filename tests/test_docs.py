"""The examples in the README and in docstrings run and print what they claim."""

from __future__ import annotations

import doctest
import importlib
import pathlib
import pkgutil
import re

import pytest

import dca_jax
import experiments

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _modules(package=dca_jax):
  names = [package.__name__]
  for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
    names.append(info.name)
  return sorted(names)


@pytest.mark.parametrize("name", _modules())
def test_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


@pytest.mark.parametrize("name", _modules(experiments))
def test_experiments_docstring_examples(name):
  module = importlib.import_module(name)
  result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
  assert result.failed == 0, f"{result.failed} docstring example(s) failed in {name}"


def test_readme_python_blocks_run():
  text = (ROOT / "README.md").read_text()
  blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
  assert blocks, "the README should show runnable Python"
  for block in blocks:
    exec(compile(block, "README.md", "exec"), {})


def test_readme_quotes_the_recorded_demo_run():
  """The README's demo figures (validation bits per byte of both models, and the run's time)
  are those of docs/demo.json, written by `python -m experiments.demo --record docs/demo.json`."""
  import json
  record = json.loads((ROOT / "docs" / "demo.json").read_text())
  opening = (ROOT / "README.md").read_text().split("Run the tests")[0]
  for name, label in (("lm_dca", "DCA"), ("lm_softmax", "softmax")):
    bpb = record["summaries"][name]["validation"]["val_bpb"]
    assert f"{bpb:.4f} ({label})" in opening
  assert f"{record['total_s'] / 60:.1f} min" in opening
  assert record["machine"]["date"][:10] in opening


def test_readme_quotes_the_recorded_rowwise_and_confinement_runs():
  """The README's reduce-of-multiply timings and confinement savings are those of
  docs/rowwise_study.json and docs/confine_check.json (the scripts' `--out` records)."""
  import json
  readme = " ".join((ROOT / "README.md").read_text().split())
  rowwise = json.loads((ROOT / "docs" / "rowwise_study.json").read_text())["us"]
  reduce, dot = rowwise["sum(x * y, -1)"], rowwise["einsum('...k,...k->...')"]
  assert f"{reduce:.0f} us for a sum that takes {dot:.0f} us as an einsum" in readme
  rows = json.loads((ROOT / "docs" / "confine_check.json").read_text())["rows"]
  saved = {(r["layer"], r["T"]): 100 * (1 - r["ratio"]) for r in rows}
  assert (f"{saved['DCAttention', 1024]:.0f} % of DCA's layer forward+backward at T = 1024 and "
          f"{saved['DCAttention', 8192]:.0f} % at 8192") in readme
  for length, text in ((1024, "0.5-10 %"), (8192, "0.7-5 %")):
    others = [v for (layer, t), v in saved.items() if t == length and layer != "DCAttention"]
    low, high = text.split(" ")[0].split("-")
    assert f"{min(others):.1f}" == low and f"{max(others):.0f}" == high, (length, others)
    assert text in readme


def test_readme_headline_and_targets_are_the_performance_report_s():
  """The README's headline table (torch peer row included) and targets table are copied digit
  for digit from docs/performance.md, which `python -m experiments.performance` writes."""
  readme = (ROOT / "README.md").read_text()
  report = (ROOT / "docs" / "performance.md").read_text()
  tables = 0
  for line in report.splitlines():
    if line.startswith("| DCAttention | ") and "ms" in line and "GF/s" not in line:
      tables += line in readme
    if line.startswith(("| **torch / DCA**", "| DCA layer fwd+bwd vs torch", "| LM training",
                        "| DCA demo model decodes", "| engine: ")):
      assert line in readme, line
  assert tables >= 1


def test_readme_opening_quotes_the_recorded_fresh_clone_runs():
  """The README's two commands and the times it gives for them are those of the newest entries of
  docs/ci_runs.json (`python -m experiments.ci_record`: each command run on a fresh clone)."""
  import json
  from experiments import ci_record
  opening = " ".join((ROOT / "README.md").read_text().split("---")[0].split())
  assert ci_record.DEMO_COMMAND in opening
  runs = json.loads((ROOT / "docs" / "ci_runs.json").read_text())["runs"]
  latest = {}
  for entry in runs:
    if entry["exit_code"] == 0:
      latest[entry["job"]] = entry
  ci, demo = latest["ci"], latest["demo"]
  assert f"{ci['wall_s'] / 60:.1f} min" in opening and ci["commit"][:7] in opening
  for p in ci["pytest"]:
    assert f"{p['summary']} in {p['seconds'] / 60:.1f} min" in opening
  assert f"{demo['wall_s'] / 60:.1f} min" in opening and demo["commit"][:7] in opening
  assert f"{demo['demo_total_s'] / 60:.1f} min" in opening
