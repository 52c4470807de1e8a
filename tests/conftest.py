"""Settings shared by the whole suite.

Property tests draw their shapes from a fixed seed by default, so that a CI failure reproduces
on any machine with the same command; `DCA_HYPOTHESIS_PROFILE=explore` draws fresh examples on
each run (for hunting, not for CI). A test that sets its own `max_examples` keeps it.
"""

from __future__ import annotations

import os

import hypothesis

# XLA on one thread per process unless the caller chose flags: the suite runs as two pytest-xdist
# workers on two cores, so a multi-threaded XLA pool per worker only oversubscribes them. It also
# takes XLA's intra-op thread pool out of the picture for the intermittent failures of 2026-12-02:
# a segfault in XLA:CPU's compiler (still unexplained), and a computation whose result never
# arrived, all pool threads idle: that one was LAPACK's batched triangular solve deadlocking the
# pool (see dca_jax.ops.delta_rule.unit_lower_solve, which replaced it).
# Set before any test module imports JAX.
os.environ.setdefault("XLA_FLAGS",
                      "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

# The tests compare every form with float64 references at float32 tolerances. On NVIDIA GPUs
# since Ampere JAX's default float32 matmul is TF32 (a relative error of ~4e-4 on DCA's outputs,
# docs/gpu.md), so the suite asks for true float32 matmuls; on the CPU this changes nothing.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

hypothesis.settings.register_profile("reproducible", deadline=None, derandomize=True,
                                     print_blob=True)
hypothesis.settings.register_profile("explore", deadline=None, print_blob=True)
hypothesis.settings.load_profile(os.environ.get("DCA_HYPOTHESIS_PROFILE", "reproducible"))
