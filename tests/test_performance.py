"""The performance benchmark's bookkeeping (experiments/performance.py) and its torch peer.

Speed is never asserted here: these tests check that the targets are computed from the right
records, that the external peer computes the function it stands in for, and that the performance
studies' prototypes and checks compute what they claim to time.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from experiments import performance, torch_peer


def _layer(layer, pass_name, length, seconds):
  return {"section": "grid", "layer": layer, "pass": pass_name, "T": length, "status": "ok",
          "median_s": seconds}


def _result():
  peer = torch_peer.NAME
  records = []
  for length, dca, torch, gla in ((1024, 0.05, 0.04, 0.04), (8192, 0.4, 2.0, 0.5)):
    records += [_layer(performance.DCA, "fwd+bwd", length, dca),
                _layer(peer, "fwd+bwd", length, torch),
                _layer(performance.GLA, "fwd+bwd", length, gla)]
  return {
      "config": {"layer_lengths": [1024, 8192], "engine_lengths": [], "engine_long_lengths": []},
      "layers": {"records": records},
      "training": [{"experiment": "lm_dca", "T": 256, "tokens_per_s": 900.0},
                   {"experiment": "lm_softmax", "T": 256, "tokens_per_s": 1000.0}],
      "decoding": [{"attention": "dca", "batch": 1, "tokens_per_s": 12_000.0}],
  }


def test_targets_read_the_side_by_side_records():
  rows = {row["target"]: row for row in performance.targets(_result())}
  at_1k = rows["DCA layer fwd+bwd vs torch flash softmax at T=1024"]
  assert at_1k["value"] == pytest.approx(0.8) and at_1k["status"] == "MISS"
  at_8k = rows["DCA layer fwd+bwd vs torch flash softmax at T=8192"]
  assert at_8k["value"] == pytest.approx(5.0) and at_8k["status"] == "PASS"
  assert rows["DCA layer fwd+bwd vs torch flash softmax at T=32768"]["status"] == "-"
  gla = rows["DCA layer within 1.5x of the GatedLinearAttention layer (fwd+bwd, worst T)"]
  assert gla["value"] == pytest.approx(1.25) and gla["status"] == "PASS"
  train = rows["LM training tokens/s, lm_dca / lm_softmax at T=256"]
  assert train["value"] == pytest.approx(0.9) and train["status"] == "PASS"
  assert rows["DCA demo model decodes at batch 1 (aggregate tokens/s)"]["status"] == "PASS"
  assert rows["DCA demo model decodes at batch 32 (aggregate tokens/s)"]["status"] == "-"


def test_torch_peer_is_causal_softmax_attention():
  """The peer (in its child process) computes causal softmax attention with its own projections,
  against a float64 reference; torch is never imported in this process."""
  reason = torch_peer.available()
  if reason is not None:
    pytest.skip(reason)
  d_model, heads, length = 16, 2, 7
  x = np.random.default_rng(0).normal(size=(1, length, d_model)).astype(np.float32)
  with torch_peer.PeerProcess(d_model, heads, threads=1) as peer:
    calls = peer.calls(x)
    got = np.asarray(calls["fwd"]())                              # the last token's output
    loss_and_grad = calls["fwd+bwd"]()
    w = {name: value.astype(np.float64) for name, value in peer.weights().items()}
  qkv = x[0].astype(np.float64) @ w["qkv.weight"].T + w["qkv.bias"]
  q, k, v = (qkv[:, i * d_model:(i + 1) * d_model].reshape(length, heads, -1) for i in range(3))
  scores = np.einsum("thk,shk->hts", q, k) / np.sqrt(d_model // heads)
  scores = np.where(np.tril(np.ones((length, length), bool)), scores, -np.inf)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  o = np.einsum("hts,shv->thv", probs, v).reshape(length, d_model)
  expected = o @ w["out.weight"].T + w["out.bias"]
  np.testing.assert_allclose(got[0], expected[-1], rtol=1e-4, atol=1e-5)
  assert np.all(np.isfinite(loss_and_grad))
  assert "torch" not in sys.modules


def test_layer_records_count_flops_of_the_layer_state():
  """The layers section counts each JAX layer's FLOPs although its arguments are a pytree (the
  layer's nnx.State): every record of 2026-12-04's run had a flops_error instead."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from experiments import benchmark, benchmark_layers  # pylint: disable=import-outside-toplevel
  config = benchmark_layers.get_config(lengths=(32,), repeats=1, big_repeats=1, time_budget_s=5.0)
  (layer,) = [spec for spec in benchmark_layers.layers(config) if spec.name == "DCAttention"]
  splits = {layer.name: (layer, *nnx.split(layer.make(config)))}
  runner = benchmark.Runner(memory_budget_gib=1.0, time_budget_s=5.0, compile_exhausted=False)
  records = benchmark_layers.measure_grid(runner, config, splits, 32, count=True)
  assert {r["pass"] for r in records} == {"fwd", "fwd+bwd"}
  for record in records:
    assert "flops_error" not in record, record.get("flops_error")
    assert record["flops"] > record["matmul_flops"] > 0
  forward, both = sorted(records, key=lambda r: r["flops"])
  assert both["flops"] > 2 * forward["flops"]


def test_gpu_report_is_regenerated_from_its_json(tmp_path):
  """docs/gpu.md is what `experiments.gpu_check --render` writes from docs/gpu_check.json."""
  import json
  import pathlib
  from experiments import gpu_check
  docs = pathlib.Path(__file__).resolve().parent.parent / "docs"
  result = json.loads((docs / "gpu_check.json").read_text())
  gpu_check.write_markdown(tmp_path / "gpu.md", result)
  assert (tmp_path / "gpu.md").read_text() == (docs / "gpu.md").read_text()


def test_gpu_check_counts_a_pytest_log():
  from experiments import gpu_check
  log = ("[gw0] [ 10%] PASSED tests/test_gla.py::test_a[1]\n"
         "[gw1] [ 20%] FAILED tests/test_gla.py::test_b\n"
         "PASSED tests/test_window.py::test_c\n")
  counts = gpu_check.parse_pytest_log(log)
  assert counts["files"] == {"tests/test_gla.py": {"passed": 1, "failed": 1},
                             "tests/test_window.py": {"passed": 1}}
  assert counts["totals"] == {"passed": 2, "failed": 1}
  assert not counts["finished"]
  assert gpu_check.parse_pytest_log(log + "==== 2 passed, 1 failed in 3.20s ====\n")["finished"]


@pytest.mark.parametrize("layer", ["window", "gla", "dca", "softmax", "gated_deltanet", "linear"])
def test_confine_check_compares_two_different_programs(layer, tmp_path):
  """The check forces the op's confinement back on: the second program has the guard's extra
  instructions (a wrapper that did not reach the traced op would time one program twice); its
  record (`--out`) holds what it printed."""
  from experiments import confine_check
  out = tmp_path / "confine.json"
  result = confine_check.main(["--layers", layer, "--lengths", "64", "--repeats", "1",
                               "--out", str(out)])
  row, = result["rows"]
  unconfined, confined = row["instructions"].values()
  assert confined > unconfined
  assert all(ms > 0 for ms in row["ms"].values())
  assert json.loads(out.read_text())["rows"] == json.loads(json.dumps(result["rows"]))
  assert result["command"].endswith(f"--layers {layer} --lengths 64 --repeats 1 --out {out}")


def test_rowwise_study_records_every_form(tmp_path):
  """`python -m experiments.rowwise_study --out` (the figures README quotes) at toy size."""
  from experiments import rowwise_study
  out = tmp_path / "rowwise.json"
  rows = rowwise_study.main(["--shape", "2", "8", "--repeats", "1", "--out", str(out)])
  record = json.loads(out.read_text())
  assert record["shape"] == [2, 8] and len(record["us"]) == len(rows) == 6
  assert all(us > 0 for us in record["us"].values())


@pytest.mark.parametrize("batch, time, window", [(2, 70, 16), (1, 64, 16)])
def test_fused_pass_study_times_the_same_function(batch, time, window):
  """The one-block-pass prototype that `experiments.fused_pass_study` times against
  `attention_compress` computes the same outputs and weight gradients (T not a multiple of W and
  a multiple, several blocks)."""
  from experiments import fused_pass_study
  weights, cotangent = fused_pass_study.problem(batch, time, d_model=64, heads=2, window=window)
  differences = fused_pass_study.max_differences(weights, cotangent, window)
  assert set(differences) >= {"output", "grad q", "grad k", "grad v", "grad q_features",
                              "grad k_features", "grad log_decay"}
  assert max(differences.values()) < 2e-5, differences


def test_a_partial_rerun_keeps_the_matmul_rates_of_the_runs_its_sections_come_from(
    tmp_path, monkeypatch):
  """The report's dense-matmul probes are those of the runs that measured its sections: after a
  full run and a rerun of one section, the first run's two probes and the rerun's two, never
  the probes of a run whose sections are all gone (they once survived in the partial file)."""
  rates = iter([100.0, 101.0, 200.0, 201.0, 300.0, 301.0, 400.0, 401.0])

  class FakeSession:
    def __init__(self, matmul_n):
      self.machine, self.probes = {"cpu_model": "cpu"}, [{"gflops": next(rates)}]

    def finish(self):
      self.probes.append({"gflops": next(rates)})

  monkeypatch.setattr(performance.benchmark, "Session", FakeSession)
  for name in performance.SECTIONS:
    monkeypatch.setattr(performance, f"measure_{name}", lambda config, name=name: [name])
  monkeypatch.setattr(performance, "targets", lambda result: [])
  dates = iter(f"2026-12-05T{i:02d}:00:00+00:00" for i in range(24))
  monkeypatch.setattr(performance.bookkeeping, "now", lambda: next(dates))
  config, partial, final = performance.get_config(True), tmp_path / "p.json", tmp_path / "f.json"

  def run(**kw):
    result = performance.run(config, "cmd", partial=partial, previous=final, **kw)
    final.write_text(json.dumps(result))
    return [p["gflops"] for p in result["matmul"]["probes"]]

  assert run() == [100.0, 101.0]
  assert run(remeasure=performance.SECTIONS) == [200.0, 201.0]     # the first run's sections gone
  assert run(sections=("decoding",), remeasure=("decoding",)) == [200.0, 201.0, 300.0, 301.0]
  # A run that measures nothing (its section already in the partial file) adds no probe.
  assert run(sections=("decoding",)) == [200.0, 201.0, 300.0, 301.0]


def test_a_resumed_run_keeps_the_interrupted_run_s_matmul_rate(tmp_path, monkeypatch):
  """Interrupted after one section, then resumed: the report holds the interrupted run's start
  probe beside the section it measured, and the resumed run's two beside the others."""
  rates = iter([100.0, 200.0, 201.0])

  class FakeSession:
    def __init__(self, matmul_n):
      self.machine, self.probes = {"cpu_model": "cpu"}, [{"gflops": next(rates)}]

    def finish(self):
      self.probes.append({"gflops": next(rates)})

  calls = {"n": 0}

  def engine(config):
    calls["n"] += 1
    if calls["n"] == 1:
      raise KeyboardInterrupt
    return ["engine"]

  monkeypatch.setattr(performance.benchmark, "Session", FakeSession)
  for name in performance.SECTIONS:
    monkeypatch.setattr(performance, f"measure_{name}", lambda config, name=name: [name])
  monkeypatch.setattr(performance, "measure_engine", engine)
  monkeypatch.setattr(performance, "targets", lambda result: [])
  dates = iter(f"2026-12-05T{i:02d}:00:00+00:00" for i in range(24))
  monkeypatch.setattr(performance.bookkeeping, "now", lambda: next(dates))
  config, partial = performance.get_config(True), tmp_path / "p.json"
  with pytest.raises(KeyboardInterrupt):
    performance.run(config, "cmd", partial=partial)
  result = performance.run(config, "cmd", partial=partial)
  assert [p["gflops"] for p in result["matmul"]["probes"]] == [100.0, 200.0, 201.0]
