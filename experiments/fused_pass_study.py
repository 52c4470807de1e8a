"""DCA's window and memory in one block pass (chunk = W) against the library's two passes.

    python -m experiments.fused_pass_study [--shapes 8x256 1x1024 1x4096] [--rounds 15]

Issue #11 asks for the window and the compressed memory "in as few passes over the sequence as
the maths allows (for example one chunked pass with chunk = W ...); decide by measurement". With
chunk C = W the two share one block layout: a query block n sees its own key block and block
n - 1 exactly (the window), and the memory's stream, delayed by W tokens, is block n - 1 again
(`previous` below), so one block layout [B, H, N, W, .] of each input serves both, the stream
needs no shifted copy in time order, and both read-outs combine in the block layout before one
transpose back. `one_pass` is that form for the library's default case (additive memory, unified
combination (no gate), one decay per head, no state, no reset, rotary positions, finite inputs);
it runs the engine's chunked pass body (`chunked._plain_pass`) on block-layout inputs, with the
gauge identity of `chunked._gauge_jvp` restated for that layout as its JVP rule.

The study checks that `one_pass` equals `attention_compress(mode="chunked")` (outputs and the
gradients of every weight) and times the gradient of both, interleaved, median of `--rounds`
after warm-up, at each batch x length. It prints a Markdown table (and with --out writes a JSON
record: docs/fused_pass_study.json is the run the README quotes). The library does not use
`one_pass`: wired into `attention_compress` for the case it covers, it gave the DCA layer's
forward+backward no gain beyond the noise at 256 and 1024 tokens and a small one at 4096 (the
A/Bs are in issue #11's notes; the wiring was not committed; README, "Measured so far", has the
decision).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from dca_jax import compute_weights, init_params
from dca_jax.ops import chunked
from dca_jax.ops.dca import attention_compress
from dca_jax.ops.dca_memory import _unified
from dca_jax.ops.quadratic import prefix_sum
from dca_jax.ops.rotary import rotate_pairs
from dca_jax.ops.window import _block_rotary_tables


def _blocks_body(q, k, v, g, s0):
  """The chunked pass on block-layout inputs [B, H, N, C, .] (g [B, H, N, C, 1]): `chunked`'s
  body without its transposes (per-head decays, so `_plain_pass`'s own layout step is skipped by
  calling it on inputs it reshapes without moving: one head, time = N C)."""
  batch, heads, n, c, _ = q.shape
  flat = lambda x: x.reshape(batch * heads, n * c, 1, x.shape[-1])
  o, final = chunked._plain_pass(flat(q), flat(k), flat(v), flat(g),
                                 s0.reshape((batch * heads, 1) + s0.shape[2:]), chunk_size=c)
  return o.reshape(batch, heads, n, c, -1), final.reshape(s0.shape)


@jax.custom_jvp
def _gauged_blocks(q, k, v, g, s0):
  return _blocks_body(q, k, v, g, s0)


def _gauged_blocks_jvp(primals, tangents):
  """`chunked._gauge_jvp` for block-layout inputs: the log decays' tangent moved onto q and k."""
  q, k, v, g, s0 = primals
  dq, dk, dv, dg, ds0 = tangents
  zero = lambda t: isinstance(t, SymbolicZero)
  batch, heads, n, c, _ = g.shape
  if not zero(dg):
    gauge = prefix_sum(dg.reshape(batch, heads, n * c), axis=2).reshape(batch, heads, n, c)
    by_gauge = lambda x: jnp.einsum("...k,...->...k", x, gauge,
                                    precision=jax.lax.Precision.HIGHEST)
    dq = by_gauge(q) if zero(dq) else dq + by_gauge(q)
    dk = -by_gauge(k) if zero(dk) else dk - by_gauge(k)
  at_fixed_g = lambda q, k, v, s0: _blocks_body(q, k, v, g, s0)
  out, (do, dfinal) = chunked.jvp_of_nonzero(at_fixed_g, (q, k, v, s0), (dq, dk, dv, ds0))
  if not zero(dg):
    dfinal = dfinal + gauge[:, :, -1, -1, None, None] * out[1]
  return out, (do, dfinal)


_gauged_blocks.defjvp(_gauged_blocks_jvp, symbolic_zeros=True)


def one_pass(weights, window: int, rotary_base: float = 10000.0):
  """DCA (additive memory, per-head decay, no state or reset, finite weights) in one block pass
  with chunk = W: equal to `attention_compress(weights, window=window)` ([B, T, H, V]).

  Raises:
    ValueError: for weights outside that case (a gate, a delta memory's beta, per-channel decay).
  """
  if weights.gate is not None:
    raise ValueError("one_pass: weights.gate must be None (combine='unified'), got an array of "
                     f"shape {weights.gate.shape}")
  if weights.beta is not None:
    raise ValueError("one_pass: weights.beta must be None (memory='additive'), got an array of "
                     f"shape {weights.beta.shape}")
  if weights.log_decay.ndim != 3:
    raise ValueError("one_pass: weights.log_decay must be [B, T, H] (one decay per head), got "
                     f"shape {weights.log_decay.shape}")
  q, k, v = weights.q, weights.k, weights.v
  batch, time, heads, key_dim = q.shape
  value_dim, block = v.shape[-1], window
  n = -(-time // block)
  pad = n * block - time
  f32 = jnp.float32

  def to_blocks(x):  # [B, T, H, D] -> [B, H, N, W, D]
    x = jnp.pad(x.astype(f32), ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2))
    return x.reshape(batch, n, block, heads, -1).transpose(0, 3, 1, 2, 4)

  def previous(x):  # block n - 1 aligned with block n; zeros for block 0
    return jnp.pad(x[:, :, :-1], [(0, 0), (0, 0), (1, 0)] + [(0, 0)] * (x.ndim - 3))

  cos, sin = _block_rotary_tables(block, key_dim, rotary_base)

  def rotated(x, offset):  # in-block position i rotated by i + offset, then to blocks
    x = jnp.pad(x.astype(f32), ((0, 0), (0, pad), (0, 0), (0, 0)))
    x = rotate_pairs(x.reshape(batch, n, block, heads, -1), cos[offset:offset + block],
                     sin[offset:offset + block])
    return x.transpose(0, 3, 1, 2, 4)

  q = q * (1.0 / math.sqrt(key_dim))
  q_own, q_prev, k_own = rotated(q, 0), rotated(q, block), rotated(k, 0)
  v_own = to_blocks(v)
  v_prev = previous(v_own)
  i, s = jnp.arange(block)[:, None], jnp.arange(block)[None, :]
  own = jnp.where(s <= i, jnp.einsum("bhnpk,bhnsk->bhnps", q_own, k_own), -jnp.inf)
  earlier = (s > i) & (jnp.arange(n) > 0)[:, None, None]
  prev = jnp.where(earlier, jnp.einsum("bhnpk,bhnsk->bhnps", q_prev, previous(k_own)), -jnp.inf)
  top = jax.lax.stop_gradient(jnp.maximum(own.max(-1), prev.max(-1)))
  p_own, p_prev = jnp.exp(own - top[..., None]), jnp.exp(prev - top[..., None])
  den = p_own.sum(-1) + p_prev.sum(-1)
  num = (jnp.einsum("bhnps,bhnsv->bhnpv", p_own, v_own)
         + jnp.einsum("bhnps,bhnsv->bhnpv", p_prev, v_prev))
  # The memory reads the stream delayed by W tokens: block n - 1, with a normaliser column of
  # ones (zero for the empty block before the first).
  ones = jnp.broadcast_to((jnp.arange(n) > 0)[:, None, None].astype(f32), v_prev.shape[:-1] + (1,))
  stream_values = jnp.concatenate([v_prev, ones], axis=-1)
  s0 = jnp.zeros((batch, heads, weights.q_features.shape[-1], value_dim + 1), f32)
  memory, _ = _gauged_blocks(to_blocks(weights.q_features), previous(to_blocks(weights.k_features)),
                             stream_values, to_blocks(weights.log_decay[..., None]), s0)
  o = _unified(num, den, top, memory[..., :value_dim], memory[..., value_dim])
  o = o.transpose(0, 2, 3, 1, 4).reshape(batch, n * block, heads, value_dim)[:, :time]
  return o.astype(weights.v.dtype)


def problem(batch: int, time: int, *, d_model: int = 256, heads: int = 4, window: int = 64,
            seed: int = 0):
  """DCA weights of the layer benchmark's shape (data-dependent decays) and a cotangent."""
  keys = jax.random.split(jax.random.key(seed), 4)
  params = init_params(keys[0], d_model=d_model, num_heads=heads, window=window)
  params = params._replace(decay=0.1 * jax.random.normal(keys[1], params.decay.shape))
  weights = compute_weights(params, jax.random.normal(keys[2], (batch, time, d_model)))
  cotangent = jax.random.normal(keys[3], weights.v.shape)
  return weights, cotangent


def both_forms(window: int):
  """{name: weights -> o}: the library's two passes and the one block pass."""
  return {
      "attention_compress (two passes)":
          lambda w: attention_compress(w, window=window, mode="chunked", confine_nonfinite=False),
      "one block pass (chunk = W)": lambda w: one_pass(w, window),
  }


def max_differences(weights, cotangent, window: int) -> dict[str, float]:
  """Largest |difference| between the two forms: output, and the gradient of each weight."""
  (name_a, a), (name_b, b) = both_forms(window).items()
  loss = lambda f: (lambda w: jnp.sum(f(w) * cotangent))
  diffs = {"output": float(jnp.max(jnp.abs(jax.jit(a)(weights) - jax.jit(b)(weights))))}
  grads_a, grads_b = jax.jit(jax.grad(loss(a)))(weights), jax.jit(jax.grad(loss(b)))(weights)
  for field, x, y in zip(weights._fields, grads_a, grads_b):
    if x is not None:
      diffs[f"grad {field}"] = float(jnp.max(jnp.abs(x - y)))
  return diffs


def main(argv: list[str] | None = None) -> list[dict]:
  from experiments import bookkeeping
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", nargs="+", default=["8x256", "1x1024", "1x4096"],
                      help="batch x length pairs")
  parser.add_argument("--rounds", type=int, default=15)
  parser.add_argument("--window", type=int, default=64)
  parser.add_argument("--out", default=None,
                      help="also write the rows, machine and date to this JSON file "
                           "(docs/fused_pass_study.json: the run the README quotes)")
  args = parser.parse_args(argv)
  rows = []
  for shape in args.shapes:
    try:
      batch, time_ = (int(x) for x in shape.split("x"))
    except ValueError:
      parser.error(f"--shapes takes BxT pairs such as 1x1024, got {shape!r}")
    weights, cotangent = problem(batch, time_, window=args.window)
    diff = max(max_differences(weights, cotangent, args.window).values())
    steps = {name: jax.jit(jax.grad(lambda w, f=f: jnp.sum(f(w) * cotangent)))
             for name, f in both_forms(args.window).items()}
    times = {name: [] for name in steps}
    for step in steps.values():
      jax.block_until_ready(step(weights))
      jax.block_until_ready(step(weights))
    for _ in range(args.rounds):
      for name, step in steps.items():
        start = time.perf_counter()
        jax.block_until_ready(step(weights))
        times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(t) for name, t in times.items()}
    rows.append({"batch": batch, "length": time_, "max_difference": diff, "ms": {
        name: 1e3 * m for name, m in medians.items()}})
  names = list(both_forms(args.window))
  print(f"{bookkeeping.machine_line(bookkeeping.machine_info())}, {bookkeeping.now()}; DCA's "
        f"attention (weights -> output) forward+backward, d_model 256, 4 heads, W = "
        f"{args.window}, float32; medians of {args.rounds} interleaved rounds:\n")
  print(f"| B x T | {names[0]} | {names[1]} | one pass / two | max abs difference |")
  print("|---|---:|---:|---:|---:|")
  for row in rows:
    a, b = (row["ms"][n] for n in names)
    print(f"| {row['batch']} x {row['length']} | {a:.2f} ms | {b:.2f} ms | {b / a:.3f} | "
          f"{row['max_difference']:.1e} |")
  if args.out:
    bookkeeping.write_json(args.out, {
        "command": bookkeeping.command_line("experiments.fused_pass_study", argv),
        "rounds": args.rounds, "window": args.window, "forms": names, "rows": rows,
        "machine": bookkeeping.machine_info(), "date": bookkeeping.now()})
  return rows


if __name__ == "__main__":
  main()
