"""The delta memory's read-out: a gate, or one normaliser shared with the window (issue #12).

Usage:
  python -m experiments.readout_study run --which corpus --runs runs/readout   # ~10 min, 1 core
  python -m experiments.readout_study run --which recall --runs runs/readout   # <= ~35 min
  python -m experiments.readout_study render --runs runs/readout --out docs    # docs/readout_study.*

DCA's additive memory shares the window's softmax normaliser: its read-out is a sum of positive
kernel values, more terms of the same sum. The delta memory's read-out r_t = S_t^T q^_t is a
signed retrieval, so `dca_jax.ops.dca_delta` adds it to the window's softmax through a per-head
gate of the input instead (module docstring there):

    gate:    o_t = N_t / Z_t + sigmoid(eta_t) r_t.

The issue asked to decide by measurement whether one normaliser would do better. The shared
variant measured here makes the memory one more entry of the window's softmax, with the logit
xi_t = eta_t + log W and the value r_t:

    shared:  o_t = (sum_window e^{s_tj} v_j + e^{xi_t} r_t) / (sum_window e^{s_tj} + e^{xi_t})
                 = (1 - lambda_t) N_t / Z_t + lambda_t r_t,   lambda_t = sigmoid(xi_t - lse_t),

lse_t = m_t + log Z_t the window's log normaliser; lambda_t = 0 while the memory has received no
token of the current document, so the T <= W equality with softmax holds as in the gated form.
The window and the memory then compete for one unit of probability mass (a confident window
match lowers the memory's weight), as with the additive memory. log W in the logit gives the
memory at initialisation (eta's bias -2, logits near 0 so lse ~ log W) the weight sigmoid(-2),
the gated form's initial gate, so neither variant starts with more memory than the other.

Each variant is trained with the same config, seed and data as the gated run it is compared
with (the corpus comparison's `lm_dca_delta`, the recall study's `recall_256_16_d128_dca_delta`:
`experiments.suite_plan`), by `experiments.suite.run_one` in this process with
`dca_delta._read_out` replaced by the shared read-out; the gated rows are read from their
records (docs/corpus_comparison.json, docs/recall_study.json), trained on 2026-12-02 to 12-04 by
the same function of the same config (the delta memory's code has changed since only in how
XLA computes it; its tests hold every form to one float64 oracle). Single seeds.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import pathlib
import sys
from typing import Any, Iterator

import jax
import jax.numpy as jnp

from dca_jax.ops import dca_delta
from dca_jax.ops.rowwise import scale_rows

# The gated runs each variant repeats: (which, suite, run name, record, record row name).
BASES = {
    "corpus": ("delta", "lm_dca_delta", "corpus_comparison.json"),
    "recall": ("recall", "recall_256_16_d128_dca_delta", "recall_study.json"),
}
SUFFIX = "_shared_readout"


def shared_read_out(num, den, memory_out, gate, *, top, live, window: int):
  """The shared-normaliser read-out (module docstring): (1 - lambda) N / Z + lambda r."""
  lse = top + jnp.log(den)                                           # [.., H]
  lam = jax.nn.sigmoid(gate + math.log(window) - lse)
  lam = jnp.where(live[..., None], lam, 0.0)
  return scale_rows(num, (1.0 - lam) / den) + scale_rows(memory_out, lam)


@contextlib.contextmanager
def shared_readout(window: int) -> Iterator[None]:
  """Within the block, DCA's delta memory reads out through `shared_read_out` (every trace made
  inside it: the whole-sequence form, which training and evaluation use, and the decode step)."""
  original = dca_delta._read_out

  def patched(num, den, memory_out, gate, *, top=None, live=None):
    return shared_read_out(num, den, memory_out, gate, top=top, live=live, window=window)

  dca_delta._read_out = patched
  jax.clear_caches()                 # no program traced with the gated read-out is reused
  try:
    yield
  finally:
    dca_delta._read_out = original
    jax.clear_caches()


def variant_run(which: str):
  """The shared-readout copy of the gated run `which` ("corpus" or "recall")."""
  from experiments import suite_plan
  suite, name, _ = BASES[which]
  base = next(r for r in suite_plan.suite_runs(suite) if r.name == name)
  return dataclasses.replace(base, name=base.name + SUFFIX,
                             label=base.label + ", shared normaliser")


def run(which: str, runs_root: pathlib.Path, *, tiny: bool = False) -> dict[str, Any]:
  """Trains (or resumes) and evaluates the variant of `which`; returns its result.json (`tiny`:
  the suite's tiny configuration, a smoke test)."""
  from experiments import bookkeeping, suite, suite_plan
  variant = variant_run(which)
  done = runs_root / variant.name / "result.json"
  if done.exists():
    return json.loads(done.read_text())
  window = suite_plan.run_config(variant, tiny=tiny).attention_options.window
  with shared_readout(window):
    result = suite.run_one(variant, runs_root, tiny=tiny)
  # The checkpoint's config is the gated run's: the record says which read-out trained it (a
  # later `experiments.evaluate` of this workdir outside `shared_readout` would use the gate).
  result["readout"] = "shared"
  bookkeeping.write_json(done, result)
  return result


def _gated_row(which: str, records: pathlib.Path) -> dict[str, Any] | None:
  _, name, record = BASES[which]
  path = records / record
  if not path.exists():
    return None
  record = json.loads(path.read_text())
  if "runs" in record:                          # docs/corpus_comparison.json: {name: row}
    return record["runs"].get(name)
  return next((r for r in record["rows"] if r.get("name") == name), None)


def collect(runs_root: pathlib.Path, records: pathlib.Path) -> dict[str, Any]:
  """{which: {"gated": row from the record, "shared": the variant's result or None}}."""
  out = {}
  for which in BASES:
    result = runs_root / variant_run(which).name / "result.json"
    out[which] = {"gated": _gated_row(which, records),
                  "shared": json.loads(result.read_text()) if result.exists() else None}
  return out


def _corpus_bpb(row: dict[str, Any] | None) -> dict[str, float]:
  """{context: bpb} of a corpus row (record row or result.json)."""
  if row is None:
    return {}
  return {int(t): v["bpb"] for t, v in row["evaluation"].items()}


def markdown(collected: dict[str, Any], date: str) -> list[str]:
  lines = ["# The delta memory's read-out: gate or shared normaliser", "",
           "Generated by `python -m experiments.readout_study render --runs runs/readout --out "
           "docs` from the runs of `python -m experiments.readout_study run --which corpus` and "
           "`--which recall` (experiments/readout_study.py defines both read-outs and the "
           f"runs); rendered {date}. Single seeds (seed 0), each variant with the config, seed "
           "and data of the gated run beside it.", ""]
  for which, pair in collected.items():
    for variant, row in pair.items():
      if row and row.get("machine"):
        m = row["machine"]
        lines.append(f"- {which}, {variant}: trained {str(row.get('date', '?'))[:10]} on "
                     f"{m.get('cpu_model', '?')} ({m.get('cpu_count', '?')} CPUs), backend "
                     f"{m.get('backend', '?')}, jax {m.get('jax', '?')}")
  lines.append("")
  corpus = collected["corpus"]
  gated, shared = _corpus_bpb(corpus["gated"]), _corpus_bpb(corpus["shared"])
  contexts = sorted(set(gated) | set(shared))
  lines += ["## Corpus (T = 256, 1000 steps): test bits per byte (lower is better)", "",
            "| read-out | " + " | ".join(f"bpb @ {t}" for t in contexts) + " |",
            "|---|" + "---:|" * len(contexts)]
  for label, bpb in (("gate (the library's)", gated), ("shared normaliser", shared)):
    lines.append(f"| {label} | " + " | ".join(
        f"{bpb[t]:.4f}" if t in bpb else "-" for t in contexts) + " |")
  recall = collected["recall"]
  lines += ["", "## MQAR (256, 16), d_model 128, lr 3e-3, stop at 0.99: answer accuracy", "",
            "| read-out | accuracy | steps | beyond the window (query-to-value distance >= W) |",
            "|---|---:|---:|---:|"]
  for label, row in (("gate (the library's)", recall["gated"]),
                     ("shared normaliser", recall["shared"])):
    if row is None:
      lines.append(f"| {label} | - | - | - |")
      continue
    accuracy = row.get("accuracy")
    if accuracy is None:
      accuracy = row["evaluation"][str(row["config"]["seq_len"])]["accuracy"]
    distance = row.get("distance") or row.get("distance_accuracy") or {}
    far = [b for b in distance.get("buckets", []) if b["lo"] >= distance.get("window", 0)]
    correct, count = sum(b["correct"] for b in far), sum(b["count"] for b in far)
    beyond = f"{correct / count:.3f}" if count else "-"
    lines.append(f"| {label} | {accuracy:.3f} | {row['steps']} | {beyond} |")
  lines.append("")
  return lines


def render(runs_root: pathlib.Path, out: pathlib.Path) -> dict[str, Any]:
  from experiments.bookkeeping import now, write_json
  collected = collect(runs_root, out)
  out.mkdir(parents=True, exist_ok=True)
  date = now()
  write_json(out / "readout_study.json", {"date": date, "runs": collected})
  (out / "readout_study.md").write_text("\n".join(markdown(collected, date)) + "\n")
  print((out / "readout_study.md").read_text())
  return collected


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  sub = parser.add_subparsers(dest="command", required=True)
  p_run = sub.add_parser("run", help="train and evaluate one variant (resumable)")
  p_run.add_argument("--which", choices=sorted(BASES), required=True)
  p_run.add_argument("--runs", default="runs/readout")
  p_run.add_argument("--tiny", action="store_true", help="the tiny configuration (smoke test)")
  p_render = sub.add_parser("render", help="write docs/readout_study.{md,json}")
  p_render.add_argument("--runs", default="runs/readout")
  p_render.add_argument("--out", default="docs")
  args = parser.parse_args(argv)
  if args.command == "run":
    run(args.which, pathlib.Path(args.runs), tiny=args.tiny)
  else:
    render(pathlib.Path(args.runs), pathlib.Path(args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
