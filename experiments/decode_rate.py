"""Decode tokens/s of `generate` for the demo-size model of each layer, after a long prompt.

    python -m experiments.decode_rate [--prompt 4096] [--repeats 5] [--batch 1]  (~2 min on 2 cores)

The step time is (time for 544 new tokens - time for 32) / 512, so the prompt's prefill and the
compilation cancel out; the median over `repeats` pairs is taken, and the rate is batch / step
time (aggregate tokens/s over the batch rows). Model: 2 layers, d_model 128, 4 heads, untrained
(the rate does not depend on the weights); window 64 for the windowed layers.
"""

from __future__ import annotations

import argparse
import time

import jax
from flax import nnx

from dca_jax.nn import TransformerConfig, TransformerLM, generate

LAYERS = (("dca", {"window": 64}), ("window", {"window": 64}), ("softmax", {}))
BUDGET = 1024   # generate's new-token budget (the softmax cache holds prompt + budget tokens)


def demo_model(attention: str, options: dict | None = None) -> TransformerLM:
  """The demo-size model of `attention`: 2 layers, d_model 128, 4 heads, untrained (seed 0)."""
  return TransformerLM(TransformerConfig(d_model=128, num_layers=2, num_heads=4,
                                         attention=attention, attention_options=options or {}),
                       rngs=nnx.Rngs(0))


def generate_step_time(model: TransformerLM, prompt: jax.Array, repeats: int,
                       time_budget_s: float | None = None) -> tuple[float, int]:
  """(median seconds per decode step, pairs timed) of `generate` after `prompt` [B, P].

  Each pair is (time for 544 new tokens - time for 32) / 512, after one compiling call; pairs
  stop at `repeats`, or earlier (at least one) once they have taken `time_budget_s` in all.
  Pairs that come out non-positive (noise) are dropped; RuntimeError if every pair does.
  """
  def run(new_tokens: int, seed: int) -> float:
    start = time.perf_counter()
    generate(model, prompt, max_new_tokens=new_tokens, rng=jax.random.key(seed),
             budget=BUDGET).block_until_ready()
    return time.perf_counter() - start

  run(32, 0)                                                   # compile once (same budget)
  per_token, started = [], time.perf_counter()
  # A pair whose difference is not positive measured the prefill's noise, not the decode steps
  # (at a 32k context the prefill takes seconds and the 512 steps tens of milliseconds): it is
  # dropped and another pair is timed, up to 3 x `repeats` pairs in all.
  for r in range(3 * repeats):
    pair = (run(544, r) - run(32, r)) / 512
    if pair > 0:
      per_token.append(pair)
    if len(per_token) >= repeats or (
        per_token and time_budget_s is not None
        and time.perf_counter() - started > time_budget_s):
      break
  if not per_token:
    raise RuntimeError(f"generate_step_time: no pair of {3 * repeats} gave a positive step time "
                       f"(prompt {tuple(prompt.shape)}): the machine is too noisy to measure")
  per_token.sort()
  return per_token[len(per_token) // 2], len(per_token)


def decode_rate(attention: str, options: dict, prompt_length: int, repeats: int,
                batch: int = 1) -> dict[str, float]:
  """{"tokens_per_s": aggregate decode tokens/s, "step_s": median seconds per step} of one model
  (see the module docstring)."""
  model = demo_model(attention, options)
  prompt = jax.random.randint(jax.random.key(0), (batch, prompt_length), 0, 256)
  step, _ = generate_step_time(model, prompt, repeats)
  return {"tokens_per_s": batch / step, "step_s": step, "param_bytes": tree_bytes(nnx.state(model)),
          "cache_bytes_per_row": tree_bytes(model.init_cache(1, prompt_length + BUDGET)),
          **step_flops(model, batch, prompt_length + BUDGET)}


def step_flops(model: TransformerLM, batch: int, max_length: int) -> dict[str, int]:
  """{"step_flops", "step_matmul_flops"}: the FLOPs of one `decode_step` of `model` at `batch`
  rows with a cache for `max_length` tokens, counted exactly (`dca_jax.flops.count_flops`; the
  sampling of the next token is not included)."""
  from dca_jax.flops import count_flops
  graphdef, state = nnx.split(model)
  cache = model.init_cache(batch, max_length)

  def step(state, token, cache):
    return nnx.merge(graphdef, state).decode_step(token, cache)

  count = count_flops(step, state, jax.numpy.zeros((batch,), jax.numpy.int32), cache)
  return {"step_flops": int(count.flops), "step_matmul_flops": int(count.matmul_flops)}


def tree_bytes(tree) -> int:
  """Bytes of every array leaf of a pytree."""
  return int(sum(leaf.nbytes for leaf in jax.tree_util.tree_leaves(tree) if hasattr(leaf, "nbytes")))


def read_bandwidth(megabytes: int = 512, repeats: int = 5) -> float:
  """The machine's memory read rate, bytes/s: the median time of a jitted sum over a float32
  array far larger than the caches (the yardstick of a decode step that streams its weights and
  state)."""
  x = jax.numpy.ones((megabytes * 2**20 // 4,), jax.numpy.float32)
  total = jax.jit(jax.numpy.sum)
  total(x).block_until_ready()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    total(x).block_until_ready()
    times.append(time.perf_counter() - start)
  return x.nbytes / sorted(times)[len(times) // 2]


def bandwidth_bound(rate: dict[str, float], batch: int, bandwidth: float) -> float:
  """Aggregate tokens/s if a step only had to read the parameters once and each row's whole
  cache once at `bandwidth` bytes/s (an upper bound for a memory-bound step; compute ignored)."""
  step_bytes = rate["param_bytes"] + batch * rate["cache_bytes_per_row"]
  return batch * bandwidth / step_bytes


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--prompt", type=int, default=4096, help="prompt length in tokens")
  parser.add_argument("--repeats", type=int, default=5, help="timed pairs per layer")
  parser.add_argument("--batch", type=int, default=1, help="batch rows decoded together")
  args = parser.parse_args(argv)
  for attention, options in LAYERS:
    rate = decode_rate(attention, options, args.prompt, args.repeats, args.batch)
    print(f"{attention}: {rate['tokens_per_s']:,.0f} decode tokens/s (batch {args.batch}, "
          f"{1e3 * rate['step_s']:.3f} ms per step)", flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
