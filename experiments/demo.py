"""The README's main job: DCA against softmax attention on the embedded corpus, in a few minutes.

Usage:
  python -m experiments.demo [--out runs/demo] [--steps 300] [--lengths 1024,4096,8192]

1. Builds the default corpus (Python's standard library source and docs: nothing downloaded).
2. Trains a small byte-level DCA model and a softmax model of the same size (configs `lm_dca`
   and `lm_softmax`: 2 layers, d_model 128, T = 256, the same data, optimiser and steps), with
   progress bars, and prints their validation bits per byte side by side.
3. Generates a sample with the DCA model through its constant-size decode cache and prints the
   cache's size next to the softmax KV cache a context of the same length would need.
4. Measures one attention layer (d_model 256, 4 heads, batch 1) of each kind, forward and
   backward, at a few sequence lengths, round-robin after warm-up (median of 3), and prints time
   and XLA's peak temporary memory vs T.

Takes about 4 minutes on a 2-core CPU (most of it training). Everything it prints is measured in
this run; `--out` keeps the two training workdirs (checkpoints, metrics) and `demo.json`.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dca_jax.nn import DCAttention, SoftmaxAttention, generate
from experiments import benchmark, bookkeeping, report
from experiments import configs as configs_lib
from experiments import checkpoints as checkpoints_lib
from experiments import corpus as corpus_lib
from experiments import model as model_lib
from experiments import train as train_lib


def train_pair(out: pathlib.Path, steps: int) -> dict[str, Any]:
  """Trains lm_dca and lm_softmax for `steps` steps each; returns name -> summary."""
  summaries = {}
  for name in ("lm_dca", "lm_softmax"):
    config = configs_lib.load_config(name, overrides={"steps": steps, "eval_every": 0,
                                                      "checkpoint_every": steps})
    workdir = out / name
    resume = checkpoints_lib.latest_step(workdir) is not None
    print(f"\n== training {name}: {config.attention} attention, d_model {config.d_model}, "
          f"{config.num_layers} layers, {steps} steps of {config.batch_size} x {config.seq_len} "
          f"bytes ==", flush=True)
    start = time.perf_counter()
    summary = train_lib.train(config, workdir, resume=resume)
    summary["wall_s"] = time.perf_counter() - start
    summary["num_params"] = checkpoints_lib.read_run(workdir)["num_params"]
    summaries[name] = summary
  return summaries


def sample_dca(out: pathlib.Path, length: int = 200) -> dict[str, Any]:
  """A sample from the trained DCA model, with the cache sizes of DCA and softmax."""
  config, model, _ = checkpoints_lib.load_checkpoint(out / "lm_dca")
  prompt_text = b"def __init__(self"
  prompt = jnp.asarray(np.frombuffer(prompt_text, np.uint8).astype(np.int32))[None]
  start = time.perf_counter()
  tokens = generate(model, prompt, max_new_tokens=length, rng=jax.random.key(0),
                    temperature=0.7, top_k=40)
  seconds = time.perf_counter() - start
  text = bytes(np.asarray(tokens[0]).astype(np.uint8)).decode("utf-8", errors="replace")
  softmax_config = configs_lib.load_config("lm_softmax")
  softmax = nnx.eval_shape(lambda: model_lib.build_model(softmax_config))
  sizes = {}
  for context in (1024, 1 << 20):
    sizes[context] = {
        name: benchmark.tree_bytes(jax.eval_shape(lambda m=m: m.init_cache(1, context)))
        for name, m in (("dca", model), ("softmax", softmax))}
  return {"prompt": prompt_text.decode(), "text": text, "seconds": seconds, "cache_bytes": sizes}


def layer_table(lengths: Sequence[int], repeats: int = 3) -> list[dict[str, Any]]:
  """Forward+backward time and XLA temp memory of one DCA and one softmax layer vs T."""
  layers = {"DCA": DCAttention(256, 4, rngs=nnx.Rngs(0)),
            "softmax": SoftmaxAttention(256, 4, rngs=nnx.Rngs(0))}
  runner = benchmark.Runner(log_width=None)
  rows = []
  for length in lengths:
    x = jax.random.normal(jax.random.key(length), (1, length, 256))
    records, cases = {}, []
    for name, layer in layers.items():
      graphdef, state = nnx.split(layer)

      def loss(state, x, graphdef=graphdef):
        return jnp.sum(nnx.merge(graphdef, state)(x) ** 2)
      records[name] = {}
      cases.append(benchmark.Case(name, "fwd+bwd", records[name],
                                  fn=jax.grad(loss, argnums=(0, 1)), args=(state, x)))
    runner.measure(cases, length, repeats=repeats)
    rows.append({"T": length, **{f"{n}_s": r["median_s"] for n, r in records.items()},
                 **{f"{n}_temp_bytes": r["temp_bytes"] for n, r in records.items()}})
    print(f"  measured T = {length}", flush=True)
  return rows


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="runs/demo", help="directory for the runs and demo.json")
  parser.add_argument("--steps", type=int, default=300, help="training steps per model")
  parser.add_argument("--lengths", default="1024,4096,8192",
                      help="sequence lengths of the layer table")
  parser.add_argument("--sample", type=int, default=200, help="bytes to generate")
  parser.add_argument("--record", default=None,
                      help="also write demo.json here (docs/demo.json: the run the README quotes)")
  args = parser.parse_args(argv)
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  lengths = [int(x) for x in args.lengths.split(",") if x.strip()]
  start = time.perf_counter()

  corpus = corpus_lib.build_default_corpus()
  info = dict(corpus.info)
  sizes = info["bytes"]
  print(f"corpus: {corpus.name}, {sum(sizes.values()):,} bytes (train {sizes['train']:,}, "
        f"validation {sizes['validation']:,}, test {sizes['test']:,}), sha256 "
        f"{info['sha256'][:16]}...", flush=True)
  summaries = train_pair(out, args.steps)
  print("\n== validation bits per byte (lower is better) ==")
  print(f"{'model':<12} {'params':>9} {'val bpb':>8} {'train time':>11}")
  for name, s in summaries.items():
    bpb = s["validation"]["val_bpb"] if s["validation"] else float("nan")
    print(f"{name:<12} {s['num_params']:>9,} {bpb:>8.4f} {s['wall_s']:>10.1f}s")

  print("\n== a sample from the DCA model (constant-size cache) ==")
  sample = sample_dca(out, args.sample)
  print(sample["prompt"] + sample["text"])
  print(f"\n({args.sample} bytes in {sample['seconds']:.1f} s including compilation)")
  for context, sizes in sample["cache_bytes"].items():
    print(f"decode cache for a {context:,}-byte context: DCA {report.format_bytes(sizes['dca'])}"
          f", softmax {report.format_bytes(sizes['softmax'])}")

  print("\n== one attention layer (d_model 256, 4 heads, batch 1), forward + backward ==")
  rows = layer_table(lengths)
  print(f"{'T':>7} {'DCA':>10} {'softmax':>10} {'speed-up':>9} {'DCA mem':>10} {'softmax mem':>12}")
  for r in rows:
    print(f"{r['T']:>7} {report.format_seconds(r['DCA_s']):>10} "
          f"{report.format_seconds(r['softmax_s']):>10} {r['softmax_s'] / r['DCA_s']:>8.2f}x "
          f"{report.format_bytes(r['DCA_temp_bytes']):>10} "
          f"{report.format_bytes(r['softmax_temp_bytes']):>12}")
  total = time.perf_counter() - start
  print(f"\ndone in {total / 60:.1f} min; full benchmarks: python -m experiments.benchmark_layers, "
        f"python -m experiments.suite (see docs/benchmark_results.md)")
  result = {"summaries": summaries, "sample": sample, "layers": rows, "total_s": total,
            "machine": bookkeeping.machine_info(), "corpus": {"name": corpus.name, **info}}
  bookkeeping.write_json(out / "demo.json", result)
  if args.record:
    bookkeeping.write_json(pathlib.Path(args.record), result)
  return 0


if __name__ == "__main__":
  sys.exit(main())
