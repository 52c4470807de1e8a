"""Tests that need 8 devices run in their own pytest process, with 8 CPU host devices:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest -q tests/multidevice

(`.ci/run` runs it after the main suite). The flag must be set before JAX starts, so in the main
suite's single-device process these files are not collected.
"""

from __future__ import annotations

import jax

REQUIRED_DEVICES = 8

if jax.device_count() < REQUIRED_DEVICES:
  collect_ignore_glob = ["test_*.py"]
