"""The chunked form with per-channel decay at realistic shapes, compiled as users compile it.

Regression tests for a crash: `jax.jit(jax.grad(...))` of the chunked per-channel form killed the
Python process with a segmentation fault on CPU (jax 0.10.2) at B=1, T=128, H=4, K=V=64 with
chunks of 16. The autodiff of the former sub-chunked intra-chunk scores produced a rank-7
multiply-reduce fusion ([B, H, N, I, J, c, K]) that XLA:CPU hands to YNNPACK, which crashes on it
(in its transpose, `slinky::fuse_contiguous_dims`); `jnp.sum(a * b, axis=3)` on two
[1, 4, 8, 2, 2, 8, 64] arrays reproduces it alone. tests/test_gla.py never reached that fusion:
its drawn shapes (K <= 9, H <= 3) are small, and XLA left reductions that small out of YNNPACK in
every check made while fixing this (the same sum on [2, 2, 2, 2, 2, 2, 16] makes no YNN fusion).

So the shapes here are the ones that crashed and XLA's default compile options are used. The
compile-and-run check happens in a child process, where a crash is a non-zero exit status (a
test failure) rather than a dead test worker; the numerical comparison with the recurrent form
runs in-process at the first crashing shape.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dca_jax.ops import gated_linear_attention

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (B, T, H, K, V, chunk_size): the reported crashes, then more heads, an awkward length and V != K.
CRASH_SHAPES = [
    (1, 128, 4, 64, 64, 16),
    (1, 128, 4, 64, 64, 64),
    (1, 300, 8, 64, 32, 64),
]

# Run in the child, one shape after another (one interpreter start for all: compiling dominates):
# jit(grad) w.r.t. q, k, v and log_decay, then a finiteness check. Each shape is announced before
# it is compiled, so that a crash names it.
_CHILD = textwrap.dedent("""
    import json, sys
    import jax, jax.numpy as jnp
    from dca_jax.ops import gated_linear_attention

    for shape in json.loads(sys.argv[1]):
      print("start", json.dumps(shape), flush=True)
      batch, time, heads, key_dim, value_dim, chunk = shape
      keys = jax.random.split(jax.random.key(0), 4)
      q = jax.random.normal(keys[0], (batch, time, heads, key_dim))
      k = jax.random.normal(keys[1], (batch, time, heads, key_dim))
      v = jax.random.normal(keys[2], (batch, time, heads, value_dim))
      log_decay = jax.nn.log_sigmoid(jax.random.normal(keys[3], (batch, time, heads, key_dim)) + 4)

      def loss(q, k, v, log_decay):
        o = gated_linear_attention(q, k, v, log_decay, mode="chunked", chunk_size=chunk)
        return jnp.sum(o)

      grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, log_decay)
      finite = [bool(jnp.all(jnp.isfinite(g))) for g in grads]
      print("result", json.dumps({"shape": shape, "finite": finite}), flush=True)
""")


# The same shape is compiled and compared in process just below; this guard against the process
# dying (a fresh interpreter, ~50 s) runs in the full job.
@pytest.mark.slow
def test_chunked_per_channel_grad_runs_in_a_child_process():
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO_ROOT, env.get("PYTHONPATH")]))
  result = subprocess.run(
      [sys.executable, "-X", "faulthandler", "-c", _CHILD, json.dumps(CRASH_SHAPES)],
      cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
  lines = result.stdout.splitlines()
  started = [line.split(" ", 1)[1] for line in lines if line.startswith("start ")]
  assert result.returncode == 0, (
      f"child exited with status {result.returncode} while on (B, T, H, K, V, chunk) = "
      f"{started[-1] if started else None}\nstdout:\n{result.stdout[-2000:]}\n"
      f"stderr:\n{result.stderr[-4000:]}")
  results = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("result ")]
  assert [r["shape"] for r in results] == [list(s) for s in CRASH_SHAPES]
  for r in results:
    assert r["finite"] == [True] * 4, (
        f"{r['shape']}: finite gradients w.r.t. (q, k, v, log_decay): {r['finite']}")


def _inputs():
  """B=1, T=128, H=4, K=V=64: heads 0-1 ordinary decays, heads 2-3 also -inf, -1e4 and -50."""
  batch, time, heads, dim = 1, 128, 4, 64
  keys = jax.random.split(jax.random.key(1), 7)
  q = jax.random.normal(keys[0], (batch, time, heads, dim))
  k = jax.random.normal(keys[1], (batch, time, heads, dim))
  v = jax.random.normal(keys[2], (batch, time, heads, dim))
  log_decay = jax.nn.log_sigmoid(2 * jax.random.normal(keys[3], (batch, time, heads, dim)) + 3)
  u = jax.random.uniform(keys[4], log_decay.shape)
  extreme = jnp.select([u < 0.03, u < 0.08, u < 0.2], [-jnp.inf, -1e4, -50.0], log_decay)
  log_decay = jnp.where(jnp.arange(heads)[:, None] >= 2, extreme, log_decay)
  # Cotangents for o and S_T, so that every output element weighs differently in the gradients.
  o_weight = jax.random.normal(keys[5], (batch, time, heads, dim))
  s_weight = jax.random.normal(keys[6], (batch, heads, dim, dim))
  return (q, k, v, log_decay), (o_weight, s_weight)


def _forward_and_grads(mode, arrays, weights, compiler_options=None):
  def loss(q, k, v, log_decay):
    o, final = gated_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=16,
                                      return_final_state=True)
    return jnp.sum(o * weights[0]) + jnp.sum(final * weights[1]), (o, final)
  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True),
                 compiler_options=compiler_options)
  grads, (o, final) = grad(*arrays)
  return {"o": o, "final state": final, "dq": grads[0], "dk": grads[1], "dv": grads[2],
          "dlog_decay": grads[3]}


def test_chunked_per_channel_matches_recurrent_at_crash_shape():
  arrays, weights = _inputs()
  chunked = _forward_and_grads("chunked", arrays, weights)
  # The reference only needs to be right, not compiled as users compile: a cheap compile will do.
  cheap = {"xla_backend_optimization_level": 0} if jax.default_backend() == "cpu" else None
  recurrent = _forward_and_grads("recurrent", arrays, weights, cheap)
  for name, expected in recurrent.items():
    actual, expected = np.asarray(chunked[name]), np.asarray(expected)
    assert np.all(np.isfinite(actual)), f"{name}: non-finite values"
    scale = np.max(np.abs(expected))
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4 * scale, err_msg=name)
