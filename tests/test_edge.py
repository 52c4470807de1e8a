"""The edge benchmark's bookkeeping (experiments/edge.py) on synthetic results: which cells a
run holds, the targets, the state bytes and the report. Nothing is exported or timed here (the
export is tested in tests/test_export.py; speed is never asserted)."""

from __future__ import annotations

import dataclasses

import pytest

from experiments import edge


def _config(**changes):
  return dataclasses.asdict(dataclasses.replace(edge.Config(), **changes))


def _record(attention, runtime, batch, context, tokens_per_s):
  return {"attention": attention, "runtime": runtime, "batch": batch, "context": context,
          "tokens_per_s": tokens_per_s, "step_s": batch / tokens_per_s}


def _result(dca_ort=(1000.0, 950.0, 900.0), dca_jax=(800.0, 800.0, 800.0),
            softmax_ort=(600.0, 150.0, 40.0)):
  contexts = (1024, 8192, 32768)
  speed = {}
  for values, attention, runtime in ((dca_ort, "dca", edge.ORT_FP32), (dca_jax, "dca", edge.JAX),
                                     (softmax_ort, "softmax", edge.ORT_FP32)):
    for c, v in zip(contexts, values):
      speed[edge.cell_key(attention, runtime, 1, c)] = _record(attention, runtime, 1, c, v)
  speed[edge.cell_key("dca", edge.ORT_INT8, 1, 1024)] = _record("dca", edge.ORT_INT8, 1, 1024,
                                                                1200.0)
  speed[edge.cell_key("softmax", edge.JAX, 8, 32768)] = {
      "attention": "softmax", "runtime": edge.JAX, "batch": 8, "context": 32768,
      "skipped": "not measured: too long"}
  return {"config": _config(), "speed": speed, "threads": 2, "command": "python -m experiments.edge",
          "date": "2026-12-02T10:00:00+00:00", "git_commit": "abc",
          "machine": {"cpu_model": "AMD EPYC", "usable_cores": 2, "memory_gib": 23.0,
                      "backend": "cpu", "jax": "0.0", "python": "3.x",
                      "load_average": [2.0, 2.0, 2.0]},
          "exports": {"dca_b1_L33792": {"attention": "dca", "batch": 1, "max_length": 33792,
                                        "fp32_bytes": 2_000_000, "int8_bytes": 700_000,
                                        "nodes": 1363, "export_s": 11.0}},
          "state_bytes_per_row": {"dca": {"1024": 300_000, "8192": 300_000, "32768": 300_000}},
          "energy": {str(c): {"dca": {"joules": 1e-6, "ratio_to_softmax": 0.5},
                              "softmax": {"joules": 2e-6, "ratio_to_softmax": 1.0}}
                     for c in contexts}}


def test_targets_pass_and_miss():
  rows = {r["target"][:40]: r for r in edge.targets(_result())}
  assert len(rows) == 3
  jax_row, flat, versus = (r for r in edge.targets(_result()))
  assert jax_row["value"] == pytest.approx(900 / 800) and jax_row["status"] == "PASS"
  assert "int8 1.50x" in jax_row["detail"]
  assert flat["value"] == pytest.approx(0.9) and flat["status"] == "PASS"
  assert versus["value"] == pytest.approx(950 / 150) and versus["status"] == "PASS"
  slow = edge.targets(_result(dca_ort=(700.0, 500.0, 300.0)))
  assert [r["status"] for r in slow] == ["MISS", "MISS", "MISS"]
  assert slow[1]["value"] == pytest.approx(300 / 700)


def test_targets_without_measurements_are_dashes():
  result = _result()
  result["speed"] = {}
  assert [r["status"] for r in edge.targets(result)] == ["-", "-", "-"]


def test_missing_cells_resume():
  config = edge.get_config(quick=True)
  assert config.contexts == (1024, 8192) and config.batches == (1,)
  everything = edge.cells(config)
  assert len(everything) == 2 * 2 * 3          # attentions x contexts x runtimes (no symbolic)
  done = {"speed": {edge.cell_key(*everything[0]): {}}}
  assert edge.missing(done, config) == everything[1:]
  full = edge.get_config(quick=False)
  assert (edge.DCA, edge.ORT_SYMBOLIC, 8, 32768) in edge.cells(full)
  assert (edge.SOFTMAX, edge.ORT_SYMBOLIC, 1, 1024) not in edge.cells(full)


def test_jax_skip_only_long_quadratic_cells():
  config = edge.get_config(quick=False)
  assert edge.jax_skip_reason(config, "softmax", 8, 32768)
  assert edge.jax_skip_reason(config, "softmax", 1, 32768) is None
  assert edge.jax_skip_reason(config, "dca", 8, 32768) is None


def test_state_bytes_and_steps():
  cache = [{"shape": ["B", 64, 4, 32], "dtype": "float32"}, {"shape": ["B"], "dtype": "int32"},
           {"shape": [], "dtype": "int32"}]
  assert edge.state_bytes_per_row(cache) == 64 * 4 * 32 * 4 + 4 + 4
  assert edge.steps_per_repeat(0.01, 0.1, 64) == 10
  assert edge.steps_per_repeat(1e-5, 0.1, 20) == 20


def test_render_names_command_machine_and_targets():
  result = _result()
  result["targets"] = edge.targets(result)
  text = edge.render(result)
  assert "`python -m experiments.edge`" in text and "AMD EPYC (2 cores" in text
  assert "2026-12-02" in text and "intra_op_num_threads = 2" in text
  assert "| dca | ONNX Runtime fp32 | 1 | 1,000 (1.00 ms) | 950 (1.05 ms) |" in text
  assert "n/m (softmax, JAX generate, batch 8): not measured: too long." in text
  assert "## Targets" in text and "**PASS**" in text
  assert "Quick validation run" not in text
  result["config"]["quick"] = True
  assert "Quick validation run" in edge.render(result)


def test_render_gives_implied_watts_contradictions_and_the_brain():
  """Watts = the estimate's joules per token x the measured batch-1 rate; a sentence where the
  measured speed contradicts the estimate (computed from the data), none where it agrees."""
  result = _result()
  for context in result["energy"].values():
    context["dca"]["joules"], context["softmax"]["joules"] = 1e-3, 2e-3
  assert edge.implied_watts(result, result["energy"], "dca", edge.ORT_FP32, 1024) == (
      pytest.approx(1e-3 * 1000.0))
  assert edge.implied_watts(result, result["energy"], "softmax", edge.JAX, 1024) is None
  text = edge.render(result)
  assert "| dca | ONNX Runtime fp32 | 1.00 | 0.95 | 0.90 |" in text
  assert "| softmax | ONNX Runtime fp32 | 1.20 | 0.30 | 0.08 |" in text
  assert "contradicts the estimate" not in text and "agrees in direction" in text
  assert "20 W" in text and "Raichle & Gusnard" in text and "1 W" in text
  assert "no power counter" in text and "SRAM" in text
  # DCA estimated at half softmax's energy but measured slower at 1k through ONNX Runtime.
  slow = _result(softmax_ort=(1500.0, 150.0, 40.0))
  text = edge.render(slow)
  assert ("ONNX Runtime fp32 at 1k, batch 1, the measured speed contradicts the estimate: dca "
          "is estimated at 0.500") in text
  assert "at 8k, batch 1, the measured" not in text



def test_render_shows_the_int8_check_on_trained_runs():
  result = _result()
  figures = {name: {"bpb": bpb, "rows": 128, "bytes": 32768, "seconds": 1.0,
                    "prefill_bytes": size, "decode_bytes": size // 2}
             for name, bpb, size in (("fp32", 1.6100, 4_000_000), ("int8", 1.6125, 1_000_000))}
  result["accuracy_trained"] = {"lm_dca_x3": {"workdir": "runs/corpus/lm_dca_x3", "steps": 3000,
                                              "seq_len": 256, "attention": "dca", **figures}}
  text = edge.render(result)
  assert "### The same check on longer-trained runs" in text
  assert "| lm_dca_x3 | dca | 3000 | 1.6100 | 1.6125 | +0.0025 |" in text
