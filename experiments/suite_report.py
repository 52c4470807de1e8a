"""The report of the experiment suite: docs/benchmark_results.{json,md} and its plots.

`render` gathers every `result.json` of a runs directory (written by `experiments/suite.py`) and
its speed.json (`experiments/suite_speed.py`) into docs/benchmark_results.{json,md} and the PNG
plots. It measures nothing: the numbers come from those files, the runs' layout from the plan
(`experiments/suite_plan.py`).
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from experiments import checkpoints as checkpoints_lib
from experiments import suite_plan
from experiments.bookkeeping import machine_line, now, write_json
from experiments import energy as energy_lib
from experiments.energy import E_DRAM_PJ_PER_BYTE, E_FLOP_PJ, ENERGY_SOURCE
from experiments.report import format_bytes, pyplot


# --- report -----------------------------------------------------------------------------------


def _load_results(runs: pathlib.Path) -> list[dict[str, Any]]:
  results = []
  for path in sorted(runs.glob("*/result.json")):
    results.append(json.loads(path.read_text()))
  return results


def _fmt(x, digits=3):
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return "-"
  return f"{x:.{digits}f}"


def _recorded_results(recorded: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The runs of an earlier render (out/benchmark_results.json), in the form `_load_results`
  gives (compacted: see `_compact`). Renders older than the seed field trained at seed 0."""
  return [dict(r, name=name, config={"seed": 0, **r["config"]})
          for name, r in recorded.get("runs", {}).items()]


def render(runs: pathlib.Path, out: pathlib.Path) -> dict[str, Any]:
  """Writes out/benchmark_results.{json,md} and out/benchmark_*.png from a runs directory.

  runs/ is not committed. Where the runs directory holds no result.json (a fresh checkout that
  ran only `suite speed`), the runs come from the committed out/benchmark_results.json, each with
  its own date and machine, and so does the speed record if runs/speed.json is absent: a new
  speed.json can be rendered without training the suite again."""
  record = out / "benchmark_results.json"
  recorded = json.loads(record.read_text()) if record.exists() else {}
  results = _load_results(runs) or _recorded_results(recorded)
  speed_path = runs / "speed.json"
  speed = (json.loads(speed_path.read_text()) if speed_path.exists()
           else recorded.get("speed"))
  by_group: dict[str, list[dict[str, Any]]] = {}
  for r in results:
    by_group.setdefault(r["group"], []).append(r)
    # The MQAR grid's DCA run at the ablations' configuration is their default row.
    if r["name"] == "mqar_{}_{}_d64_dca".format(*suite_plan.ABLATION_MQAR):
      by_group.setdefault("ablation_mqar", []).insert(0, {**r, "label": "default"})
  summary = {"date": now(), "runs": {r["name"]: _compact(r) for r in results}, "speed": speed}
  out.mkdir(parents=True, exist_ok=True)
  write_json(out / "benchmark_results.json", summary)
  lines = _markdown(by_group, speed, runs)
  (out / "benchmark_results.md").write_text("\n".join(lines) + "\n")
  _plots(by_group, speed, out)
  print(f"wrote {out / 'benchmark_results.md'} ({len(results)} runs)")
  return summary


# The corpus comparison on today's code (issue #12): DCA with either memory, Gated DeltaNet and
# the baselines, each from its own result.json in one runs directory.
CORPUS_GROUPS = ("lm", "delta_lm", "seed_lm", "long_lm", "budget_lm")
CORPUS_COMMANDS = (
    "python -m experiments.suite run --suite all --runs runs/corpus --only lm_dca,lm_window,lm_softmax",
    "python -m experiments.suite run --suite delta --runs runs/corpus "
    "--only lm_dca_delta,lm_gated_deltanet",
    "python -m experiments.suite run --suite seeds --runs runs/corpus",
    "python -m experiments.suite run --suite long --runs runs/corpus",
    "python -m experiments.suite run --suite budget --runs runs/corpus")


def _carried(path: pathlib.Path | None, present: set[str]) -> list[dict[str, Any]]:
  """The records of an earlier corpus_comparison.json (`path`) for the runs not in `present`,
  marked "carried" (a result.json's rendered fields: the runs' directories need not survive)."""
  if path is None:
    return []
  if not path.exists():
    raise FileNotFoundError(f"carry: {path} does not exist.")
  out = []
  for name, r in sorted(json.loads(path.read_text())["runs"].items()):
    if name in present or r["group"] not in CORPUS_GROUPS:
      continue
    # Records rendered before the seed was recorded: the plan's run of that name says it.
    seed = r["config"].get("seed")
    if seed is None:
      seed = suite_plan.find_run(name).override_dict().get("seed", 0)
    out.append({**r, "name": name, "config": {**r["config"], "seed": seed}, "carried": str(path)})
  return out


def render_corpus(runs: pathlib.Path, out: pathlib.Path, *,
                  carry: pathlib.Path | None = None) -> dict[str, Any]:
  """Writes out/corpus_comparison.{json,md}: the corpus runs of `runs` (groups
  `CORPUS_GROUPS`), bits per byte at every evaluated context, and issue #12's corpus targets
  (DCA below the sliding window at 1x, 4x and 16x the training length; within 1% of softmax at
  1x) for each DCA memory present, one table per training length and number of steps.

  `carry`: an earlier corpus_comparison.json whose runs are rendered too where `runs` lacks
  them (the page says which and from where)."""
  results = [r for r in _load_results(runs) if r["group"] in CORPUS_GROUPS]
  results += _carried(carry, {r["name"] for r in results})
  if not results:
    raise FileNotFoundError(f"no result.json of groups {CORPUS_GROUPS} under {runs}")
  summary = {"date": now(), "runs": {r["name"]: _compact(r) for r in results}}
  out.mkdir(parents=True, exist_ok=True)
  write_json(out / "corpus_comparison.json", summary)
  base = next((r for r in results if r["group"] == "lm"), results[0])
  c = base["config"]
  tables = sorted({(r["config"]["seq_len"], r["steps"]) for r in results})
  command = f"python -m experiments.suite render-corpus --runs {runs} --out {out}" + (
      f" --carry {carry}" if carry is not None else "")
  lines = ["# The corpus comparison on today's code", "",
           f"Generated by `{command}` from the runs of", ""] + [
           f"    {command}" for command in CORPUS_COMMANDS] + [
           "", "(each run alone on one core: `taskset -c N` and "
           "`XLA_FLAGS=--xla_cpu_multi_thread_eigen=false`, at most two runs at a time). The model and "
           "budget of docs/benchmark_results.md's corpus table: "
           f"{c['num_layers']} layers, d_model {c['d_model']}, {c['num_heads']} heads, "
           f"{base['steps']} steps of {c['batch_size'] * c['seq_len']} bytes "
           f"({c['batch_size']} x {c['seq_len']}; the runs trained at another length T keep the "
           f"bytes per step), AdamW peak lr {c['peak_lr']}, seed 0 unless the row says otherwise, "
           f"{base['steps']} steps unless the heading says otherwise. "
           "Test-split bits per byte (lower is better); rows of T bytes start from an empty "
           f"context. Machine: {_machine_line(results)}."]
  carried = sorted({r["carried"] for r in results if r.get("carried")})
  if carried:
    lines += ["", "Rows carried over from " + ", ".join(carried) + " (their runs' directories "
              "were not in the runs directory of this rendering): "
              + ", ".join(sorted(r["name"] for r in results if r.get("carried"))) + "."]
  for t, steps in tables:
    lines += _corpus_table([r for r in results
                            if (r["config"]["seq_len"], r["steps"]) == (t, steps)], t,
                           heading=len(tables) > 1,
                           steps=None if steps == base["steps"] else steps)
  (out / "corpus_comparison.md").write_text("\n".join(lines) + "\n")
  print(f"wrote {out / 'corpus_comparison.md'} ({len(results)} runs)")
  return summary


def _corpus_table(results: Sequence[Mapping[str, Any]], t: int, heading: bool,
                  steps: int | None = None) -> list[str]:
  """The table of the corpus runs trained at length `t` (for `steps` steps where not the
  comparison's budget) and their targets (`render_corpus`)."""
  contexts = sorted({int(k) for r in results for k in r["evaluation"]})
  title = f"T = {t}" + ("" if steps is None else f", {steps} steps")
  lines = [""] + ([f"## Trained at {title}", ""] if heading else []) + [
      "| attention | params | " + " | ".join(f"bpb @ {x}" for x in contexts) + " | train wall |",
      "|---|---:|" + "---:|" * len(contexts) + "---:|"]
  for r in results:
    cells = [_fmt(_metric(r, x, "bpb")) for x in contexts]
    lines.append(f"| {r['label']} | {r['num_params']:,} | " + " | ".join(cells)
                 + f" | {r['train_wall_s'] / 60:.1f} min |")
  # Each DCA run is compared with the window (and softmax) run of its own seed.
  by_attention = {}
  for r in results:
    key = r["config"]["attention"]
    if key == "dca":
      key = f"dca ({r['config']['attention_options'].get('memory', 'additive')})"
    by_attention[key, r["config"]["seed"]] = r
  rows = []
  for (key, seed), r in by_attention.items():
    if not key.startswith("dca"):
      continue
    window, soft = by_attention.get(("window", seed)), by_attention.get(("softmax", seed))
    name = key if seed == 0 else f"{key}, seed {seed}"
    if window is not None:
      for factor in (1, 4, 16):
        mine, theirs = _metric(r, factor * t, "bpb"), _metric(window, factor * t, "bpb")
        if mine is not None and theirs is not None:
          rows.append((f"{name} below the sliding window at {factor}x T", f"{mine:.4f} vs "
                       f"{theirs:.4f}", "met" if mine < theirs else "missed"))
    if soft is not None:
      mine, theirs = _metric(r, t, "bpb"), _metric(soft, t, "bpb")
      if mine is not None and theirs is not None:
        gap = mine / theirs - 1
        rows.append((f"{name} within 1% of softmax at T", f"{100 * gap:+.2f}%",
                     "met" if gap <= 0.01 else "missed"))
  if rows:
    lines += ["", f"{'###' if heading else '##'} Issue #12's corpus targets"
              + (f" ({title})" if heading else ""), "", "| target | measured | status |",
              "|---|---|---|"] + [f"| {a} | {b} | {c_} |" for a, b, c_ in rows]
  # The ablation behind the window targets: softmax sees every earlier token, so if it is not
  # below the window at T, the tokens beyond the window carry little this model can use.
  for seed in sorted({s_ for (_, s_) in by_attention}):
    window, soft = by_attention.get(("window", seed)), by_attention.get(("softmax", seed))
    soft_bpb = None if soft is None else _metric(soft, t, "bpb")
    window_bpb = None if window is None else _metric(window, t, "bpb")
    if soft_bpb is not None and window_bpb is not None:
      lines += ["", f"Reference (seed {seed}): full causal softmax, which sees every earlier token, "
                f"against the sliding window at T = {t}: {soft_bpb:.4f} vs {window_bpb:.4f} bits "
                "per byte "
                + ("(softmax not below the window: at this model size and budget the tokens beyond "
                   "the window add little that a memory of them could give)."
                   if soft_bpb >= window_bpb
                   else "(softmax below the window: the tokens beyond it carry usable "
                   "information).")]
  return lines


def _compact(r: Mapping[str, Any]) -> dict[str, Any]:
  keys = ("group", "label", "num_params", "steps", "tokens", "final_train_loss", "train_wall_s",
          "evaluation", "curve", "date", "tiny")
  out = {k: r.get(k) for k in keys}
  if r.get("carried"):
    out["carried"] = r["carried"]
  config = r["config"]
  out["config"] = {k: config[k] for k in ("attention", "attention_options", "d_model", "num_layers",
                                          "num_heads", "seq_len", "batch_size", "steps", "peak_lr",
                                          "mqar_pairs", "vocab_size", "task", "seed")}
  out["machine"] = {k: r["machine"].get(k) for k in ("cpu_model", "processor", "cpu_count", "jax",
                                                      "backend")}
  return out


def _machine_line(results: Sequence[Mapping[str, Any]]) -> str:
  if not results:
    return ""
  m = results[0]["machine"]
  # The CPU the runs trained on, never the renderer's (a run records None where /proc/cpuinfo
  # named no model).
  cpu = next((r["machine"]["cpu_model"] for r in results if r["machine"].get("cpu_model")),
             "CPU not recorded")
  dates = sorted(r["date"][:10] for r in results)
  return (f"{cpu} x {m.get('cpu_count')} cores, "
          f"JAX {m.get('jax')} ({m.get('backend')}), trained {dates[0]}"
          + (f" to {dates[-1]}" if dates[-1] != dates[0] else ""))


def _metric(r, t, key):
  e = r["evaluation"].get(str(t))
  return None if e is None else e.get(key)


def _unfinished(runs: pathlib.Path) -> dict[str, dict[str, Any]]:
  """The last validation record of each budget-study run with metrics but no result.json yet."""
  out = {}
  for run in suite_plan.suite_runs("mqar_long"):
    workdir = runs / run.name
    if (workdir / "result.json").exists() or not (workdir / "metrics.jsonl").exists():
      continue
    val = [r for r in checkpoints_lib.read_metrics(workdir) if "val_accuracy" in r]
    if val:
      out[run.name] = val[-1]
  return out


# The MQAR target: DCA >= 0.99 at (256, 16), d_model 128, above every layer of
# `suite_plan.SUBQUADRATIC`.


def _target_verdict(dca: float, others: Mapping[str, float]) -> str:
  """"missed", "met" (above every sub-quadratic layer), or undecided while some were not run."""
  if dca < 0.99:
    return "missed"
  if set(others) >= set(suite_plan.SUBQUADRATIC):
    return "met" if all(dca > others[a] for a in suite_plan.SUBQUADRATIC) else "missed"
  return "DCA >= 0.99; the other layers not all run"


def _markdown(by_group, speed, runs_dir: pathlib.Path) -> list[str]:
  lines = ["# Experiment results: accuracy, speed and energy of DCA against four baselines", "",
           "Generated by `python -m experiments.suite render --runs runs/suite` from the runs of",
           "`python -m experiments.suite run --suite all --runs runs/suite --workers 2` and",
           "`python -m experiments.suite speed --out runs/suite/speed.json`; every number below",
           "is one of those runs, on the machine and date given with each table. Budgets are what",
           "fits a shared 2-core CPU, far below what these tasks are usually trained for.", ""]
  if any(r.get("tiny") for rs in by_group.values() for r in rs):
    lines += ["**These are CI-sized (`--tiny`) runs: the numbers only show the pipeline works.**", ""]
  lm = by_group.get("lm", [])
  if lm:
    c = lm[0]["config"]
    t = c["seq_len"]
    contexts = sorted({int(k) for r in lm for k in r["evaluation"]})
    lines += ["## Byte-level language modelling on the standard-library corpus", "",
              f"Model: {c['num_layers']} layers, d_model {c['d_model']}, {c['num_heads']} heads, "
              f"trained at T = {t} for {lm[0]['steps']} steps of {c['batch_size']} x {t} bytes "
              f"({lm[0]['tokens']:,} bytes), AdamW peak lr {c['peak_lr']}, seed {c['seed']}. "
              f"Test-split bits per byte (lower is better) at each context length; rows of T "
              f"bytes start from an empty context. Machine: {_machine_line(lm)}.", "",
              "| attention | params | " + " | ".join(f"bpb @ {x}" for x in contexts)
              + " | bpb @ 4T / @ T | train wall |",
              "|---|---:|" + "---:|" * len(contexts) + "---:|---:|"]
    soft = next((r for r in lm if r["config"]["attention"] == "softmax"), None)
    for r in lm:
      cells = [_fmt(_metric(r, x, "bpb")) for x in contexts]
      at_t, at_4t = _metric(r, t, "bpb"), _metric(r, 4 * t, "bpb")
      ratio = _fmt(at_4t / at_t) if at_t and at_4t else "-"
      lines.append(f"| {r['label']} | {r['num_params']:,} | " + " | ".join(cells)
                   + f" | {ratio} | {r['train_wall_s'] / 60:.1f} min |")
    dca = next((r for r in lm if r["config"]["attention"] == "dca"), None)
    if soft and dca:
      gap = _metric(dca, t, "bpb") / _metric(soft, t, "bpb") - 1
      params_gap = dca["num_params"] / soft["num_params"] - 1
      lines += ["", f"DCA vs softmax at the training length: {100 * gap:+.2f}% bits per byte "
                f"(target: within 2%); parameters {100 * params_gap:+.2f}% (required within 2%).",
                ""]
      for factor in (4, 16):
        d_long, d_t = _metric(dca, factor * t, "bpb"), _metric(dca, t, "bpb")
        s_long = _metric(soft, factor * t, "bpb")
        if d_long is not None:
          lines.append(f"- at {factor}x the training length: DCA {_fmt(d_long)} "
                       f"({'no worse' if d_long <= d_t else 'worse'} than its {_fmt(d_t)} at T), "
                       f"softmax {_fmt(s_long)}.")
      lines.append("")
    lines += ["", "![bits per byte vs context](benchmark_lm_contexts.png)", ""]
  mq = by_group.get("mqar", [])
  if mq:
    lines += _mqar_section(mq)
  if by_group.get("mqar_long"):
    lines += _mqar_long_section(by_group["mqar_long"], _unfinished(runs_dir))
  for group, title in (("ablation_mqar", "Ablations of DCA on MQAR {}, d_model 64".format(
                           suite_plan.ABLATION_MQAR)),
                       ("ablation_lm", "Ablations of DCA on the corpus (small budget)")):
    rs = sorted(by_group.get(group, []), key=lambda r: (r["label"] != "default", r["label"]))
    if not rs:
      continue
    c = rs[0]["config"]
    lines += [f"## {title}", "",
              f"One option changed at a time from the defaults; {rs[0]['steps']} steps of "
              f"{c['batch_size']} x {c['seq_len']}. Machine: {_machine_line(rs)}.", "",
              "| variant | options | params | " + ("answer accuracy" if group == "ablation_mqar"
                                                   else f"test bpb @ {c['seq_len']}") + " |",
              "|---|---|---:|---:|"]
    for r in rs:
      t = r["config"]["seq_len"]
      value = (_fmt(_metric(r, t, "accuracy")) if group == "ablation_mqar"
               else _fmt(_metric(r, t, "bpb")))
      options = ", ".join(f"{k}={v}" for k, v in sorted(r["config"]["attention_options"].items()))
      lines.append(f"| {r['label']} | {options} | {r['num_params']:,} | {value} |")
    lines.append("")
  if speed:
    lines += _speed_section(speed)
  return lines


def _mqar_section(mq) -> list[str]:
  lines = ["## MQAR (multi-query associative recall)", ""]
  c = mq[0]["config"]
  lines += [f"{c['num_layers']} layers, vocabulary {c['vocab_size']}, {mq[0]['steps']} steps of "
            f"{c['batch_size']} sequences per configuration, AdamW peak lr {c['peak_lr']}. "
            f"Answer accuracy on fresh test sequences ({_answers(mq)} answers per cell). Zoology "
            "(Arora et al. 2023) trains each point far longer (tens of epochs of 100,000 "
            "sequences, with a learning-rate sweep) on a vocabulary of 8192: compare with its "
            f"figures only with that caveat. Machine: {_machine_line(mq)}.", ""]
  keys = sorted({(r["config"]["seq_len"], r["config"]["mqar_pairs"]) for r in mq})
  for d_model in sorted({r["config"]["d_model"] for r in mq}):
    rows = [r for r in mq if r["config"]["d_model"] == d_model]
    if not rows:
      continue
    lines += [f"d_model {d_model}:", "",
              "| attention | " + " | ".join(f"({t}, {p})" for t, p in keys) + " |",
              "|---|" + "---:|" * len(keys)]
    labels = []
    for r in rows:
      if r["label"] not in labels:
        labels.append(r["label"])
    for label in labels:
      cells = []
      for t, p in keys:
        r = next((r for r in rows if r["label"] == label and r["config"]["seq_len"] == t
                  and r["config"]["mqar_pairs"] == p), None)
        cells.append(_fmt(_metric(r, t, "accuracy")) if r else "")
      lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("")
  for d_model in sorted({r["config"]["d_model"] for r in mq}):
    at = {r["config"]["attention"]: _metric(r, 256, "accuracy") for r in mq
          if r["config"]["d_model"] == d_model and r["config"]["seq_len"] == 256
          and r["config"]["mqar_pairs"] == 16}
    if at.get("dca") is None:
      continue
    others = {a: v for a, v in at.items() if a in suite_plan.SUBQUADRATIC and v is not None}
    best = max(others.items(), key=lambda kv: kv[1]) if others else None
    verdict = _target_verdict(at["dca"], others)
    lines.append(f"- (256, 16) at d_model {d_model}: DCA {_fmt(at['dca'])}; best other "
                 f"sub-quadratic layer " + (f"{best[0]} {_fmt(best[1])}" if best else "-")
                 + f"; softmax {_fmt(at.get('softmax'))} (target at d_model 128: DCA >= 0.99 and "
                 f"above every other sub-quadratic layer: {verdict if d_model == 128 else 'n/a'}).")
  done = {r["name"] for r in mq}
  missing = sorted({(r.override_dict()["seq_len"], r.override_dict()["mqar_pairs"],
                     r.override_dict()["d_model"]) for r in suite_plan.suite_runs("mqar")
                    if r.name not in done})
  if missing:
    lines.append("- not run yet (the suite is resumable; these come last in its order): "
                 + ", ".join(f"({t}, {p}) at d_model {d}" for t, p, d in missing) + ".")
  lines += ["", "![MQAR accuracy](benchmark_mqar.png)", ""]
  return lines


def _mqar_long_section(rows, unfinished: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """The budget study: test accuracy and the steps each layer trained (stopped at 99%); a run
  stopped before its end shows its last validation accuracy instead, marked as such."""
  budget = suite_plan.MQAR_LONG_BUDGET
  lines = ["## MQAR with a longer budget: does each layer learn, and after how many steps?", "",
           f"The same models and data as above, up to {budget['steps']} steps of "
           f"{budget['batch_size']} sequences at peak lr {budget['peak_lr']} "
           f"(cosine schedule over {budget['steps']} steps), validated every "
           f"{budget['eval_every']} steps; a run stops at the first validation with answer "
           f"accuracy >= {budget['stop_accuracy']} (`stop_accuracy`). Each cell: answer accuracy "
           "on fresh test sequences, then the steps trained (a number below the budget means it "
           f"reached {budget['stop_accuracy']} there). \"unfinished\": the run was stopped "
           "before its end (it resumes from its checkpoint when the suite is run again); its "
           f"last validation accuracy is shown. Machine: {_machine_line(rows)}.", ""]
  cells = list(dict.fromkeys((t, p, d) for t, p, d, _ in suite_plan.MQAR_LONG_ORDER))
  labels = [suite_plan.LABELS[a] for a in suite_plan.ATTENTIONS]
  lines += ["| (T, pairs), d_model | " + " | ".join(labels) + " |",
            "|---|" + "---:|" * len(labels)]
  by_key = {(r["config"]["seq_len"], r["config"]["mqar_pairs"], r["config"]["d_model"],
             r["config"]["attention"]): r for r in rows}
  for t, p, d in cells:
    out = []
    for attention in suite_plan.ATTENTIONS:
      r = by_key.get((t, p, d, attention))
      partial = unfinished.get(suite_plan.long_run_name(t, p, d, attention))
      if r is not None:
        out.append(f"{_fmt(_metric(r, t, 'accuracy'))} ({r['steps']})")
      elif partial is not None:
        out.append(f"unfinished: val {_fmt(partial['val_accuracy'])} at step {partial['step']}")
      else:
        out.append("not run")
    lines.append(f"| ({t}, {p}), {d} | " + " | ".join(out) + " |")
  target = {a: by_key.get((256, 16, 128, a)) for a in suite_plan.ATTENTIONS}
  if target["dca"] is not None:
    acc = _metric(target["dca"], 256, "accuracy")
    others = {a: _metric(r, 256, "accuracy") for a, r in target.items()
              if r is not None and a in suite_plan.SUBQUADRATIC}
    verdict = _target_verdict(acc, others)
    lines += ["", f"- Target, (256, 16) at d_model 128 with this budget: DCA {_fmt(acc)} after "
              f"{target['dca']['steps']} steps; " + (", ".join(
                  f"{suite_plan.LABELS[a]} {_fmt(v)}" for a, v in others.items()) or
                  "no other sub-quadratic layer run") + f": {verdict}."]
  elif suite_plan.long_run_name(256, 16, 128, "dca") in unfinished:
    partial = unfinished[suite_plan.long_run_name(256, 16, 128, "dca")]
    lines += ["", "- Target, (256, 16) at d_model 128 with this budget: DCA's run is unfinished "
              f"(validation accuracy {_fmt(partial['val_accuracy'])} at step {partial['step']} "
              f"of {budget['steps']}): not decided."]
  lines.append("")
  return lines


def _answers(mq) -> str:
  counts = sorted({e["targets"] for r in mq for e in r["evaluation"].values()})
  return f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,} to {counts[-1]:,}"


def _dense_softmax_limit(heads: int) -> int:
  """The longest T whose whole score matrices the softmax layer forms at batch 1."""
  from dca_jax.nn import softmax as softmax_layer
  return math.isqrt(softmax_layer.DENSE_SCORES_BYTES // (2 * 4 * heads))


def _speed_section(speed) -> list[str]:
  m = speed["models"]
  lengths = speed["decode_lengths"]
  lines = ["## Speed, memory and energy", "",
           f"`python -m experiments.suite speed` ({speed['date'][:10]}, "
           f"{machine_line(speed['machine'])}): every model timed round-robin in one "
           "process after warm-up, median of the repeats. Training: one optimiser step of "
           "the LM comparison's batch. Decoding: one token at batch 1 with a cache of the given "
           "length (softmax's KV cache grows with it; the others are constant), each token one "
           "call of the jitted `decode_step` from Python: the per-call dispatch dominates a "
           "step of the constant-state layers, and `generate`'s compiled loop decodes the same "
           "models several times faster (docs/performance.md, docs/edge.md). The watts below "
           "follow these rates.", "",
           "| attention | params | train tokens/s | " + " | ".join(
               f"decode tokens/s @ {n}" for n in lengths) + " | " + " | ".join(
                   f"cache @ {n}" for n in lengths) + " |",
           "|---|---:|---:|" + "---:|" * (2 * len(lengths))]
  for a, r in m.items():
    lines.append(f"| {a} | {r['num_params']:,} | {r['train_tokens_per_s']:,.0f} | " + " | ".join(
        f"{r[f'decode_tokens_per_s/{n}']:,.0f}" for n in lengths) + " | " + " | ".join(
            format_bytes(r[f"cache_bytes/{n}"]) for n in lengths) + " |")
  e = speed["energy"]
  flens = speed["flop_lengths"]
  lines += ["", "Energy per token relative to the softmax transformer (an estimate: "
            f"{E_FLOP_PJ} pJ per FLOP and {E_DRAM_PJ_PER_BYTE:.0f} pJ per DRAM byte from "
            f"{ENERGY_SOURCE}). Forward (training, prefill): exact FLOPs per token from "
            "`dca_jax.flops.count_flops` of the form each layer runs (softmax: the whole "
            "masked score matrix while it fits `DENSE_SCORES_BYTES`, at batch 1 and 4 heads up "
            f"to T = {_dense_softmax_limit(4)}; beyond, the blocked form, which skips the key blocks above the "
            "diagonal, so softmax's count per token roughly halves its attention term there). "
            "Decoding: FLOPs of one step plus reading every parameter and the whole cache from "
            "DRAM.", "",
            "| attention | " + " | ".join(f"forward @ {n}" for n in flens) + " | "
            + " | ".join(f"decode @ {n}" for n in lengths) + " |",
            "|---|" + "---:|" * (len(flens) + len(lengths))]
  for a, r in e.items():
    lines.append(f"| {a} | " + " | ".join(f"{r[f'forward/{n}']:.3f}" for n in flens) + " | "
                 + " | ".join(f"{r[f'decode/{n}']:.3f}" for n in lengths) + " |")
  lines.append("")
  if any("decode_flops_per_token" in r for r in m.values()):
    lines += ["This speed.json predates the per-context count of a decode step's FLOPs: every "
              "decode row above was charged the FLOPs of one step at its model's longest cache "
              "(softmax's step at 1024 overcharged). `python -m experiments.suite speed` "
              "recounts.", ""]
  lines += _estimate_vs_measured(speed)
  lines += _joules_and_watts(speed)
  return lines


def _estimate_vs_measured(speed) -> list[str]:
  """Sentences where the measured speed contradicts the energy estimate (none: one sentence)."""
  m, e = speed["models"], speed["energy"]
  found = []
  for n in speed["decode_lengths"]:
    text = energy_lib.contradiction_text(energy_lib.contradictions(
        {a: r[f"decode/{n}"] for a, r in e.items()},
        {a: r.get(f"decode_tokens_per_s/{n}") for a, r in m.items()}), f"Decoding at {n}")
    found.append(text)
  # Training: the forward's FLOP ratio at the training length against the measured step.
  train_lengths = {r["config"]["seq_len"] for r in m.values() if "config" in r}
  for t in sorted(train_lengths & set(speed["flop_lengths"])):
    text = energy_lib.contradiction_text(energy_lib.contradictions(
        {a: r[f"forward/{t}"] for a, r in e.items()},
        {a: r.get("train_tokens_per_s") for a, r in m.items()}),
        f"Training at T = {t} (the forward's FLOP ratio against the measured optimiser step, "
        "backward included)")
    found.append(text)
  found = [f for f in found if f]
  if not found:
    return ["Measured speed agrees in direction with every estimate above (an attention "
            "estimated cheaper than softmax was also measured faster).", ""]
  return [" ".join(found) + " At equal power energy follows time, so in those cells the "
          "estimate is not borne out by the measurement. The model counts only FLOPs and DRAM "
          "bytes; per-step costs it leaves out (below) are the likely reason, not established "
          "here.", ""]


def _joules_and_watts(speed) -> list[str]:
  """Joules per decoded token and the watts they imply at the measured rate, with the brain's."""
  m, e = speed["models"], speed["energy"]
  lengths = speed["decode_lengths"]
  lines = ["Per decoded token under the same model: joules (µJ), and the watts those joules "
           "imply at the measured decode rate above (µJ per token x tokens/s); the last columns "
           "are the measured time per token relative to softmax's. Training has a measured "
           "rate but its FLOPs (backward included) are not counted, so no watts are implied "
           "for it.", "",
           "| attention | " + " | ".join(f"µJ/token @ {n}" for n in lengths) + " | "
           + " | ".join(f"W @ {n}" for n in lengths) + " | "
           + " | ".join(f"time vs softmax @ {n}" for n in lengths) + " |",
           "|---|" + "---:|" * (3 * len(lengths))]
  base = m.get("softmax", {})
  for a, r in e.items():
    joules = [r.get(f"decode_joules/{n}") for n in lengths]
    rates = [m[a].get(f"decode_tokens_per_s/{n}") for n in lengths]
    watts = [energy_lib.implied_watts(j, v) if j is not None and v else None
             for j, v in zip(joules, rates)]
    times = [base.get(f"decode_tokens_per_s/{n}") / v
             if v and base.get(f"decode_tokens_per_s/{n}") else None
             for n, v in zip(lengths, rates)]
    lines.append(f"| {a} | " + " | ".join(_fmt(None if j is None else 1e6 * j, 0)
                                           for j in joules) + " | "
                 + " | ".join(_fmt(w, 2) for w in watts) + " | "
                 + " | ".join(_fmt(t, 2) for t in times) + " |")
  lines += ["", energy_lib.brain_text(), ""]
  return lines


def _plots(by_group, speed, out: pathlib.Path) -> None:
  plt = pyplot()
  lm = by_group.get("lm", [])
  if lm:
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in lm:
      xs = sorted(int(k) for k in r["evaluation"])
      ax.plot(xs, [r["evaluation"][str(x)]["bpb"] for x in xs], marker="o", label=r["label"])
    ax.axvline(lm[0]["config"]["seq_len"], color="grey", ls=":", label="training length")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context length (bytes)")
    ax.set_ylabel("test bits per byte")
    ax.set_title("Bits per byte vs context length")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "benchmark_lm_contexts.png", dpi=120)
    plt.close(fig)
  mq = by_group.get("mqar", [])
  if mq:
    dims = sorted({r["config"]["d_model"] for r in mq})
    fig, axes = plt.subplots(1, len(dims), figsize=(5 * len(dims), 4), squeeze=False)
    for ax, d in zip(axes[0], dims):
      rows = [r for r in mq if r["config"]["d_model"] == d]
      keys = sorted({(r["config"]["seq_len"], r["config"]["mqar_pairs"]) for r in rows})
      labels = list(dict.fromkeys(r["label"] for r in rows))
      width = 0.8 / max(len(labels), 1)
      for i, label in enumerate(labels):
        vals = []
        for t, p in keys:
          r = next((r for r in rows if r["label"] == label and r["config"]["seq_len"] == t
                    and r["config"]["mqar_pairs"] == p), None)
          vals.append(_metric(r, t, "accuracy") or 0.0 if r else 0.0)
        ax.bar(np.arange(len(keys)) + i * width, vals, width, label=label)
      ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2)
      ax.set_xticklabels([f"({t},{p})" for t, p in keys])
      ax.set_ylim(0, 1)
      ax.set_title(f"MQAR accuracy, d_model {d}")
      ax.set_xlabel("(T, pairs)")
    axes[0][0].set_ylabel("answer accuracy")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "benchmark_mqar.png", dpi=120)
    plt.close(fig)
