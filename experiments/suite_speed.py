"""Speed and energy of the suite's five LM models, measured side by side in one process.

`measure_speed` times, with the one benchmark runner (`experiments.benchmark`: round-robin after
warm-up, median of the repeats), the training step and the decoding step of the five LM models of
the comparison (`suite_plan`'s "lm" runs), reads their cache and parameter bytes, counts their
FLOPs with `dca_jax.flops.count_flops` (exact, loops included) and applies the energy model of
`experiments.energy`. It writes speed.json, which `suite_report.render` turns into the speed and
energy tables.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.flops import count_flops
from dca_jax.nn import count_params
from experiments import benchmark, bookkeeping, energy, suite_plan
from experiments import model as model_lib
from experiments import tasks as tasks_lib
from experiments.configs import ExperimentConfig


def lm_config(attention: str, tiny: bool) -> ExperimentConfig:
  """The config of the LM comparison's run of `attention` (its CI-sized version if `tiny`)."""
  run = next(r for r in suite_plan.suite_runs("lm")
             if r.override_dict()["attention"] == attention)
  return suite_plan.run_config(run, tiny=tiny)


class TrainSteps:
  """Optimiser steps of one model on one batch, each from the state the previous one returned
  (the train step donates its parameters and optimiser state)."""

  def __init__(self, train_step, params, rest, opt_state, batch):
    self.train_step, self.params, self.rest = train_step, params, rest
    self.opt_state, self.batch = opt_state, batch

  def __call__(self) -> jax.Array:
    self.params, self.opt_state, loss, _ = self.train_step(self.params, self.rest,
                                                           self.opt_state, self.batch)
    return loss


def measure_speed(out: pathlib.Path, *, repeats: int = 7, tiny: bool = False,
                  decode_lengths: Sequence[int] = (1024, 16384),
                  flop_lengths: Sequence[int] = (256, 1024, 4096, 16384)) -> dict[str, Any]:
  """Training and decoding tokens/s and FLOP-based energy of the five LM models; writes `out`.

  Args:
    out: the JSON file to write (speed.json).
    repeats: timed calls per model and step, at least.
    tiny: the CI-sized models, one short context, two repeats, 0.1 s of timing per case.
    decode_lengths: cache lengths of the decoding rows.
    flop_lengths: sequence lengths of the forward FLOP counts.

  Returns:
    The result written: "models" (attention -> figures), "energy" (`energy.energy_table`), the
    lengths, the repeats, the machine and the date.
  """
  # Timing of each case runs for at least min_total_s (a CI-sized run only checks the path).
  min_total_s = 2.0
  if tiny:
    decode_lengths, flop_lengths, repeats, min_total_s = (64,), (64,), 2, 0.1
  configs = {a: lm_config(a, tiny) for a in suite_plan.ATTENTIONS}
  cases, info = [], {}
  for attention, config in configs.items():
    _, tx, train_step, _ = model_lib.compiled_steps(config)
    model = model_lib.build_model(config)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    # The train step donates its parameters: it gets a copy, so the decode cases keep theirs.
    params = jax.tree.map(jnp.copy, params)
    batch = tasks_lib.make_task(config).train_batch(0)
    cases.append(benchmark.Case(attention, "train", {}, thunk=TrainSteps(
        train_step, params, rest, tx.init(params), batch)))
    info[attention] = {"num_params": count_params(model), "config": config.to_dict(),
                       "train_tokens_per_step": config.batch_size * config.seq_len}

    # A pure function of the split state under jax.jit (nnx.jit's per-call graph bookkeeping
    # would dominate a step that takes well under a millisecond).
    graphdef, state = nnx.split(model)

    def decode(state, token, cache, graphdef=graphdef):
      return nnx.merge(graphdef, state).decode_step(token, cache)
    for length in decode_lengths:
      cache = model.init_cache(1, length)
      info[attention][f"cache_bytes/{length}"] = benchmark.tree_bytes(cache)
      cases.append(benchmark.Case(attention, f"decode/{length}", {}, fn=decode,
                                  args=(state, jnp.zeros((1,), jnp.int32), cache)))

    # Exact FLOPs of the forward per token at several lengths, and of one decode step.
    def forward(state, tokens, graphdef=graphdef):
      return nnx.merge(graphdef, state)(tokens)
    flops = {}
    for length in flop_lengths:
      tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
      flops[str(length)] = count_flops(forward, state, tokens).flops / length
    info[attention]["forward_flops_per_token"] = flops
    # One decode step's FLOPs with a cache sized for each context (softmax's step scores every
    # cached key, so its cost depends on the cache length).
    for length in decode_lengths:
      info[attention][f"decode_flops_per_token/{length}"] = count_flops(
          decode, state, jax.ShapeDtypeStruct((1,), jnp.int32), model.init_cache(1, length)).flops
    info[attention]["param_bytes"] = benchmark.tree_bytes(nnx.state(model, nnx.Param))

  benchmark.Runner(log_width=None).measure(cases, repeats=repeats, min_total_s=min_total_s,
                                           max_repeats=40)
  for case in cases:
    m, median_s = info[case.name], case.record["median_s"]
    if case.pass_name == "train":
      m["train_step_s"] = median_s
      m["train_tokens_per_s"] = m["train_tokens_per_step"] / median_s
    else:
      length = case.pass_name.split("/")[1]
      m[f"decode_step_s/{length}"] = median_s
      m[f"decode_tokens_per_s/{length}"] = 1.0 / median_s
  result = {"models": info, "decode_lengths": list(decode_lengths),
            "flop_lengths": list(flop_lengths), "repeats": repeats,
            "machine": bookkeeping.machine_info(), "date": bookkeeping.now(), "tiny": tiny,
            "energy": energy.energy_table(info, decode_lengths, flop_lengths)}
  out.parent.mkdir(parents=True, exist_ok=True)
  bookkeeping.write_json(out, result)
  print(json.dumps({a: {k: v for k, v in m.items() if "tokens_per_s" in k}
                    for a, m in info.items()}, indent=1, default=bookkeeping.json_default))
  return result
