"""Speeds, energy estimates and the report of the experiment suite (`experiments/suite.py`).

`measure_speed` times, in one process and round-robin (`benchmark.time_interleaved`), the training
step and the decoding step of the five LM models of the comparison, and counts their FLOPs with
`dca_jax.flops.count_flops` (exact, loops included) to estimate energy relative to the softmax
transformer. `render` gathers every `result.json` of a runs directory (and speed.json) into
docs/benchmark_results.{json,md} and the PNG plots.

Energy model (an estimate, not a measurement; no power meter is available on these machines):
  E = e_flop * FLOPs + e_dram * bytes moved from DRAM,
with e_flop = 2.3 pJ (a 32-bit floating multiply-add, 3.7 pJ + 0.9 pJ, counted as 2 FLOPs) and
e_dram = 160 pJ per byte (640 pJ per 32-bit DRAM read), Horowitz, "Computing's energy problem
(and what we can do about it)", ISSCC 2014, 45 nm figures. Training and prefill are counted as
compute (FLOPs only: a lower bound; the same for every model). One decoding step at batch 1
reads every parameter and the whole decode cache once, so its DRAM bytes are parameters + cache.
Only ratios to the softmax transformer are reported: the constants cancel in compute-bound rows.
"""

from __future__ import annotations

import datetime
import json
import math
import pathlib
from typing import Any, Mapping, Sequence

import numpy as np

from experiments import benchmark, bookkeeping, report

E_FLOP_PJ = 2.3
E_DRAM_PJ_PER_BYTE = 160.0
ENERGY_SOURCE = ("Horowitz, 'Computing's energy problem (and what we can do about it)', "
                 "ISSCC 2014 (45 nm): fp32 mult 3.7 pJ + add 0.9 pJ; 32-bit DRAM read 640 pJ")


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# --- speed and energy -------------------------------------------------------------------------


def _lm_config(attention: str, tiny: bool):
  from experiments import configs as configs_lib  # pylint: disable=g-import-not-at-top
  from experiments import suite
  run = next(r for r in suite.suite_runs("lm") if r.override_dict()["attention"] == attention)
  overrides = run.override_dict()
  if tiny:
    overrides = {**overrides, **suite.tiny_overrides(run)}
  return configs_lib.load_config(run.config, overrides=overrides)


def measure_speed(out: pathlib.Path, *, repeats: int = 7, tiny: bool = False,
                  decode_lengths: Sequence[int] = (1024, 16384),
                  flop_lengths: Sequence[int] = (256, 1024, 4096, 16384)) -> dict[str, Any]:
  """Training and decoding tokens/s and FLOP-based energy of the five LM models; writes `out`."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from flax import nnx
  from dca_jax.flops import count_flops
  from dca_jax.nn.transformer import count_params
  from experiments import suite
  from experiments import train as train_lib

  if tiny:
    decode_lengths, flop_lengths, repeats = (64,), (32, 64), 2
  configs = {a: _lm_config(a, tiny) for a in suite.ATTENTIONS}
  states, thunks, info = {}, {}, {}
  for attention, config in configs.items():
    _, tx, train_step, _ = train_lib.compiled_steps(config)
    model = train_lib.build_model(config)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    data = train_lib._Data(config)  # pylint: disable=protected-access
    batch = data.train_batch(0)
    states[attention] = [params, tx.init(params)]

    def train_thunk(attention=attention, train_step=train_step, rest=rest, batch=batch):
      params, opt_state = states[attention]
      params, opt_state, loss, _ = train_step(params, rest, opt_state, batch)
      states[attention] = [params, opt_state]
      return loss
    thunks[f"train/{attention}"] = train_thunk
    info[attention] = {"num_params": count_params(model), "config": config.to_dict(),
                       "train_tokens_per_step": config.batch_size * config.seq_len}

    # jax.jit over the split state (nnx.jit's per-call graph bookkeeping would dominate a step
    # that takes well under a millisecond).
    graphdef, state = nnx.split(model)
    step_fn = jax.jit(lambda state, tok, cache, graphdef=graphdef:
                      nnx.merge(graphdef, state).decode_step(tok, cache))
    for length in decode_lengths:
      cache = model.init_cache(1, length)
      token = jnp.zeros((1,), jnp.int32)
      cache_bytes = sum(x.nbytes for x in jax.tree_util.tree_leaves(cache))
      info[attention][f"cache_bytes/{length}"] = cache_bytes

      def decode_thunk(state=state, cache=cache, token=token, step_fn=step_fn):
        return step_fn(state, token, cache)[0]
      thunks[f"decode/{attention}/{length}"] = decode_thunk

    # Exact FLOPs of the forward per token at several lengths, and of one decode step.

    def forward(state, tokens, graphdef=graphdef):
      return nnx.merge(graphdef, state)(tokens)
    flops = {}
    for length in flop_lengths:
      tokens = jax.ShapeDtypeStruct((1, length), jnp.int32)
      flops[str(length)] = count_flops(forward, state, tokens).flops / length

    def decode(state, token, cache, graphdef=graphdef):
      return nnx.merge(graphdef, state).decode_step(token, cache)
    cache = model.init_cache(1, max(decode_lengths))
    info[attention]["forward_flops_per_token"] = flops
    info[attention]["decode_flops_per_token"] = count_flops(
        decode, state, jax.ShapeDtypeStruct((1,), jnp.int32), cache).flops
    info[attention]["param_bytes"] = 4 * info[attention]["num_params"]

  timings = benchmark.time_interleaved(thunks, repeats=repeats, min_total_s=2.0, max_repeats=40)
  for name, timing in timings.items():
    kind, attention, *rest = name.split("/")
    if kind == "train":
      info[attention]["train_step_s"] = timing.median_s
      info[attention]["train_tokens_per_s"] = info[attention]["train_tokens_per_step"] / timing.median_s
    else:
      info[attention][f"decode_step_s/{rest[0]}"] = timing.median_s
      info[attention][f"decode_tokens_per_s/{rest[0]}"] = 1.0 / timing.median_s
  result = {"models": info, "decode_lengths": list(decode_lengths),
            "flop_lengths": list(flop_lengths), "repeats": repeats,
            "machine": bookkeeping.machine_info(), "date": _now(), "tiny": tiny,
            "energy": energy_table(info, decode_lengths, flop_lengths)}
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2, default=_json_default) + "\n")
  print(json.dumps({a: {k: v for k, v in m.items() if "tokens_per_s" in k}
                    for a, m in info.items()}, indent=1, default=_json_default))
  return result


def energy_table(info: Mapping[str, Any], decode_lengths: Sequence[int],
                 flop_lengths: Sequence[int]) -> dict[str, Any]:
  """Energy per token relative to softmax, from the model in the module docstring."""
  base = info["softmax"]
  table: dict[str, Any] = {}
  for attention, m in info.items():
    row = {}
    for length in flop_lengths:
      row[f"forward/{length}"] = (m["forward_flops_per_token"][str(length)]
                                  / base["forward_flops_per_token"][str(length)])
    for length in decode_lengths:
      def joules(m, length=length):
        bytes_moved = m["param_bytes"] + m[f"cache_bytes/{length}"]
        return (E_FLOP_PJ * m["decode_flops_per_token"] + E_DRAM_PJ_PER_BYTE * bytes_moved) * 1e-12
      row[f"decode/{length}"] = joules(m) / joules(base)
      row[f"decode_joules/{length}"] = joules(m)
    table[attention] = row
  return table


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  raise TypeError(type(x))


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


def render(runs: pathlib.Path, out: pathlib.Path) -> dict[str, Any]:
  """Writes out/benchmark_results.{json,md} and out/benchmark_*.png from a runs directory."""
  from experiments import suite  # pylint: disable=g-import-not-at-top
  results = _load_results(runs)
  speed_path = runs / "speed.json"
  speed = json.loads(speed_path.read_text()) if speed_path.exists() else None
  by_group: dict[str, list[dict[str, Any]]] = {}
  for r in results:
    by_group.setdefault(r["group"], []).append(r)
    if r["name"] == "mqar_{}_{}_d64_dca".format(*suite.ABLATION_MQAR):   # the ablations' default
      by_group.setdefault("ablation_mqar", []).insert(0, {**r, "label": "default"})
  summary = {"date": _now(), "runs": {r["name"]: _compact(r) for r in results}, "speed": speed}
  out.mkdir(parents=True, exist_ok=True)
  (out / "benchmark_results.json").write_text(json.dumps(summary, indent=2) + "\n")
  lines = _markdown(by_group, speed, suite, runs)
  (out / "benchmark_results.md").write_text("\n".join(lines) + "\n")
  _plots(by_group, speed, out)
  print(f"wrote {out / 'benchmark_results.md'} ({len(results)} runs)")
  return summary


def _compact(r: Mapping[str, Any]) -> dict[str, Any]:
  keys = ("group", "label", "num_params", "steps", "tokens", "final_train_loss", "train_wall_s",
          "evaluation", "curve", "date", "tiny")
  out = {k: r.get(k) for k in keys}
  config = r["config"]
  out["config"] = {k: config[k] for k in ("attention", "attention_options", "d_model", "num_layers",
                                          "num_heads", "seq_len", "batch_size", "steps", "peak_lr",
                                          "mqar_pairs", "vocab_size", "task")}
  out["machine"] = {k: r["machine"].get(k) for k in ("cpu_model", "processor", "cpu_count", "jax",
                                                      "backend")}
  return out


def _machine_line(results: Sequence[Mapping[str, Any]]) -> str:
  if not results:
    return ""
  m = results[0]["machine"]
  dates = sorted(r["date"][:10] for r in results)
  return (f"{m.get('cpu_model') or bookkeeping.cpu_model()} x {m.get('cpu_count')} cores, JAX {m.get('jax')} "
          f"({m.get('backend')}), trained {dates[0]}" + (f" to {dates[-1]}" if dates[-1] != dates[0] else ""))


def _metric(r, t, key):
  e = r["evaluation"].get(str(t))
  return None if e is None else e.get(key)


def _unfinished(runs: pathlib.Path, suite) -> dict[str, dict[str, Any]]:
  """The last validation record of each budget-study run with metrics but no result.json yet."""
  from experiments import train as train_lib  # pylint: disable=g-import-not-at-top
  out = {}
  for run in suite.suite_runs("mqar_long"):
    workdir = runs / run.name
    if (workdir / "result.json").exists() or not (workdir / "metrics.jsonl").exists():
      continue
    val = [r for r in train_lib.read_metrics(workdir) if "val_accuracy" in r]
    if val:
      out[run.name] = val[-1]
  return out


# The MQAR target: DCA >= 0.99 at (256, 16), d_model 128, above these layers.
_SUBQUADRATIC = ("window", "linear", "gla")


def _target_verdict(dca: float, others: Mapping[str, float]) -> str:
  """"missed", "met" (above every sub-quadratic layer), or undecided while some were not run."""
  if dca < 0.99:
    return "missed"
  if set(others) >= set(_SUBQUADRATIC):
    return "met" if all(dca > others[a] for a in _SUBQUADRATIC) else "missed"
  return "DCA >= 0.99; the other layers not all run"


def _markdown(by_group, speed, suite, runs_dir: pathlib.Path) -> list[str]:
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
    lines += _mqar_section(mq, suite)
  if by_group.get("mqar_long"):
    lines += _mqar_long_section(by_group["mqar_long"], suite, _unfinished(runs_dir, suite))
  for group, title in (("ablation_mqar", "Ablations of DCA on MQAR {}, d_model 64".format(
                           suite.ABLATION_MQAR)),
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


def _mqar_section(mq, suite) -> list[str]:
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
    others = {a: v for a, v in at.items() if a in _SUBQUADRATIC and v is not None}
    best = max(others.items(), key=lambda kv: kv[1]) if others else None
    verdict = _target_verdict(at["dca"], others)
    lines.append(f"- (256, 16) at d_model {d_model}: DCA {_fmt(at['dca'])}; best other "
                 f"sub-quadratic layer " + (f"{best[0]} {_fmt(best[1])}" if best else "-")
                 + f"; softmax {_fmt(at.get('softmax'))} (target at d_model 128: DCA >= 0.99 and "
                 f"above every other sub-quadratic layer: {verdict if d_model == 128 else 'n/a'}).")
  done = {r["name"] for r in mq}
  missing = sorted({(r.override_dict()["seq_len"], r.override_dict()["mqar_pairs"],
                     r.override_dict()["d_model"]) for r in suite.suite_runs("mqar")
                    if r.name not in done})
  if missing:
    lines.append("- not run yet (the suite is resumable; these come last in its order): "
                 + ", ".join(f"({t}, {p}) at d_model {d}" for t, p, d in missing) + ".")
  lines += ["", "![MQAR accuracy](benchmark_mqar.png)", ""]
  return lines


def _mqar_long_section(rows, suite, unfinished: Mapping[str, Mapping[str, Any]]) -> list[str]:
  """The budget study: test accuracy and the steps each layer trained (stopped at 99%); a run
  stopped before its end shows its last validation accuracy instead, marked as such."""
  budget = suite.MQAR_LONG_BUDGET
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
  cells = list(dict.fromkeys((t, p, d) for t, p, d, _ in suite.MQAR_LONG_ORDER))
  labels = [suite.LABELS[a] for a in suite.ATTENTIONS]
  lines += ["| (T, pairs), d_model | " + " | ".join(labels) + " |",
            "|---|" + "---:|" * len(labels)]
  by_key = {(r["config"]["seq_len"], r["config"]["mqar_pairs"], r["config"]["d_model"],
             r["config"]["attention"]): r for r in rows}
  for t, p, d in cells:
    out = []
    for attention in suite.ATTENTIONS:
      r = by_key.get((t, p, d, attention))
      partial = unfinished.get(suite.long_run_name(t, p, d, attention))
      if r is not None:
        out.append(f"{_fmt(_metric(r, t, 'accuracy'))} ({r['steps']})")
      elif partial is not None:
        out.append(f"unfinished: val {_fmt(partial['val_accuracy'])} at step {partial['step']}")
      else:
        out.append("not run")
    lines.append(f"| ({t}, {p}), {d} | " + " | ".join(out) + " |")
  target = {a: by_key.get((256, 16, 128, a)) for a in suite.ATTENTIONS}
  if target["dca"] is not None:
    acc = _metric(target["dca"], 256, "accuracy")
    others = {a: _metric(r, 256, "accuracy") for a, r in target.items()
              if r is not None and a in _SUBQUADRATIC}
    verdict = _target_verdict(acc, others)
    lines += ["", f"- Target, (256, 16) at d_model 128 with this budget: DCA {_fmt(acc)} after "
              f"{target['dca']['steps']} steps; " + (", ".join(
                  f"{suite.LABELS[a]} {_fmt(v)}" for a, v in others.items()) or
                  "no other sub-quadratic layer run") + f": {verdict}."]
  elif suite.long_run_name(256, 16, 128, "dca") in unfinished:
    partial = unfinished[suite.long_run_name(256, 16, 128, "dca")]
    lines += ["", "- Target, (256, 16) at d_model 128 with this budget: DCA's run is unfinished "
              f"(validation accuracy {_fmt(partial['val_accuracy'])} at step {partial['step']} "
              f"of {budget['steps']}): not decided."]
  lines.append("")
  return lines


def _answers(mq) -> str:
  counts = sorted({e["targets"] for r in mq for e in r["evaluation"].values()})
  return f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,} to {counts[-1]:,}"


def _speed_section(speed) -> list[str]:
  m = speed["models"]
  lengths = speed["decode_lengths"]
  lines = ["## Speed, memory and energy", "",
           f"`python -m experiments.suite speed` ({speed['date'][:10]}, "
           f"{bookkeeping.machine_line(speed['machine'])}): every model timed round-robin in one "
           "process after warm-up, median of the repeats. Training: one optimiser step of "
           "the LM comparison's batch. Decoding: one token at batch 1 with a cache of the given "
           "length (softmax's KV cache grows with it; the others are constant).", "",
           "| attention | params | train tokens/s | " + " | ".join(
               f"decode tokens/s @ {n}" for n in lengths) + " | " + " | ".join(
                   f"cache @ {n}" for n in lengths) + " |",
           "|---|---:|---:|" + "---:|" * (2 * len(lengths))]
  for a, r in m.items():
    lines.append(f"| {a} | {r['num_params']:,} | {r['train_tokens_per_s']:,.0f} | " + " | ".join(
        f"{r[f'decode_tokens_per_s/{n}']:,.0f}" for n in lengths) + " | " + " | ".join(
            report.format_bytes(r[f"cache_bytes/{n}"]) for n in lengths) + " |")
  e = speed["energy"]
  flens = speed["flop_lengths"]
  lines += ["", "Energy per token relative to the softmax transformer (an estimate: "
            f"{E_FLOP_PJ} pJ per FLOP and {E_DRAM_PJ_PER_BYTE:.0f} pJ per DRAM byte from "
            f"{ENERGY_SOURCE}). Forward (training, prefill): exact FLOPs per token from "
            "`dca_jax.flops.count_flops`. Decoding: FLOPs of one step plus reading every "
            "parameter and the whole cache from DRAM.", "",
            "| attention | " + " | ".join(f"forward @ {n}" for n in flens) + " | "
            + " | ".join(f"decode @ {n}" for n in lengths) + " |",
            "|---|" + "---:|" * (len(flens) + len(lengths))]
  for a, r in e.items():
    lines.append(f"| {a} | " + " | ".join(f"{r[f'forward/{n}']:.3f}" for n in flens) + " | "
                 + " | ".join(f"{r[f'decode/{n}']:.3f}" for n in lengths) + " |")
  lines.append("")
  return lines


def _plots(by_group, speed, out: pathlib.Path) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
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
