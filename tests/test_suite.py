"""The experiment suite, the speed/energy report and the demo, at CI size through the real code.

`python -m experiments.suite run --tiny` trains the same configs as the full suite with a tiny
model and a few steps; here one run of every group goes through training, evaluation, result.json
and the report, and the demo runs end to end with two training steps per model.
"""

from __future__ import annotations

import json
import pathlib
import shutil

import pytest

import numpy as np

import oracles
import train_checks
from experiments import demo
from experiments import mqar
from experiments import recall_study
from experiments import suite
from experiments import suite_plan
from experiments import suite_report
from experiments import suite_speed

# One run of each kind the report renders (LM, MQAR grid, ablation, budget study): an LM ablation
# would add a second LM training and its four-length evaluation (~40 s of CI) for no new path.
# The recall study's run adds Gated DeltaNet and the scoring by distance (issue #12).
# CI leaves out the ablation run (~25 s; its table is rendered by the same code as the others);
# the full job (DCA_TESTS=full) runs all five.
TINY_RUNS = tuple(name for name in (
    "lm_dca", "mqar_64_4_d64_softmax", "ablation_mqar_decay_channel", "mqar_long_64_4_d64_dca",
    "recall_128_8_d128_gated_deltanet") if oracles.FULL or not name.startswith("ablation"))


@pytest.fixture(scope="module")
def tiny_suite(tmp_path_factory):
  root = tmp_path_factory.mktemp("suite")
  runs = [suite_plan.find_run(name) for name in TINY_RUNS]
  failed = suite.run_suite(runs, root, tiny=True, in_process=True)
  assert not failed
  return root


def test_tiny_suite_runs_resumes_and_renders(tiny_suite, tmp_path, capsys):
  """The tiny runs are one test: under pytest-xdist each worker that runs a test of this fixture
  builds it (~85 s of CI, 2026-12-04), so its checks stay together on one worker."""
  _check_tiny_runs_write_results(tiny_suite)
  _check_rerun_skips_finished_runs(tiny_suite, capsys)
  _check_render_writes_tables_and_plots(tiny_suite, tmp_path / "render")
  _check_render_shows_an_unfinished_run_as_such(tiny_suite, tmp_path / "unfinished")
  _check_recall_study_renders_distance_buckets(tiny_suite, tmp_path / "recall")
  _check_lm_dca_run_trains_resumes_and_evaluates(tiny_suite, tmp_path / "train")


def test_suite_lists_every_configuration():
  runs = suite_plan.suite_runs("all")
  names = [r.name for r in runs]
  assert len(names) == len(set(names))
  mqar = [r for r in runs if r.group == "mqar"]
  assert len(mqar) == 2 * 4 * 5              # d_model x (T, pairs) x attention
  assert ({r.override_dict()["attention"] for r in runs if r.group == "lm"}
          == set(suite_plan.ATTENTIONS))
  assert len([r for r in runs if r.group == "ablation_mqar"]) == len(suite_plan.ABLATIONS) - 1
  assert len([r for r in runs if r.group == "ablation_lm"]) == len(suite_plan.ABLATIONS)
  long_runs = [r for r in runs if r.group == "mqar_long"]
  assert len(long_runs) == len(suite_plan.MQAR_LONG_ORDER)
  assert all(r.override_dict()["stop_accuracy"] == 0.99 for r in long_runs)
  with pytest.raises(ValueError, match="suite"):
    suite_plan.suite_runs("everything")
  with pytest.raises(ValueError, match="unknown run"):
    suite_plan.find_run("nope")


def test_delta_suite_is_opt_in_and_its_configs_are_valid():
  """Suite "delta" (Gated DeltaNet, DCA with memory="delta") is outside "all" and the default
  grids, and every one of its runs makes a valid config."""
  delta = suite_plan.suite_runs("delta")
  assert not {r.name for r in delta} & {r.name for r in suite_plan.suite_runs("all")}
  assert {r.group for r in delta} == {"delta_lm", "delta_mqar"}
  variants = {(r.override_dict()["attention"], r.override_dict()["attention_options"].get("memory"))
              for r in delta}
  assert variants == {("gated_deltanet", None), ("dca", "delta")}
  for run in delta:
    config = suite_plan.run_config(run, tiny=True)
    assert config.attention == run.override_dict()["attention"]
  assert suite_plan.find_run("mqar_128_8_d64_dca_delta").config == "mqar_dca"


def test_seeds_suite_repeats_seed_zero_runs_with_another_seed():
  """Suite "seeds": each run is its seed-0 corpus run with only the seed (and name, group, label)
  changed, so that its row compares with that run's."""
  seeds = suite_plan.suite_runs("seeds")
  assert seeds and {r.group for r in seeds} == {"seed_lm"}
  for run in seeds:
    base = suite_plan.find_run(run.name.rsplit("_seed", 1)[0])
    overrides = run.override_dict()
    assert overrides.pop("seed") == suite_plan.SECOND_SEED
    assert overrides == base.override_dict() and run.config == base.config
    assert suite_plan.run_config(run, tiny=True).seed == suite_plan.SECOND_SEED


def test_long_suite_trains_the_seed_pair_longer_with_the_same_bytes_per_step():
  """Suite "long": each run is its T = 256 corpus run (of the same seed) with T = 1024 and the
  batch cut so that a step sees the same bytes; nothing else changes. Both seeds of the pair."""
  runs = suite_plan.suite_runs("long")
  assert runs and {r.group for r in runs} == {"long_lm"}
  assert {r.override_dict().get("seed", 0) for r in runs} == {0, suite_plan.SECOND_SEED}
  for run in runs:
    base = suite_plan.find_run(run.name.replace(f"_t{suite_plan.LONG_T}", ""))
    overrides, base_overrides = run.override_dict(), base.override_dict()
    assert overrides.pop("seq_len") == suite_plan.LONG_T
    assert (overrides.pop("batch_size") * suite_plan.LONG_T
            == base_overrides.pop("batch_size") * base_overrides.pop("seq_len"))
    assert overrides == base_overrides and run.config == base.config


def _check_tiny_runs_write_results(tiny_suite):
  for name in TINY_RUNS:
    result = json.loads((tiny_suite / name / "result.json").read_text())
    assert result["tiny"] and result["steps"] == 4 and result["stopped_early"] is False
    evaluation = result["evaluation"]
    if result["config"]["task"] == "lm":
      # 1/4x, 1x, 4x and 16x the training length.
      t = result["config"]["seq_len"]
      assert sorted(int(k) for k in evaluation) == sorted({max(8, int(t * f))
                                                           for f in suite_plan.LM_CONTEXT_FACTORS})
      assert all(0 < e["bpb"] < 20 for e in evaluation.values())
    else:
      (e,) = evaluation.values()
      assert 0 <= e["accuracy"] <= 1 and e["targets"] > 0


def _check_rerun_skips_finished_runs(tiny_suite, capsys):
  runs = [suite_plan.find_run(TINY_RUNS[0])]
  assert suite.run_suite(runs, tiny_suite, tiny=True, in_process=True) == []
  assert "1 of 1 runs already done" in capsys.readouterr().out


def _check_render_writes_tables_and_plots(tiny_suite, tmp_path):
  tmp_path.mkdir()
  summary = suite_report.render(tiny_suite, tmp_path)
  text = (tmp_path / "benchmark_results.md").read_text()
  assert "CI-sized" in text
  assert "bpb @" in text and "MQAR" in text
  assert ("Ablations of DCA" in text) == any(n.startswith("ablation") for n in TINY_RUNS)
  # The budget study's table: the tiny run's cell and "not run" for the others.
  assert "MQAR with a longer budget" in text and "| (64, 4), 64 | " in text and "not run" in text
  assert (tmp_path / "benchmark_lm_contexts.png").stat().st_size > 1000
  assert (tmp_path / "benchmark_mqar.png").stat().st_size > 1000
  assert set(summary["runs"]) == set(TINY_RUNS)
  _check_corpus_render_computes_the_targets(tiny_suite, tmp_path / "corpus")


def _check_corpus_render_computes_the_targets(tiny_suite, tmp_path):
  """render-corpus: the LM runs' table, and issue #12's targets from the bits per byte (a
  window row made from the DCA run's result, 0.01 bpb better at T and worse beyond)."""
  import json
  import shutil
  runs = tmp_path / "runs"
  shutil.copytree(tiny_suite / "lm_dca", runs / "lm_dca")
  result = json.loads((runs / "lm_dca" / "result.json").read_text())
  t = result["config"]["seq_len"]
  window = json.loads(json.dumps(result))
  window.update(name="lm_window", label="sliding window")
  window["config"]["attention"] = "window"
  for context, metrics in window["evaluation"].items():
    metrics["bpb"] += -0.01 if int(context) == t else 0.01
  (runs / "lm_window").mkdir()
  (runs / "lm_window" / "result.json").write_text(json.dumps(window))
  # A softmax row 0.01 bpb worse than the window at T: the reference line says so.
  softmax = json.loads(json.dumps(window))
  softmax.update(name="lm_softmax", label="softmax")
  softmax["config"]["attention"] = "softmax"
  softmax["evaluation"][str(t)]["bpb"] += 0.01
  (runs / "lm_softmax").mkdir()
  (runs / "lm_softmax" / "result.json").write_text(json.dumps(softmax))
  summary = suite_report.render_corpus(runs, tmp_path)
  text = (tmp_path / "corpus_comparison.md").read_text()
  assert set(summary["runs"]) == {"lm_dca", "lm_window", "lm_softmax"}
  soft_bpb, window_bpb = (x["evaluation"][str(t)]["bpb"] for x in (softmax, window))
  assert (f"against the sliding window at T = {t}: {soft_bpb:.4f} vs {window_bpb:.4f} bits per "
          "byte (softmax not below the window") in text
  assert "| sliding window |" in text
  assert "| dca (additive) below the sliding window at 1x T |" in text
  rows = {line.split(" | ")[0]: line.split(" | ")[-1] for line in text.splitlines()
          if "below the sliding window" in line}
  assert rows["| dca (additive) below the sliding window at 1x T"] == "missed |"
  assert all(v == "met |" for k, v in rows.items() if not k.endswith("at 1x T"))
  # Runs trained at another length (suite "long") get their own table and targets.
  for name, base in (("lm_dca_t2", result), ("lm_window_t2", window)):
    longer = json.loads(json.dumps(base))
    longer.update(name=name, group="long_lm", label=base["label"] + " at 2T")
    longer["config"]["seq_len"] = 2 * t
    longer["evaluation"] = {str(2 * int(c)): m for c, m in base["evaluation"].items()}
    (runs / name).mkdir()
    (runs / name / "result.json").write_text(json.dumps(longer))
  suite_report.render_corpus(runs, tmp_path)
  text = (tmp_path / "corpus_comparison.md").read_text()
  assert f"## Trained at T = {t}" in text and f"## Trained at T = {2 * t}" in text
  assert text.count("below the sliding window at 1x T |") == 2
  assert f"| sliding window at 2T | {result['num_params']:,} |" in text
  # Runs with more steps (suite "budget") get their own table too.
  for name, base in (("lm_dca_x3", result), ("lm_window_x3", window)):
    more = json.loads(json.dumps(base))
    more.update(name=name, group="budget_lm", label=base["label"] + " x3", steps=3 * base["steps"])
    (runs / name).mkdir()
    (runs / name / "result.json").write_text(json.dumps(more))
  suite_report.render_corpus(runs, tmp_path)
  text = (tmp_path / "corpus_comparison.md").read_text()
  assert f"## Trained at T = {t}, {3 * result['steps']} steps" in text
  assert f"## Trained at T = {t}\n" in text
  assert text.count("below the sliding window at 1x T |") == 3
  # --carry: runs missing from the runs directory come from an earlier render, marked.
  earlier = tmp_path / "earlier.json"
  shutil.copy(tmp_path / "corpus_comparison.json", earlier)
  shutil.rmtree(runs / "lm_window_x3")
  summary = suite_report.render_corpus(runs, tmp_path, carry=earlier)
  text = (tmp_path / "corpus_comparison.md").read_text()
  assert f"Rows carried over from {earlier}" in text and "lm_window_x3." in text
  assert text.count("below the sliding window at 1x T |") == 3
  assert summary["runs"]["lm_window_x3"]["carried"] == str(earlier)
  assert "carried" not in summary["runs"]["lm_dca"]


def _check_render_shows_an_unfinished_run_as_such(tiny_suite, tmp_path):
  tmp_path.mkdir()
  # A run stopped before its end (metrics, no result.json) shows its last validation, marked.
  import shutil  # pylint: disable=g-import-not-at-top
  runs = tmp_path / "runs"
  shutil.copytree(tiny_suite, runs)
  workdir = runs / "mqar_long_256_16_d128_dca"
  workdir.mkdir()
  records = [{"step": 100, "val_loss": 5.0, "val_accuracy": 0.125},
             {"step": 150, "loss": 4.0}, {"step": 200, "val_loss": 4.0, "val_accuracy": 0.25}]
  (workdir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  suite_report.render(runs, tmp_path / "out")
  text = (tmp_path / "out" / "benchmark_results.md").read_text()
  assert "| (256, 16), 128 | unfinished: val 0.250 at step 200 | not run |" in text
  assert "DCA's run is unfinished (validation accuracy 0.250 at step 200 of 2000)" in text


def _check_recall_study_renders_distance_buckets(tiny_suite, tmp_path):
  result = json.loads((tiny_suite / "recall_128_8_d128_gated_deltanet" / "result.json").read_text())
  buckets = result["distance_accuracy"]["buckets"]
  # Every scored query falls in one bucket: the counts add up to the evaluation's targets.
  assert sum(b["count"] for b in buckets) == result["evaluation"]["32"]["targets"]
  rows = recall_study.render(tiny_suite, tmp_path)
  text = (tmp_path / "recall_study.md").read_text()
  assert "| Gated DeltaNet | not run | not run | 0." in text
  assert "Where each memory stops recalling" in text
  assert sum(r["status"] == "done" for r in rows) == 1


def _check_lm_dca_run_trains_resumes_and_evaluates(tiny_suite, tmp_path):
  # The suite's tiny lm_dca run is `configs.load_config("lm_dca", tiny=True)`
  # (suite_plan.run_config), so test_train's checks of a trained run apply to it as they are (CI
  # trains it only here). The suite writes result.json only for a run that was not interrupted.
  workdir = tiny_suite / "lm_dca"
  last = [r for r in train_checks.records(workdir) if "loss" in r][-1]
  result = json.loads((workdir / "result.json").read_text())
  summary = {"step": result["steps"], "interrupted": False, "loss": last["last_loss"]}
  train_checks.check_lm_dca_run(workdir, summary, tmp_path)


def test_recall_second_seeds_repeat_their_seed_zero_runs_and_render_apart():
  """The recall suite's second seeds are their seed-0 runs (on the cells and layers of
  SECOND_SEED_SLUGS) with only the seed (and name) changed; the report keeps them out of the
  seed-0 tables and puts both seeds side by side, a table per cell."""
  runs = {r.name: r for r in suite_plan.suite_runs("recall")}
  seeded = [r for r in runs.values() if "seed" in r.override_dict()]
  expected = {f"recall_{t}_{p}_d128_{slug}"
              for (t, p), slugs in recall_study.SECOND_SEED_SLUGS.items() for slug in slugs}
  assert {r.name.rsplit("_seed", 1)[0] for r in seeded} == expected
  for run in seeded:
    base = runs[run.name.rsplit("_seed", 1)[0]]
    overrides = run.override_dict()
    assert overrides.pop("seed") == recall_study.SECOND_SEED
    assert overrides == base.override_dict() and run.label == base.label
  rows = []
  for run in runs.values():
    o = run.override_dict()
    seed = o.get("seed", 0)
    rows.append({"name": run.name, "label": run.label, "seq_len": o["seq_len"],
                 "pairs": o["mqar_pairs"], "lr": o["peak_lr"], "seed": seed, "status": "done",
                 "accuracy": 0.5 + 0.25 * seed, "steps": 100, "stopped_early": False,
                 "date": "2026-12-05T00:00:00", "machine": {
                     "cpu_model": "cpu", "usable_cores": 2, "backend": "cpu", "jax": "0",
                     "python": "3"}})
  text = "\n".join(recall_study.markdown(rows))
  main_table = text.split("## Answer accuracy")[1].split("## Learning-rate")[0]
  assert "0.750" not in main_table and "0.500" in main_table
  seed_tables = text.split("## Second seed")[1:]
  assert len(seed_tables) == len(recall_study.SECOND_SEED_SLUGS)
  for table, slugs in zip(seed_tables, recall_study.SECOND_SEED_SLUGS.values()):
    assert table.split("\n## ")[0].count(
        "| 0.500 (100 steps, budget spent) | 0.750 (100 steps, budget spent) | 0.625 |") == len(slugs)


def test_recall_study_distances_match_the_layout():
  """query_distances finds, for every query, the distance back to its key's value (2i + 1)."""
  batch = mqar.mqar_batch(np.random.default_rng(3), batch_size=4, seq_len=64, num_pairs=5,
                          vocab_size=64)
  dist = recall_study.query_distances(batch["tokens"], batch["mask"], 5)
  assert ((dist >= 0) == batch["mask"]).all()
  for b, t in zip(*np.nonzero(batch["mask"])):
    (i,) = np.flatnonzero(batch["tokens"][b, 0:10:2] == batch["tokens"][b, t])
    assert batch["tokens"][b, 2 * i + 1] == batch["targets"][b, t]
    assert dist[b, t] == t - (2 * i + 1)
  labels = recall_study.bucket_labels(32)
  assert labels[0] == "[0, 32)" and labels[-1] == "[256, inf)"


def test_energy_of_a_decode_step_uses_that_context_s_flops():
  """Each decode row is charged the FLOPs of a step with a cache of its own length (a step at
  1024 was once charged with the FLOPs of a cache sized for 16384)."""
  from experiments import energy  # pylint: disable=g-import-not-at-top
  info = {"softmax": {"forward_flops_per_token": {}, "param_bytes": 0,
                      "decode_flops_per_token/8": 1e6, "cache_bytes/8": 0,
                      "decode_flops_per_token/64": 8e6, "cache_bytes/64": 0}}
  table = energy.energy_table(info, [8, 64], [])["softmax"]
  assert table["decode_joules/64"] == pytest.approx(8 * table["decode_joules/8"])
  assert table["decode_joules/8"] == pytest.approx(energy.E_FLOP_PJ * 1e6 * 1e-12)


def _speed(dca_decode=600.0, softmax_decode=700.0, gla_train=150.0):
  """A speed.json with two decode lengths and five numbers that make the arithmetic plain."""
  from experiments import energy  # pylint: disable=g-import-not-at-top
  info = {}
  for attention, flops, cache in (("softmax", 4e6, 1e6), ("dca", 1e6, 1e5), ("gla", 1e6, 1e4)):
    info[attention] = {"forward_flops_per_token": {"8": flops}, "param_bytes": 1_000_000,
                       "decode_flops_per_token/8": flops, "cache_bytes/8": cache,
                       "decode_flops_per_token/64": 8 * flops if attention == "softmax" else flops,
                       "cache_bytes/64": 8 * cache if attention == "softmax" else cache}
  table = energy.energy_table(info, [8, 64], [8])
  rates = {"softmax": (softmax_decode, 100.0, 100.0), "dca": (dca_decode, 1000.0, 200.0),
           "gla": (2000.0, 2000.0, gla_train)}
  models = {}
  for a, (at8, at64, train) in rates.items():
    models[a] = {**info[a], "num_params": 10, "train_tokens_per_s": train,
                 "decode_tokens_per_s/8": at8, "decode_tokens_per_s/64": at64,
                 "config": {"seq_len": 8}}
  return {"models": models, "energy": table, "decode_lengths": [8, 64], "flop_lengths": [8],
          "date": "2026-12-03T00:00:00", "machine": {"cpu_model": "test cpu", "usable_cores": 2, "backend": "cpu",
                      "jax": "0.0", "python": "3.x"}}


def test_energy_joules_watts_and_contradictions_are_computed_from_the_data():
  """Joules per token and the watts they imply at the measured rate; a sentence wherever the
  measured speed disagrees with the estimate, and none where it agrees."""
  from experiments import energy  # pylint: disable=g-import-not-at-top
  speed = _speed()
  e = speed["energy"]
  # dca at 8: 1e6 FLOPs x 2.3 pJ + (1e6 + 1e5) bytes x 160 pJ.
  dca_joules = (2.3e6 + 160 * 1.1e6) * 1e-12
  assert e["dca"]["decode_joules/8"] == pytest.approx(dca_joules)
  assert e["dca"]["forward_joules/8"] == pytest.approx(2.3e6 * 1e-12)
  assert energy.implied_watts(dca_joules, 600.0) == pytest.approx(dca_joules * 600.0)
  assert e["dca"]["decode/8"] < 1.0
  # dca is estimated cheaper than softmax at 8 but measured slower (600 < 700 tokens/s).
  found = energy.contradictions({a: r["decode/8"] for a, r in e.items()},
                                {a: m["decode_tokens_per_s/8"] for a, m in speed["models"].items()})
  assert [c["attention"] for c in found] == ["dca"]
  assert found[0]["time_ratio"] == pytest.approx(700.0 / 600.0)
  assert energy.contradictions({"softmax": 1.0, "dca": 1.5}, {"softmax": 10.0, "dca": 20.0})
  assert not energy.contradictions({"softmax": 1.0, "dca": 0.5}, {"softmax": 10.0, "dca": None})

  text = "\n".join(suite_report._speed_section(speed))
  assert f"| dca | {1e6 * dca_joules:.0f} |" in text
  assert f"{dca_joules * 600.0:.2f}" in text                    # the implied watts at 8
  assert "Decoding at 8, the measured speed contradicts the estimate: dca" in text
  assert "Decoding at 64" not in text                          # faster there, as estimated
  # gla: fewer forward FLOPs than softmax and trained faster (150 > 100 tokens/s): agreement.
  assert "Training at T = 8" not in text
  assert "20 W" in text and "Raichle & Gusnard" in text and "PNAS" in text
  assert "1 W" in text and "no source" in text
  assert "no power counter" in text and "SRAM" in text and "static and idle power" in text
  assert "predates" not in text

  # dca now faster at 8 (no decode sentence); gla trained slower than softmax (90 < 100).
  other = "\n".join(suite_report._speed_section(_speed(dca_decode=900.0, gla_train=90.0)))
  assert "Decoding at 8" not in other
  assert "Training at T = 8 (" in other and "gla is estimated at" in other
  old = _speed(dca_decode=900.0)
  old["models"]["dca"]["decode_flops_per_token"] = 1e6      # a speed.json of before 2026-12
  assert "predates the per-context count" in "\n".join(suite_report._speed_section(old))


@pytest.mark.slow          # ~90 s; its report sections are checked on fixed data just above
def test_speed_and_energy_tiny(tmp_path):
  result = suite_speed.measure_speed(tmp_path / "speed.json", tiny=True)
  models = result["models"]
  assert set(models) == set(suite_plan.ATTENTIONS)
  for m in models.values():
    assert m["train_tokens_per_s"] > 0 and m["decode_tokens_per_s/64"] > 0
    assert m["forward_flops_per_token"]["64"] > 0
  energy = result["energy"]
  assert energy["softmax"]["forward/64"] == pytest.approx(1.0)
  # The softmax cache grows with the context; the recurrent layers' caches do not.
  assert models["linear"]["cache_bytes/64"] < models["softmax"]["cache_bytes/64"] * 64


def test_demo_runs_end_to_end(tmp_path, capsys):
  assert demo.main(["--out", str(tmp_path), "--steps", "2", "--lengths", "64", "--sample",
                    "8", "--record", str(tmp_path / "record.json")]) == 0
  out = capsys.readouterr().out
  assert "validation bits per byte" in out and "lm_dca" in out and "lm_softmax" in out
  assert "decode cache" in out and "speed-up" in out
  result = json.loads((tmp_path / "demo.json").read_text())
  assert json.loads((tmp_path / "record.json").read_text()) == result
  assert result["layers"][0]["T"] == 64
  assert result["sample"]["cache_bytes"]["1024"]["dca"] == result["sample"]["cache_bytes"][
      "1048576"]["dca"]


def test_render_from_the_committed_record_reproduces_the_committed_report(tmp_path):
  """Without any result.json (runs/ is not committed), `render` takes the runs and the speed
  record from docs/benchmark_results.json and writes the committed Markdown again, so a new
  speed.json can be rendered on a fresh checkout."""
  docs = pathlib.Path(__file__).resolve().parents[1] / "docs"
  out = tmp_path / "docs"
  out.mkdir()
  shutil.copy(docs / "benchmark_results.json", out / "benchmark_results.json")
  (tmp_path / "runs").mkdir()
  suite_report.render(tmp_path / "runs", out)
  assert ((out / "benchmark_results.md").read_text()
          == (docs / "benchmark_results.md").read_text())


def test_score_study_recomputes_dca_exactly_with_resets():
  """The score study's float64 weights (window logits with rotary, memory kernels, decays,
  document masks) give the layer's own attention_compress outputs, so its measurements describe
  the mechanism that runs; a share is a fraction and the agreement a correlation."""
  import jax
  from flax import nnx
  from dca_jax.nn import TransformerConfig, TransformerLM
  from experiments import score_study
  model = TransformerLM(TransformerConfig(d_model=32, num_layers=2, num_heads=2, attention="dca",
                                          attention_options={"window": 8, "feature_dim": 4},
                                          vocab_size=64), rngs=nnx.Rngs(3))
  tokens = np.asarray(jax.random.randint(jax.random.key(1), (2, 40), 0, 64))
  reset = np.zeros((2, 40), bool)
  reset[1, 17] = True
  with score_study.recording() as records:
    model(tokens, reset=reset)
  assert len(records) == 2
  for record in records:
    report = score_study.layer_report(record, projection_dim=4)
    assert report["max_abs_output_difference"] < 1e-4
    assert report["share_buckets"] == ["[8, 16)", "[16, 32)", "[32, 40)"]
    for head in report["heads"]:
      assert all(0 <= x < 1 for x in head["memory_share"])
      assert -1 <= head["spearman_l_log_kappa"] <= 1 and 0 <= head["falling_branch_pairs"] <= 1


def test_readout_study_shared_normaliser_is_one_softmax_over_window_and_memory():
  """The readout study's variant (experiments/readout_study.py) is what it says: one softmax over
  the window's logits and the memory's logit xi = eta + log W, with the memory's read-out as that
  entry's value (float64 reference), and the window's softmax alone while the memory is empty.
  Patched into DCA's delta memory, it keeps T <= W exact (equal to the gated read-out there),
  changes the output beyond, and a prefill then decode steps still equal one call."""
  import jax
  import jax.numpy as jnp
  from dca_jax import attention_compress, compute_weights, init_params, memory_state_update
  from experiments import readout_study

  rng = np.random.default_rng(0)
  b, h, w, v = 2, 3, 7, 5
  s = rng.normal(size=(b, h, w)) * 3
  values, r, eta = rng.normal(size=(b, h, w, v)), rng.normal(size=(b, h, v)), rng.normal(size=(b, h))
  top = s.max(-1)
  e = np.exp(s - top[..., None])
  num, den = (e[..., None] * values).sum(-2), e.sum(-1)
  live = np.array([True, False])          # per row, as the layer passes it (not per head)
  got = readout_study.shared_read_out(*(jnp.asarray(a, jnp.float32) for a in (num, den, r, eta)),
                                      top=jnp.asarray(top, jnp.float32), live=jnp.asarray(live),
                                      window=w)
  logits = np.concatenate([s, (eta + np.log(w))[..., None]], -1)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  one_softmax = (p[..., :w, None] * values).sum(-2) + p[..., w:] * r
  expected = np.where(live[:, None, None], one_softmax, num / den[..., None])
  np.testing.assert_allclose(np.asarray(got), expected, rtol=2e-5, atol=2e-6)

  window, time = 4, 11
  params = init_params(jax.random.key(1), d_model=16, num_heads=2, window=window, memory="delta")
  x = jax.random.normal(jax.random.key(2), (1, time, 16))
  weights = compute_weights(params, x)
  gated = attention_compress(weights, window=window)
  with readout_study.shared_readout(window):
    shared = attention_compress(weights, window=window)
    short, _ = attention_compress(compute_weights(params, x[:, :window]), window=window,
                                  return_state=True)
    o, state = attention_compress(compute_weights(params, x[:, :6]), window=window,
                                  return_state=True)
    steps = []
    for t in range(6, time):
      o_t, state = memory_state_update(state, compute_weights(params, x[:, t]))
      steps.append(o_t)
  np.testing.assert_allclose(np.asarray(short), np.asarray(gated[:, :window]), rtol=1e-5,
                             atol=1e-6)
  assert not np.allclose(np.asarray(shared[:, window:]), np.asarray(gated[:, window:]), atol=1e-4)
  np.testing.assert_allclose(np.asarray(jnp.stack(steps, 1)), np.asarray(shared[:, 6:]),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(o), np.asarray(shared[:, :6]), rtol=1e-4, atol=1e-5)
