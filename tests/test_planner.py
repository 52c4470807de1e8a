"""Tests for `dca_jax/ops/planner.py`: `adaptive_scale` (DCA's plan) and `plan_engine` (the
engine's form), with `Mode`."""

from __future__ import annotations

import json

import pytest

from dca_jax import EnginePlan, Mode, PlanKind, adaptive_scale, plan_engine


# ---------------------------------------------------------------------------------------------
# adaptive_scale: DCA's plan for one call.


def test_adaptive_scale_plans():
  assert adaptive_scale(1, window=8).kind is PlanKind.SOFTMAX
  assert adaptive_scale(8, window=8).kind is PlanKind.SOFTMAX
  assert adaptive_scale(8, window=8).engine is None
  # Otherwise the compressed plan, whose engine form is the planner's for the memory's sizes
  # (F features, V + 1 value columns: the normaliser rides along as a value).
  for length, window, has_state in ((9, 8, False), (4, 8, True), (1, 8, True), (5000, 64, False)):
    for backend in ("cpu", "gpu"):
      for needs_grad in (False, True):
        plan = adaptive_scale(length, window=window, feature_dim=15, value_dim=6,
                              has_state=has_state, backend=backend, needs_grad=needs_grad)
        assert plan.kind is PlanKind.COMPRESSED
        assert plan.engine == plan_engine(length, 15, 7, backend=backend, needs_grad=needs_grad)
        assert plan.engine.mode is not Mode.AUTO
  for plan in (adaptive_scale(1, window=8, decoding=True),
               adaptive_scale(1, window=8, has_state=True, decoding=True)):
    assert plan.kind is PlanKind.STEP and plan.engine is None


@pytest.mark.parametrize("kwargs,name", [
    (dict(sequence_length=0, window=4), "sequence_length"),
    (dict(sequence_length=2.5, window=4), "sequence_length"),
    (dict(sequence_length=True, window=4), "sequence_length"),
    (dict(sequence_length=4, window=0), "window"),
    (dict(sequence_length=4, window=-3), "window"),
    (dict(sequence_length=4, window=None), "window"),
])
def test_adaptive_scale_rejects_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    adaptive_scale(kwargs.pop("sequence_length"), **kwargs)


# ---------------------------------------------------------------------------------------------
# plan_engine: the engine form for one call, and Mode.


@pytest.mark.parametrize("backend", [None, "cpu", "gpu", "tpu"])
@pytest.mark.parametrize("decoding", [False, True])
@pytest.mark.parametrize("needs_grad", [False, True])
def test_plan_engine_returns_a_concrete_mode(backend, decoding, needs_grad):
  for length in (1, 2, 15, 16, 17, 64, 1000, 2**16):
    plan = plan_engine(length, 16, 32, backend=backend, needs_grad=needs_grad, decoding=decoding)
    assert isinstance(plan.mode, Mode) and plan.mode is not Mode.AUTO
    if plan.mode is Mode.CHUNKED:
      assert isinstance(plan.chunk_size, int) and plan.chunk_size >= 1


def test_plan_engine_decodes_single_steps_recurrently():
  for backend in ("cpu", "gpu", "tpu"):
    assert plan_engine(1, 64, 64, backend=backend, decoding=True).mode is Mode.RECURRENT


@pytest.mark.parametrize("length", [0, -1])
def test_plan_engine_rejects_empty_sequences(length):
  with pytest.raises(ValueError, match="sequence_length"):
    plan_engine(length, 16, 16)


def test_mode_parse():
  assert Mode.parse("chunked") is Mode.CHUNKED
  assert Mode.parse(Mode.QUADRATIC) is Mode.QUADRATIC
  with pytest.raises(ValueError, match="mode"):
    Mode.parse("linear")


def test_plan_engine_follows_the_measured_cpu_rule():
  # planner.py: on CPU the token scan is the fastest forward (or tied) at every T; with gradients
  # the quadratic form up to T = 96, then chunks of 64 (docs/planner_check.json); per-channel
  # decay with gradients: the scan up to T = 128 (never the quadratic form), chunks above;
  # forward: the scan.
  assert plan_engine(8192, 64, 64, backend="cpu").mode is Mode.RECURRENT
  assert plan_engine(96, 64, 64, backend="cpu", needs_grad=True).mode is Mode.QUADRATIC
  assert plan_engine(97, 64, 64, backend="cpu", needs_grad=True) == EnginePlan(Mode.CHUNKED, 64)
  assert plan_engine(128, 64, 64, backend="cpu", needs_grad=True,
                     per_channel_decay=True).mode is Mode.RECURRENT
  assert plan_engine(129, 64, 64, backend="cpu", needs_grad=True,
                     per_channel_decay=True) == EnginePlan(Mode.CHUNKED, 64)
  assert plan_engine(4096, 64, 64, backend="cpu", needs_grad=True) == EnginePlan(Mode.CHUNKED, 64)
  assert plan_engine(4096, 64, 64, backend="cpu", needs_grad=True,
                     per_channel_decay=True) == EnginePlan(Mode.CHUNKED, 64)
  # From T = 8192 the chunked form runs in checkpointed segments of 1024 tokens (planner.py has
  # the measurements); not on GPU.
  assert plan_engine(8192, 64, 64, backend="cpu", needs_grad=True) == EnginePlan(Mode.CHUNKED, 64,
                                                                                 1024)
  assert plan_engine(8192, 64, 64, backend="gpu", needs_grad=True).segment_size is None
  assert plan_engine(100, 64, 64, backend="cpu", needs_grad=True,
                     per_channel_decay=True).mode is Mode.RECURRENT
  assert plan_engine(8192, 64, 64, backend="cpu", per_channel_decay=True).mode is Mode.RECURRENT
  assert plan_engine(8192, 64, 64, backend="gpu").mode is Mode.CHUNKED


def test_plan_engine_rejects_unknown_backends():
  with pytest.raises(ValueError, match="backend"):
    plan_engine(64, 16, 16, backend="other")


# ---------------------------------------------------------------------------------------------
# One plan per call: attention_compress asks adaptive_scale once and the engine does not plan again.


# CI runs the additive memory's "auto" case with a gradient (its plan for both the evaluated
# and the differentiated form: the path that used to plan twice) and the delta memory's "auto"
# case without one (~20 s less than with); the other six run in the slow job
# (`pytest -m slow tests/test_planner.py`).
_PLAN_CASES = [pytest.param(memory, mode, grad, id=f"{grad}-{memory}-{mode}",
                            marks=() if (mode == "auto" and grad == (memory == "additive"))
                            else pytest.mark.slow)
               for grad in (False, True) for memory in ("additive", "delta")
               for mode in ("auto", "chunked")]


@pytest.mark.parametrize("memory,mode,needs_grad", _PLAN_CASES)
def test_attention_compress_plans_once_and_uses_the_plan(monkeypatch, memory, mode, needs_grad):
  import jax
  import jax.numpy as jnp
  import numpy as np

  import dca_jax
  from dca_jax.ops import dca as dca_module
  from dca_jax.ops import dca_delta, delta_rule, gla, planner

  window, length = 4, 11            # T > W: the compressed plan, whose engine is planned
  params = dca_jax.init_params(jax.random.key(0), d_model=16, num_heads=2, window=window,
                               feature_dim=4, memory=memory)
  x = jax.random.normal(jax.random.key(1), (2, length, 16))
  weights = dca_jax.compute_weights(params, x)

  def run():
    # A new jitted function per call, so each run traces (and plans) afresh: compiled, the
    # delta rule's chunked gradient takes seconds where eager dispatch took ~60 s of CI.
    if not needs_grad:
      return jax.jit(lambda w: dca_jax.attention_compress(w, window=window, mode=mode,
                                                          chunk_size=4))(weights)
    loss = lambda w: jnp.sum(dca_jax.attention_compress(w, window=window, mode=mode,
                                                        chunk_size=4) ** 2)
    return jax.jit(jax.grad(loss))(weights).v

  expected = run()                  # before any spy: the outputs must not change
  calls = {"adaptive_scale": [], "planners": 0, "plan_engine": 0, "engine": []}

  def counted(fn, key):
    def wrapper(*args, **kwargs):
      calls[key] += 1
      return fn(*args, **kwargs)
    return wrapper

  # Every planner the engine could ask, under every name it is reachable by.
  for module in (planner, gla, delta_rule, dca_module, dca_delta):
    for name in ("engine_plans", "delta_rule_plans"):
      if hasattr(module, name):
        monkeypatch.setattr(module, name, counted(getattr(module, name), "planners"))
  monkeypatch.setattr(planner, "plan_engine", counted(planner.plan_engine, "plan_engine"))

  def spy_scale(*args, **kwargs):
    plan = planner.adaptive_scale(*args, **kwargs)
    calls["adaptive_scale"].append(plan)
    return plan

  def spy_engine(run_fn):
    def wrapper(plans, *args, **kwargs):
      calls["engine"].append(plans)
      return run_fn(plans, *args, **kwargs)
    return wrapper

  for module in (dca_module, dca_delta):
    monkeypatch.setattr(module, "adaptive_scale", spy_scale)
  monkeypatch.setattr(dca_module, "run_engine", spy_engine(gla.run_engine))
  monkeypatch.setattr(dca_delta, "run_delta_rule", spy_engine(delta_rule.run_delta_rule))

  # The public functions compile their checked core once per shape: drop the compiled first run
  # so that the spied run traces (and so reaches the planners and the engine) again.
  jax.clear_caches()
  got = run()
  assert len(calls["adaptive_scale"]) == 1
  (plan,) = calls["adaptive_scale"]
  assert plan.kind is PlanKind.COMPRESSED
  assert calls["planners"] == 1     # engine_plans (additive) or delta_rule_plans (delta), once
  # ... and inside it, for the additive "auto" mode, one rule per case (evaluated, differentiated).
  assert calls["plan_engine"] == (2 if (memory, mode) == ("additive", "auto") else 0)
  assert calls["engine"] == [(plan.engine, plan.engine_grad)]
  if mode == "chunked":
    assert plan.engine == plan.engine_grad == EnginePlan(Mode.CHUNKED, 4)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))


def test_adaptive_scale_plans_the_delta_memory_with_its_own_rule():
  from dca_jax.ops.planner import delta_rule_plans
  for length, backend in ((1000, "cpu"), (1000, "gpu"), (40, "gpu")):
    for needs_grad in (False, True):
      plan = adaptive_scale(length, window=8, delta_memory=True, backend=backend,
                            needs_grad=needs_grad)
      forward, grad = delta_rule_plans(length, backend=backend)
      assert (plan.engine, plan.engine_grad) == (grad if needs_grad else forward, grad)
  assert adaptive_scale(8, window=8, delta_memory=True).kind is PlanKind.SOFTMAX


def test_segment_study_prints_one_row_per_layer_and_length(capsys, tmp_path):
  """`python -m experiments.segment_study` (the measurement behind `segment_length`) at toy size,
  and its `--out` record."""
  from experiments import segment_study  # pylint: disable=g-import-not-at-top
  out = tmp_path / "segments.json"
  assert segment_study.main(["--layers", "linear", "--lengths", "64", "--segments", "none,32",
                             "--repeats", "1", "--out", str(out)]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert lines[1] == "| layer | T | one pass | S=32 |"
  assert lines[2].startswith("| linear | 64 | ") and lines[2].count(" ms") == 2
  row, = json.loads(out.read_text())["rows"]
  assert row["layer"] == "linear" and row["T"] == 64
  assert row["one pass"]["fwd_bwd_s"] > 0 and row["S=32"]["fwd_bwd_s"] > 0


def test_engine_segment_rejects_bad_arguments_naming_them():
  from dca_jax.ops import engine_segment  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match="sequence_length"):
    engine_segment(0, backend="cpu")
  with pytest.raises(ValueError, match="backend"):
    engine_segment(8192, backend="other")
  assert engine_segment(8192, backend="tpu") is None
