"""Asymptotic cost of the forms of `gated_linear_attention`, counted exactly, never timed.

FLOPs come from `dca_jax.flops.count_flops` (a walk over the jaxpr that counts a scan body once
per step, unlike XLA's cost analysis) and memory from XLA's buffer assignment
(`memory_analysis().temp_size_in_bytes`). Arguments are `jax.ShapeDtypeStruct`s: nothing is
computed, so long sequences cost only tracing (and, for memory, one compile per length).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest

from dca_jax.flops import count_flops
from dca_jax.ops import engine_segment, gated_linear_attention
from oracles import fast_jit

LINEAR_LENGTHS = [1024 * 2**i for i in range(7)]       # 1024 .. 65536
QUADRATIC_LENGTHS = [256, 512, 1024, 2048]
MEMORY_LENGTHS = [4096, 8192, 16384]
CHUNK = 64

def _specs(time, *, heads=2, dim=16, per_channel=True):
  """ShapeDtypeStructs for q, k, v, log_decay with B = 1 and K = V = dim."""
  spec = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  decay = spec(1, time, heads, dim) if per_channel else spec(1, time, heads)
  return spec(1, time, heads, dim), spec(1, time, heads, dim), spec(1, time, heads, dim), decay


def _forward(mode):
  return functools.partial(gated_linear_attention, mode=mode, chunk_size=CHUNK)


def _forward_backward(mode):
  def loss(q, k, v, log_decay):
    return jnp.sum(gated_linear_attention(q, k, v, log_decay, mode=mode, chunk_size=CHUNK))
  return jax.grad(loss, argnums=(0, 1, 2, 3))


def _doubling_ratios(costs):
  return [b / a for a, b in zip(costs[:-1], costs[1:])]


CASES = [
    ("chunked", True), ("chunked", False), ("recurrent", True), ("recurrent", False),
    ("associative", True),
]


@pytest.mark.parametrize("mode, per_channel", CASES,
                         ids=[f"{m}-{'per_channel' if c else 'per_head'}" for m, c in CASES])
def test_forward_flops_grow_linearly(mode, per_channel):
  flops = [count_flops(_forward(mode), *_specs(t, per_channel=per_channel)).flops
           for t in LINEAR_LENGTHS]
  ratios = _doubling_ratios(flops)
  assert all(1.8 <= r <= 2.2 for r in ratios), dict(zip(LINEAR_LENGTHS[1:], ratios))


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_head"])
def test_chunked_forward_backward_flops_grow_linearly(per_channel):
  """Linear on each side of the CPU's segment threshold (`planner.engine_segment`); crossing it,
  the backward pass recomputes each segment's forward (checkpointed), up to ~1.4x more work."""
  flops = [count_flops(_forward_backward("chunked"), *_specs(t, per_channel=per_channel)).flops
           for t in LINEAR_LENGTHS]
  ratios = _doubling_ratios(flops)
  segmented = [engine_segment(t, backend="cpu") is not None for t in LINEAR_LENGTHS]
  assert any(segmented) and not all(segmented)        # the lengths cover both regimes
  for length, ratio, before, after in zip(LINEAR_LENGTHS[1:], ratios, segmented, segmented[1:]):
    high = 2.2 * (1.4 if after and not before else 1.0)
    assert 1.8 <= ratio <= high, (length, dict(zip(LINEAR_LENGTHS[1:], ratios)))


@pytest.mark.parametrize("per_channel", [True, False], ids=["per_channel", "per_head"])
def test_quadratic_flops_grow_quadratically(per_channel):
  flops = [count_flops(_forward("quadratic"), *_specs(t, per_channel=per_channel)).flops
           for t in QUADRATIC_LENGTHS]
  ratios = _doubling_ratios(flops)
  assert all(3.5 <= r <= 4.5 for r in ratios), dict(zip(QUADRATIC_LENGTHS[1:], ratios))


def test_chunked_needs_fewer_flops_than_quadratic_at_long_lengths():
  """At T = 2048 the chunked form is already several times cheaper than the T x T form."""
  chunked = count_flops(_forward("chunked"), *_specs(2048)).flops
  quadratic = count_flops(_forward("quadratic"), *_specs(2048)).flops
  assert chunked * 4 < quadratic, (chunked, quadratic)


def _temp_bytes(fn, *specs):
  # Cheap compiles on CPU; buffer assignment (hence temp_size_in_bytes) is the same as with the
  # default options, checked when this test was written.
  compiled = fast_jit(fn).lower(*specs).compile()
  return compiled.memory_analysis().temp_size_in_bytes


def test_chunked_forward_backward_memory_grows_linearly(record_property):
  temps = [_temp_bytes(_forward_backward("chunked"), *_specs(t, heads=1)) for t in MEMORY_LENGTHS]
  record_property("chunked_fwd_bwd_temp_bytes", dict(zip(MEMORY_LENGTHS, temps)))
  ratios = _doubling_ratios(temps)
  assert all(r <= 2.2 for r in ratios), dict(zip(MEMORY_LENGTHS, temps))


def test_recurrent_forward_backward_memory_is_recorded(record_property):
  """The scan's backward pass keeps one K x V state per token: recorded, not asserted."""
  temps = [_temp_bytes(_forward_backward("recurrent"), *_specs(t, heads=1)) for t in MEMORY_LENGTHS]
  record_property("recurrent_fwd_bwd_temp_bytes", dict(zip(MEMORY_LENGTHS, temps)))
  print("recurrent fwd+bwd temp bytes:", dict(zip(MEMORY_LENGTHS, temps)))
  assert all(t > 0 for t in temps)
