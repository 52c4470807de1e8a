"""How DCA's memory scores relate to its window scores, measured on a trained model (issue #15).

Usage:
  python -m experiments.score_study --workdir runs/corpus/lm_dca --out docs   # docs/score_study.*

DCA scores a key inside the window with the softmax logit s_tj = (R_t q_t) . (R_j k_j) / sqrt(K)
(rotary R at the tokens' positions), and a key that has left the window with the memory's kernel
kappa_tj = phi(q_t) . phi(k_j) = 1 + u + u^2 / 2, where u = p_t . p_j / sqrt(P) compares learned
projections p of the same queries and keys to P dims, without positions, decayed by the product
of the decays since the key entered the memory. Both answer to one normaliser (dca_jax/ops/dca.py):

    o_t = (sum_window e^{s_tj} v_j + sum_memory w_tj v_j) / (sum_window e^{s_tj} + sum_memory w_tj),
    w_tj = exp(sum_{i = j+W+1..t} log a_i) kappa_tj.

The kernel is not a monotone function of u (it falls to 1/2 at u = -1 and rises again below), so
it does not approximate exp(u). This study measures, per layer and head, on test text of the run's
corpus at a context longer than the window:

* how the two scores agree where both are defined (keys inside the window): Spearman's rank
  correlation of s_tj and log kappa_tj, and Pearson's correlation of s_tj and u_tj (the letters
  of docs/theory.md, sections 1 and 5);
* how much of the attention mass the memory holds, by the query's distance from the start of the
  row (units of W);
* how often a memory pair sits on the falling branch u < -1, and the share of memory mass there.

The weights are recomputed here in float64 from the layer's own `compute_weights` output, and the
outputs they give are checked against the layer's `attention_compress` (the largest difference is
reported): the study measures the mechanism that runs, not a model of it.
"""

from __future__ import annotations

import argparse
import json
import contextlib
import math
import pathlib
import sys
from typing import Any, Iterator, Sequence

import numpy as np

# Distance of the query from the row's start, in units of W: the memory holds tokens only from
# t >= W on.
SHARE_EDGES = (1, 2, 4, 8, 16)


@contextlib.contextmanager
def recording() -> Iterator[list[dict[str, Any]]]:
  """Records every DCAttention layer's weights and attention output while active (eager calls)."""
  from dca_jax.nn import dca as dca_layer
  original = dca_layer.ops.attention_compress
  records: list[dict[str, Any]] = []

  def wrapped(weights, **kwargs):
    out = original(weights, **kwargs)
    records.append({"weights": weights, "output": out, "window": kwargs["window"],
                    "rotary_base": kwargs.get("rotary_base"), "reset": kwargs.get("reset")})
    return out

  dca_layer.ops.attention_compress = wrapped
  try:
    yield records
  finally:
    dca_layer.ops.attention_compress = original


def _rank(x: np.ndarray) -> np.ndarray:
  order = np.argsort(x, kind="stable")
  ranks = np.empty(len(x))
  ranks[order] = np.arange(len(x))
  return ranks


def _corr(a: np.ndarray, b: np.ndarray) -> float:
  a, b = a - a.mean(), b - b.mean()
  denom = math.sqrt(float((a * a).sum() * (b * b).sum()))
  return float((a * b).sum() / denom) if denom > 0 else float("nan")


def head_scores(q, k, v, q_features, k_features, log_decay, doc, *, window: int,
                rotary_base: float | None, projection_dim: int) -> dict[str, np.ndarray]:
  """One head of one row, float64: window logits, memory kernels and weights, and the output.

  Args (numpy, one batch row and head): q, k [T, K] (before rotary), v [T, V], q_features,
  k_features [T, F] (Taylor features of the projections), log_decay [T], doc [T] document ids;
  projection_dim: P, whose linear features phi[1:P+1] = p / P^(1/4) give u = p . p' / sqrt(P).

  Returns:
    dict of [T, T] arrays s (window logits), kappa, u (projection similarity), weight (memory
    weights, 0 outside the memory), window_mass, the in_window and in_memory masks, and the
    [T, V] output.
  """
  from dca_jax.ops.rotary import frequencies_numpy
  t_len, key_dim = q.shape
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  if rotary_base is not None:
    freqs = frequencies_numpy(key_dim, rotary_base)
    angle = np.arange(t_len)[:, None] * freqs[None, :]
    cos, sin = np.cos(angle), np.sin(angle)

    def rotate(x):
      half = key_dim // 2
      a, b = x[:, :half], x[:, half:]
      return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)
    q, k = rotate(q), rotate(k)
  logits = q @ k.T / math.sqrt(key_dim)
  phi_q, phi_k = np.asarray(q_features, np.float64), np.asarray(k_features, np.float64)
  kappa = phi_q @ phi_k.T
  lin = slice(1, 1 + projection_dim)
  sim = phi_q[:, lin] @ phi_k[:, lin].T          # p . p' / sqrt(P): each side carries P^(-1/4)
  t = np.arange(t_len)
  same = np.asarray(doc)[:, None] == np.asarray(doc)[None, :]
  in_window = (t[None, :] <= t[:, None]) & (t[None, :] > t[:, None] - window) & same
  in_memory = (t[None, :] <= t[:, None] - window) & same
  cum = np.cumsum(np.asarray(log_decay, np.float64))
  # Token j enters the memory at step j + W and is decayed at every later step.
  entry = np.minimum(t + window, t_len - 1)
  fade = np.where(in_memory, cum[:, None] - cum[entry][None, :], -np.inf)
  weight = np.where(in_memory, np.exp(fade) * kappa, 0.0)
  m = np.where(in_window, logits, -np.inf).max(axis=1, keepdims=True)
  e = np.where(in_window, np.exp(logits - m), 0.0)
  num = e @ v + np.exp(-m) * (weight @ v)
  den = e.sum(1, keepdims=True) + np.exp(-m) * weight.sum(1, keepdims=True)
  return {"s": logits, "kappa": kappa, "u": sim, "weight": weight, "window_mass": e * np.exp(m),
          "in_window": in_window, "in_memory": in_memory, "output": num / den}


def layer_report(record: dict[str, Any], projection_dim: int) -> dict[str, Any]:
  """Per head: score agreement, memory share by distance, the falling branch; and the check."""
  w = record["weights"]
  window = record["window"]
  arrays = {name: np.asarray(getattr(w, name)) for name in
            ("q", "k", "v", "q_features", "k_features", "log_decay")}
  if arrays["log_decay"].ndim != 3:
    raise ValueError("score_study needs one decay per head (decay='head'), got log_decay of "
                     f"shape {arrays['log_decay'].shape}.")
  batch, t_len, heads, _ = arrays["q"].shape
  reset = record["reset"]
  docs = (np.zeros((batch, t_len), np.int64) if reset is None
          else np.cumsum(np.asarray(reset), axis=1))
  output = np.asarray(record["output"], np.float64)
  edges = [e * window for e in SHARE_EDGES if e * window < t_len] + [t_len]
  heads_out, worst = [], 0.0
  for h in range(heads):
    spearman, pearson, falling, falling_mass, shares = [], [], [], [], []
    for b in range(batch):
      r = head_scores(*(arrays[n][b, :, h] for n in ("q", "k", "v", "q_features", "k_features",
                                                     "log_decay")), docs[b], window=window,
                      rotary_base=record["rotary_base"], projection_dim=projection_dim)
      worst = max(worst, float(np.abs(r["output"] - output[b, :, h]).max()))
      iw, im = r["in_window"], r["in_memory"]
      spearman.append(_corr(_rank(r["s"][iw]), _rank(np.log(r["kappa"][iw]))))
      pearson.append(_corr(r["s"][iw], r["u"][iw]))
      if im.any():
        falling.append(float((r["u"][im] < -1).mean()))
        mem_mass = r["weight"].sum()
        falling_mass.append(float(r["weight"][im & (r["u"] < -1)].sum() / mem_mass)
                            if mem_mass > 0 else 0.0)
      memory = r["weight"].sum(1)
      share = memory / (memory + r["window_mass"].sum(1))
      shares.append([float(share[lo:hi].mean()) if hi > lo else float("nan")
                     for lo, hi in zip(edges, edges[1:])])
    heads_out.append({
        "head": h, "spearman_l_log_kappa": float(np.mean(spearman)),
        "pearson_l_s": float(np.mean(pearson)),
        "falling_branch_pairs": float(np.mean(falling)) if falling else None,
        "falling_branch_memory_mass": float(np.mean(falling_mass)) if falling_mass else None,
        "memory_share": [float(x) for x in np.nanmean(np.array(shares), axis=0)]})
  return {"window": window, "heads": heads_out, "max_abs_output_difference": worst,
          "share_buckets": [f"[{lo}, {hi})" for lo, hi in zip(edges, edges[1:])]}


def measure(workdir: str | pathlib.Path, *, seq_len: int = 1024, batch_size: int = 4,
            split: str = "test") -> dict[str, Any]:
  """Runs the trained model of `workdir` eagerly on one batch of `split` and reports each layer."""
  from experiments import checkpoints as checkpoints_lib
  from experiments import tasks as tasks_lib
  from experiments.bookkeeping import machine_info, now

  config, model, step = checkpoints_lib.load_checkpoint(workdir)
  options = config.attention_options
  if config.attention != "dca" or getattr(options, "memory", "additive") != "additive":
    raise ValueError(f"score_study needs a DCA run with the additive memory, got attention "
                     f"{config.attention!r} with options {options}.")
  if seq_len < 2 * options.window:
    raise ValueError(f"seq_len must be at least twice the window to reach the memory, got "
                     f"{seq_len}.")
  task = tasks_lib.make_task(config)
  batch = next(iter(task.eval_batches(split, seq_len, batch_size, 1)))
  with recording() as records:
    model(batch["tokens"], **({"reset": batch["reset"]} if "reset" in batch else {}))
  projection_dim = int(options.feature_dim)
  layers = [layer_report(r, projection_dim) for r in records]
  return {"workdir": str(workdir), "step": step, "seq_len": seq_len, "batch_size": batch_size,
          "split": split, "config": {"d_model": config.d_model, "num_layers": config.num_layers,
                                     "num_heads": config.num_heads,
                                     "attention_options": {
                                         k: v for k, v in vars(options).items()
                                         if isinstance(v, (int, float, str, bool, type(None)))},
                                     "seq_len": config.seq_len},
          "layers": layers, "machine": machine_info(), "date": now()}


def markdown(result: dict[str, Any]) -> list[str]:
  from experiments.bookkeeping import machine_line
  fmt = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
  c = result["config"]
  lines = ["# Memory scores against window scores on a trained DCA model", "",
           f"Generated by `python -m experiments.score_study --workdir {result['workdir']} "
           f"--seq-len {result['seq_len']}` ({result['date'][:10]}, "
           f"{machine_line(result['machine'])}). Model: the corpus comparison's DCA run "
           f"({c['num_layers']} layers, d_model {c['d_model']}, {c['num_heads']} heads, "
           f"options {c['attention_options']}, trained at T = {c['seq_len']}, step "
           f"{result['step']}); {result['batch_size']} rows of {result['seq_len']} bytes of the "
           f"{result['split']} split, each from an empty context. The module docstring "
           "(experiments/score_study.py) defines every column.", "",
           "Weights recomputed in float64 from the layer's own `compute_weights` reproduce its "
           "`attention_compress` outputs to "
           + ", ".join(f"{l['max_abs_output_difference']:.1e}" for l in result["layers"])
           + " (largest absolute difference per layer).", "",
           "## Do the two scores agree where both are defined (keys inside the window)?", "",
           "Spearman: rank correlation of the window logit s and the memory kernel log kappa "
           "over the same (query, key) pairs; Pearson: correlation of s and the projections' "
           "similarity u (the letters of docs/theory.md, sections 1 and 5). 1 would mean the "
           "memory ranks keys as the window does.", "",
           "| layer | head | Spearman(s, log kappa) | Pearson(s, u) | memory pairs with u < -1 "
           "| memory mass there |", "|---:|---:|---:|---:|---:|---:|"]
  for i, layer in enumerate(result["layers"]):
    for h in layer["heads"]:
      lines.append(f"| {i} | {h['head']} | {fmt(h['spearman_l_log_kappa'])} | "
                   f"{fmt(h['pearson_l_s'])} | {fmt(h['falling_branch_pairs'])} | "
                   f"{fmt(h['falling_branch_memory_mass'])} |")
  buckets = result["layers"][0]["share_buckets"]
  lines += ["", "## How much of the attention mass the memory holds", "",
            "Mean over queries at distance t from the row's start (in tokens) of the memory's "
            "share of the normaliser, sum_memory w / (sum_window e^s + sum_memory w).", "",
            "| layer | head | " + " | ".join(f"t in {b}" for b in buckets) + " |",
            "|---:|---:|" + "---:|" * len(buckets)]
  for i, layer in enumerate(result["layers"]):
    for h in layer["heads"]:
      lines.append(f"| {i} | {h['head']} | " + " | ".join(fmt(x) for x in h["memory_share"])
                   + " |")
  lines.append("")
  return lines


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default="runs/corpus/lm_dca")
  parser.add_argument("--seq-len", type=int, default=1024)
  parser.add_argument("--batch-size", type=int, default=4)
  parser.add_argument("--out", default="docs")
  parser.add_argument("--render-only", action="store_true",
                      help="measure nothing: rewrite the .md from the .json in --out")
  args = parser.parse_args(argv)
  from experiments.bookkeeping import write_json
  out = pathlib.Path(args.out)
  if args.render_only:
    result = json.loads((out / "score_study.json").read_text())
  else:
    result = measure(args.workdir, seq_len=args.seq_len, batch_size=args.batch_size)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "score_study.json", result)
  (out / "score_study.md").write_text("\n".join(markdown(result)) + "\n")
  print("\n".join(markdown(result)))
  return 0


if __name__ == "__main__":
  sys.exit(main())
