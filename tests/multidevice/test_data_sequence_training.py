"""Data + sequence parallel training (issue #14): `experiments.train --mesh data=D,seq=S`.

Runs in the 8-host-device pytest process (tests/multidevice/conftest.py).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from experiments import configs as configs_lib
from experiments import model as model_lib
from experiments import tasks as tasks_lib
from experiments import train as train_lib
from experiments import checkpoints as checkpoints_lib


def _config(attention="lm_dca", **changes):
  return configs_lib.load_config(attention, tiny=True, overrides=changes)


@pytest.mark.parametrize("mesh_text, fsdp", [("data=2,seq=4", False), ("data=8,seq=1", True)])
def test_one_sharded_training_step_equals_the_single_device_step(mesh_text, fsdp):
  """One step on the mesh equals the single-device step; with `fsdp` every parameter and
  optimiser-state array that an axis of it allows is held as 1/8 per device, before and after."""
  config = _config(batch_size=8)
  mesh = model_lib.parse_mesh(mesh_text)
  batch = tasks_lib.make_task(config).train_batch(0)
  results = []
  for m in (None, mesh):
    _, tx, train_step, _ = model_lib.compiled_steps(config, m, fsdp and m is not None)
    _, params, rest = nnx.split(model_lib.build_model(config), nnx.Param, ...)
    opt_state = tx.init(params)
    if m is not None:
      params, opt_state, rest = model_lib.place_train_state(params, opt_state, rest, m, fsdp)
      before = [x.addressable_shards[0].data.size / x.size
                for x in jax.tree_util.tree_leaves((params, opt_state))]
    params, opt_state, loss, norm = train_step(params, rest, opt_state, batch)
    results.append((params, float(loss), float(norm)))
  (p_ref, loss_ref, norm_ref), (p, loss, norm) = results
  after = [x.addressable_shards[0].data.size / x.size
           for x in jax.tree_util.tree_leaves((p, opt_state))]
  assert after == before
  big = [x.size >= 64 for x in jax.tree_util.tree_leaves((p, opt_state))]
  assert all(f == 0.125 for f, b in zip(after, big) if b) if fsdp else set(after) == {1.0}
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)
  np.testing.assert_allclose(norm, norm_ref, rtol=1e-4)
  for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(p_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow      # ~60 s; CI checks the sharded step above, the full job this resume
def test_a_run_resumes_onto_another_mesh(tmp_path):
  """1 step on data=2,seq=4 (FSDP), then 1 more resumed on data=4,seq=2 (replicated) == 2 steps
  on one device."""
  config = _config(batch_size=8, eval_batch_size=8, steps=2, eval_every=0, checkpoint_every=1)
  first = train_lib.train(config, tmp_path / "sharded", max_steps=1, progress=False,
                          mesh=model_lib.parse_mesh("data=2,seq=4"), fsdp=True)
  assert first["step"] == 1
  done = train_lib.train(None, tmp_path / "sharded", resume=True, progress=False,
                         mesh=model_lib.parse_mesh("data=4,seq=2"))
  single = train_lib.train(config, tmp_path / "single", progress=False, mesh=None)
  assert done["step"] == single["step"] == config.steps
  np.testing.assert_allclose(done["loss"], single["loss"], rtol=1e-4)
  run = checkpoints_lib.read_run(tmp_path / "sharded")
  assert run["mesh"] == {"data": 2, "seq": 4}
  assert run["resumes"][-1]["mesh"] == {"data": 4, "seq": 2}


def test_mesh_errors_name_the_problem():
  with pytest.raises(ValueError, match="needs 16 devices, 8 are available"):
    model_lib.parse_mesh("data=4,seq=4")
  with pytest.raises(ValueError, match="expected data=D,seq=S"):
    model_lib.parse_mesh("data=2,pipe=4")
  with pytest.raises(ValueError, match="not divisible by the mesh's data=8"):
    model_lib.check_batch_fits(model_lib.parse_mesh("data=8,seq=1"), 4, 32)
  with pytest.raises(ValueError, match="seq_len=30 is not divisible by the mesh's seq=4"):
    model_lib.check_batch_fits(model_lib.parse_mesh("data=2,seq=4"), 8, 30)
