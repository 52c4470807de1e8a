"""Measures `dca_jax.ops.projection`: the projections' plain autodiff against `project`.

Usage:
  python -m experiments.projection_study                                # the figures it cites
  python -m experiments.projection_study --layers dca,gla --lengths 1024

Two kinds of rows, each timed forward+backward (gradients of the weights and the input), both
variants compiled in one process and timed round-robin (`--repeats` rounds after a warm-up):

* `matmul`: one projection [T, 256] x [256, 832] (the size of DCA's fused q, k, v and feature
  projection at d_model 256), `x @ w` against `project(x, w)`;
* each layer (B = 1, d_model 256, 4 heads, float32, the layer's defaults), with every projection
  as plain `jax.lax.dot_general` against the library's `project` (the variant is chosen by
  swapping the module attribute before the layer's step is traced).

Prints the median milliseconds and plain / project. The figures quoted in
dca_jax/ops/projection.py come from this script; ratios only compare within one run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.nn import registry
from dca_jax.ops import dca_params, projection

FAST = projection.project


def _plain(x, w, precision=None, preferred_element_type=None):
  return projection._product(x, w, precision, preferred_element_type)  # pylint: disable=protected-access


def _use(variant: str) -> None:
  """Routes the library's projections through `project` ("project") or plain autodiff."""
  projection.project = dca_params.project = FAST if variant == "project" else _plain


def _step(name: str, length: int, variant: str):
  """A compiled forward+backward and its arguments, traced with `variant` in place."""
  _use(variant)
  try:
    x = jax.random.normal(jax.random.key(0), (1, length, 256))
    if name == "matmul":
      w = jax.random.normal(jax.random.key(1), (256, 832)) / 16.0
      mm = projection.project
      step = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.sin(mm(x, w))), argnums=(0, 1)))
      args = (w, x)
    else:
      layer = registry.layer_spec(name).layer(256, 4, rngs=nnx.Rngs(0))
      graph, state = nnx.split(layer)
      probe = jax.random.normal(jax.random.key(5), x.shape)
      step = jax.jit(jax.grad(lambda s, x: jnp.sum(probe * nnx.merge(graph, s)(x)),
                              argnums=(0, 1)))
      args = (state, x)
    jax.block_until_ready(step(*args))              # compile (traced now) and warm up
  finally:
    _use("project")
  return step, args


def measure(name: str, length: int, repeats: int) -> dict[str, float]:
  """Median seconds per variant of one row."""
  steps = {variant: _step(name, length, variant) for variant in ("plain", "project")}
  times = {variant: [] for variant in steps}
  for _ in range(repeats):
    for variant, (step, args) in steps.items():
      start = time.perf_counter()
      jax.block_until_ready(step(*args))
      times[variant].append(time.perf_counter() - start)
  return {variant: statistics.median(t) for variant, t in times.items()}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--layers", default="matmul,dca,gla,window,gated_deltanet,linear,softmax",
                      help="comma-separated: matmul and/or registry layer names")
  parser.add_argument("--lengths", default="1024,8192")
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args(argv)
  print(f"backend {jax.default_backend()}, jax {jax.__version__}; fwd+bwd medians, ms")
  print(f"{'row':16s} {'T':>6s} {'plain':>9s} {'project':>9s} {'plain/project':>14s}")
  for length in (int(t) for t in args.lengths.split(",")):
    for name in args.layers.split(","):
      if name == "softmax" and length > 4096:
        continue                    # the dense softmax layer's T x T scores, not a projection
      result = measure(name, length, args.repeats)
      print(f"{name:16s} {length:6d} {result['plain'] * 1e3:9.2f} {result['project'] * 1e3:9.2f} "
            f"{result['plain'] / result['project']:14.2f}", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
