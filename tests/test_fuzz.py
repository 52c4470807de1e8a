"""Runs the public-API fuzz (tests/fuzz_public_api.py) in a child process.

A crash inside XLA kills its process; run in a child, it fails this test with the child's
output (the falsifying example included) instead of killing a pytest worker. The CI profile is
drawn with a fixed seed; the long profile is the slow job: `pytest -m slow tests/test_fuzz.py`.
"""

import os
import pathlib
import subprocess
import sys

import pytest

FUZZ = pathlib.Path(__file__).with_name("fuzz_public_api.py")


def _run_fuzz(profile: str, timeout: int) -> None:
  env = dict(os.environ, DCA_FUZZ_PROFILE=profile)
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0",
       str(FUZZ)], cwd=FUZZ.parent.parent, env=env, capture_output=True, text=True,
      timeout=timeout)
  output = (proc.stdout + proc.stderr)[-20000:]
  assert proc.returncode == 0, f"fuzz child exited with status {proc.returncode}:\n{output}"


def test_fuzz_public_api_ci_profile():
  _run_fuzz("ci", timeout=900)


@pytest.mark.slow
def test_fuzz_public_api_long_profile():
  _run_fuzz("long", timeout=6 * 3600)
