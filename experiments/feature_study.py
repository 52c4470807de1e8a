"""Which feature map for DCA's memory: speed and accuracy together (8, 12, 16 Taylor dims; elu).

The feature map is DCA's largest cost: the Taylor map of P projected dims has
F = 1 + P + P (P + 1) / 2 features (45, 91, 153 for P = 8, 12, 16), and the memory's state, its
chunked engine and the feature computation all grow with F. This study trains the corpus LM
(`lm_dca`: 2 layers, d_model 128, T = 256) once per variant with the same data, seed, optimiser and
steps, evaluates test bits per byte at 1x and 4x the training length, and times one DCA layer
(d_model 256, 4 heads, batch 1, forward+backward) of each variant side by side.

Usage:
  python -m experiments.feature_study [--out runs/feature_study] [--steps 600] [--doc docs]
  python -m experiments.feature_study --phase timing     # only the timing (after training)
  python -m experiments.feature_study --phase render     # rewrite the doc from study.json

Training is resumable (each variant's workdir keeps its checkpoints; a finished variant is not
retrained). Cost on the 2-core CPU: ~3-4 min of training per variant at 600 steps, ~2 min of
timing. Writes `<out>/study.json` and `<doc>/feature_study.{md,json}`.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dca_jax.nn import DCAttention
from experiments import benchmark, bookkeeping
from experiments import checkpoints as checkpoints_lib
from experiments import configs as configs_lib
from experiments import evaluate as evaluate_lib
from experiments import train as train_lib

# label -> DCAttention options that differ between the variants.
VARIANTS = {
    "taylor-8": {"feature_map": "taylor", "feature_dim": 8},
    "taylor-12": {"feature_map": "taylor", "feature_dim": 12},
    "taylor-16": {"feature_map": "taylor", "feature_dim": 16},
    "elu-16": {"feature_map": "elu", "feature_dim": 16},
}
TIMING_LENGTHS = (1024, 8192)


def train_variants(out: pathlib.Path, steps: int, contexts: Sequence[int]) -> dict[str, Any]:
  """Trains (or resumes) every variant and evaluates test bits per byte at `contexts`."""
  results = {}
  for label, change in VARIANTS.items():
    config = configs_lib.load_config("lm_dca", overrides={
        "steps": steps, "eval_every": 0, "checkpoint_every": max(1, steps // 4),
        **{f"attention_options.{name}": value for name, value in change.items()}})
    options = config.attention_options.changed()
    workdir = out / label
    step = checkpoints_lib.latest_step(workdir)
    start = time.perf_counter()
    if step is None or step < steps:
      train_lib.train(config, workdir, resume=step is not None, progress=False)
    evaluation = evaluate_lib.evaluate(workdir, contexts, max_batches=16)
    results[label] = {
        "options": options, "steps": steps, "wall_s": time.perf_counter() - start,
        "num_params": checkpoints_lib.read_run(workdir)["num_params"],
        "test_bpb": {t: evaluation["contexts"][str(t)]["bpb"] for t in contexts}}
    bookkeeping.log(f"{label}: test bpb {results[label]['test_bpb']}")
  return results


def time_variants(repeats: int = 5) -> list[dict[str, Any]]:
  """One DCA layer per variant (d_model 256, 4 heads, batch 1), forward+backward, round-robin."""
  runner = benchmark.Runner()
  records = []
  for length in TIMING_LENGTHS:
    x = jax.random.normal(jax.random.key(0), (1, length, 256))
    cases = []
    for label, change in VARIANTS.items():
      layer = DCAttention(256, 4, rngs=nnx.Rngs(0), **change)
      graphdef, state = nnx.split(layer)

      def loss(state, x, graphdef=graphdef):
        return jnp.sum(jnp.square(nnx.merge(graphdef, state)(x)))

      record = {"variant": label, "T": length, "features": layer.num_features}
      records.append(record)
      cases.append(benchmark.Case(label, "fwd+bwd", record,
                                  fn=jax.grad(loss, argnums=(0, 1)), args=(state, x)))
    runner.measure(cases, length, repeats=repeats)
  return records


def write_doc(doc: pathlib.Path, result: dict[str, Any]) -> None:
  """`feature_study.md` and `.json` in `doc`."""
  doc.mkdir(parents=True, exist_ok=True)
  (doc / "feature_study.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
  contexts = result["contexts"]
  lines = [
      "# Which feature map for DCA's memory", "",
      "Generated on " + result["machine"] + " by: " + "; ".join(
          f"`{c['command']}` ({c['date']})" for c in result.get("commands", {}).values()) + ".",
      "",
      "Corpus LM `lm_dca` (2 layers, d_model 128, 4 heads, W = 64, trained at T = 256, "
      f"{result['steps']} steps, seed 0, one seed per variant): test bits per byte; one DCA layer "
      "(d_model 256, 4 heads, batch 1, fp32) forward+backward, median of round-robin repeats.", "",
      "| variant | F | params | " + " | ".join(f"bpb @ {t}" for t in contexts) + " | "
      + " | ".join(f"fwd+bwd @ {t}" for t in TIMING_LENGTHS) + " |",
      "|---|---|---|" + "---|" * (len(contexts) + len(TIMING_LENGTHS))]
  timing = {(r["variant"], r["T"]): r for r in result.get("timing", [])}
  for label in VARIANTS:
    trained = result["training"].get(label, {})
    bpb = {int(t): value for t, value in trained.get("test_bpb", {}).items()}
    cells = [f"{bpb[t]:.4f}" if t in bpb else "-" for t in contexts]
    times = []
    features = "-"
    for t in TIMING_LENGTHS:
      r = timing.get((label, t))
      features = r["features"] if r else features
      times.append(f"{1e3 * r['median_s']:.1f} ms" if r and r.get("median_s") else "-")
    params = trained.get("num_params", "-")
    lines.append(f"| {label} | {features} | {params} | " + " | ".join(cells) + " | "
                 + " | ".join(times) + " |")
  choice = choose(result)
  if choice:
    lines += ["", f"Rule: the fastest variant (fwd+bwd at T = {TIMING_LENGTHS[-1]}) whose test bits "
              f"per byte is within {100 * TOLERANCE:g}% of the best variant's at every context. "
              f"It picks **{choice}**, `DCAttention`'s default since 2026-12-02. The accuracy "
              "differences among the Taylor sizes are within what one seed of a 600-step run can "
              "tell apart; the speed differences are not."]
  (doc / "feature_study.md").write_text("\n".join(lines) + "\n")


TOLERANCE = 0.005


def choose(result: dict[str, Any]) -> str | None:
  """The variant the rule in the doc picks, or None without both training and timing."""
  trained = result.get("training", {})
  timing = {r["variant"]: r.get("median_s") for r in result.get("timing", [])
            if r["T"] == TIMING_LENGTHS[-1]}
  if not trained or not timing:
    return None
  bpb = {label: {int(t): v for t, v in row["test_bpb"].items()} for label, row in trained.items()}
  contexts = sorted(next(iter(bpb.values())))
  best = {t: min(row[t] for row in bpb.values()) for t in contexts}
  ok = [label for label, row in bpb.items()
        if all(row[t] <= best[t] * (1 + TOLERANCE) for t in contexts) and timing.get(label)]
  return min(ok, key=timing.get) if ok else None


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default="runs/feature_study")
  parser.add_argument("--doc", default="docs")
  parser.add_argument("--steps", type=int, default=600)
  parser.add_argument("--contexts", default="256,1024")
  parser.add_argument("--phase", choices=("all", "train", "timing", "render"), default="all",
                      help="render: rewrite the doc from <out>/study.json, measuring nothing")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  contexts = [int(t) for t in args.contexts.split(",")]
  path = out / "study.json"
  result = json.loads(path.read_text()) if path.exists() else {}
  if args.phase != "render":
    command = "python -m experiments.feature_study " + " ".join(
        sys.argv[1:] if argv is None else argv)
    result.setdefault("commands", {})[args.phase] = {"command": command.strip(),
                                                     "date": bookkeeping.now()}
    result.update(machine=bookkeeping.machine_line(bookkeeping.machine_info()),
                  steps=args.steps, contexts=contexts)
  if args.phase in ("all", "train"):
    result["training"] = train_variants(out, args.steps, contexts)
  if args.phase in ("all", "timing"):
    result["timing"] = time_variants()
  result.setdefault("training", {})
  path.write_text(json.dumps(result, indent=2, default=str) + "\n")
  write_doc(pathlib.Path(args.doc), result)
  return result


if __name__ == "__main__":
  main()
