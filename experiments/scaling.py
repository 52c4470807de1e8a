"""Sequence parallelism on paper: per-device FLOPs, bytes communicated, step-time estimates.

    python -m experiments.scaling [--out docs/scaling.md]     (arithmetic only, < 1 s)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m experiments.scaling --measure
        (adds a correctness run on 8 CPU host devices: per-device memory and times, 81 s on the
        2-core CPU, 2026-12-04)

For one attention layer's forward pass with the sequence of N tokens split over P devices
(issue #14), this counts, from closed-form operation counts (stated in the table's notes, not
measured):
- DCA: the local window + chunked memory work of N/P tokens, the all_gather of every shard's
  memory summary (P x H x F x (V+1) floats received per device) and the halo of the previous
  shard's last W tokens (W x H x (2K + F) floats) and last S - 1 layer inputs (the convolution);
- softmax with ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers"):
  the causal score and value work of N/P queries against up to N keys, and the key/value blocks
  that travel round the ring ((P - 1) x N/P x H x 2K floats received per device).
The step-time estimate is compute / (peak x utilisation) + bytes / link bandwidth (no overlap of
the two, a pessimistic choice for ring attention, which overlaps them in practice), with
published figures of an NVIDIA H100 SXM: 989 TFLOP/s dense BF16 (NVIDIA H100 Tensor Core GPU
datasheet), NVLink 900 GB/s per GPU inside an 8-GPU node (same datasheet), 50 GB/s per GPU
(one 400 Gb/s NDR InfiniBand adapter per GPU, as in NVIDIA's DGX H100 reference) beyond 8. The
sequence-parallel forms (the engines' and `attention_compress`'s `axis_name=`, the layers'
`sequence_axis=`) are tested on 8 CPU host devices in tests/multidevice; `--measure` adds one
measured run on such devices (`measure`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

from experiments.bookkeeping import machine_line, machine_info, now

BYTES = 2                                   # BF16 activations and states on the wire
PEAK_FLOPS = 989e12                         # H100 SXM, dense BF16 (datasheet)
UTILISATION = 0.4                           # assumed fraction of peak reached by attention
NVLINK_BYTES_PER_S = 900e9                  # H100 SXM NVLink, per GPU (datasheet)
NETWORK_BYTES_PER_S = 50e9                  # 400 Gb/s InfiniBand NDR per GPU beyond one node
NODE = 8                                    # GPUs per NVLink domain


@dataclasses.dataclass(frozen=True)
class Layer:
  """One attention layer: D model width, H heads, K = V head dims, W window, P_phi projected
  feature dims (F = 1 + P_phi + P_phi (P_phi + 1) / 2), C chunk, S convolution width."""

  d_model: int = 2048
  heads: int = 16
  head_dim: int = 128
  window: int = 64
  feature_proj: int = 8                   # the DCA layer's default feature_dim
  chunk: int = 64
  conv: int = 4

  @property
  def features(self) -> int:
    p = self.feature_proj
    return 1 + p + p * (p + 1) // 2


def dca_flops(layer: Layer, tokens: float) -> float:
  """Forward FLOPs of DCA's attention on `tokens` local tokens (projections excluded: they are
  the same for every layer and split perfectly)."""
  h, k, w, f, c = layer.heads, layer.head_dim, layer.window, layer.features, layer.chunk
  window = 2 * tokens * w * h * 2 * k                  # scores and weighted values
  intra = 2 * tokens * c * h * (f + k + 1)             # chunk-local scores and values
  state = 2 * 2 * tokens * h * f * (k + 1)             # write into and read from the state
  features = 2 * tokens * h * 2 * k * layer.feature_proj
  return window + intra + state + features


def softmax_flops(layer: Layer, tokens: float, total: float) -> float:
  """Causal softmax FLOPs of `tokens` queries against their keys, averaged over the ring (each
  device's queries see on average half of the `total` keys)."""
  return 2 * tokens * (total / 2) * layer.heads * 2 * layer.head_dim


def dca_bytes(layer: Layer, devices: int) -> float:
  """Bytes one device receives: the all_gather of the memory summaries and the halo."""
  if devices == 1:
    return 0.0
  h, k, f = layer.heads, layer.head_dim, layer.features
  gather = (devices - 1) * h * (f * (k + 1) + f) * BYTES
  halo = (layer.window * h * (2 * k + f) + (layer.conv - 1) * layer.d_model) * BYTES
  return gather + halo


def ring_bytes(layer: Layer, total: float, devices: int) -> float:
  """Bytes one device receives in ring attention: every other shard's keys and values."""
  return (devices - 1) * (total / devices) * layer.heads * 2 * layer.head_dim * BYTES


def link(devices: int) -> float:
  return NVLINK_BYTES_PER_S if devices <= NODE else NETWORK_BYTES_PER_S


def table(layer: Layer, totals, device_counts) -> list[dict]:
  rows = []
  for total in totals:
    for p in device_counts:
      local = total / p
      row = {"tokens": total, "devices": p,
             "dca_gflop": dca_flops(layer, local) / 1e9,
             "softmax_gflop": softmax_flops(layer, local, total) / 1e9,
             "dca_mib": dca_bytes(layer, p) / 2**20,
             "ring_mib": ring_bytes(layer, total, p) / 2**20}
      rate = PEAK_FLOPS * UTILISATION
      row["dca_ms"] = 1e3 * (row["dca_gflop"] * 1e9 / rate + dca_bytes(layer, p) / link(p))
      row["softmax_ms"] = 1e3 * (row["softmax_gflop"] * 1e9 / rate
                                 + ring_bytes(layer, total, p) / link(p))
      rows.append(row)
  return rows


def _fmt(x: float) -> str:
  if x >= 100:
    return f"{x:,.0f}"
  if x >= 1:
    return f"{x:.1f}"
  return f"{x:.3g}"


def markdown(layer: Layer, rows: list[dict]) -> list[str]:
  info = machine_info()
  lines = [
      "# Sequence parallelism: what each device computes and sends",
      "",
      "Generated by `python -m experiments.scaling` (closed-form counts, no measurement; "
      f"{now()[:10]}, on {machine_line(info)}). Assumptions and sources: the module "
      "docstring of experiments/scaling.py.",
      "",
      "## Status",
      "",
      "- Implemented and tested: `gated_linear_attention(..., axis_name=...)`, "
      "`delta_rule_attention(..., axis_name=...)` and `attention_compress(..., axis_name=...)` "
      "(DCA, either memory) inside `jax.shard_map`: one `all_gather` of a per-shard summary "
      "whose size does not depend on T, a fold of the shards before, and for DCA one `ppermute` "
      "halo of the previous shard's last W keys, values and key features (betas for the delta "
      "memory, whose entering state is the sharded delta rule's). tests/multidevice "
      "checks sharded == single device on 8 CPU host devices (2, 4 and 8 shards): outputs, "
      "final states and gradients, resets at and inside shard boundaries. Those CPU runs check "
      "correctness; they are not a speed-up (8 host devices share 2 cores).",
      "- Every layer takes `sequence_axis=` (calls only, not prefill or decoding), and so "
      "`TransformerLM` through `attention_options={\"sequence_axis\": \"seq\"}`: DCA (either "
      "memory) and the sliding window with a `ppermute` halo of the previous shard's last W "
      "keys and values; linear attention, GLA and Gated DeltaNet through the sharded engines; "
      "every short convolution with a halo of its S - 1 inputs. Softmax all-gathers the keys "
      "and values: correct, but O(T) keys per device (ring attention, the scalable form, is not "
      "implemented). tests/multidevice: each layer (4 shards; DCA's delta memory on 8; resets "
      "before, at and inside boundaries) and the LM (logits and loss gradient) equal one device.",
      "- `python -m experiments.train --mesh data=D,seq=S`: batch rows over \"data\", positions "
      "over \"seq\", parameters and optimiser state replicated, or with `--fsdp` sharded over "
      "\"data\" between steps (each device keeps 1/D of every array that an axis of it allows; "
      "the step gathers the parameters where the model reads them); one step on (2, 4) and on "
      "(8, 1), and an FSDP step on (4, 2), equals the single-device step, and a run "
      "checkpointed on one mesh (FSDP) resumes on another (replicated) "
      "(tests/multidevice/test_data_sequence_training.py).",
      "- Per-device temporary memory falls about as 1/S with S sequence shards: a slow test "
      "(tests/multidevice, `-m slow`) checks it on XLA's memory analysis, and the measured table "
      "at the end shows it.",
      "- A sharded prefill for decoding: `attention_compress(..., axis_name=..., state=..., "
      "return_state=True)` continues an incoming state on the first shard (its buffered tokens "
      "as that shard's halo, its memory as the state entering it) and returns on every shard "
      "the state after the whole sequence (the last shard's buffers and document start, the "
      "carried memory), equal to one device's; a decoding step from it equals one from the "
      "single-device state (both memories; tests/multidevice). A layer's `prefill` inside "
      "`shard_map` over its `sequence_axis` raises NotImplementedError instead of continuing "
      "one cache on every shard.",
      "- Not implemented: the layers' sharded prefill (the ops-level one above is), ring "
      "attention for softmax, FSDP's per-layer gathering (the whole parameter set is gathered "
      "once per step, so the saving is the stored parameters and optimiser state).",
      "",
      f"## One layer, forward: D = {layer.d_model}, H = {layer.heads}, K = V = "
      f"{layer.head_dim}, W = {layer.window}, F = {layer.features}, C = {layer.chunk}, "
      f"S = {layer.conv}",
      "",
      "Per device: attention FLOPs (projections excluded, they split perfectly), bytes "
      "received (BF16), and the estimated time = FLOPs / (989 TFLOP/s x 0.4) + bytes / link "
      "(900 GB/s NVLink up to 8 devices, 50 GB/s InfiniBand beyond), no overlap. Ring "
      "attention for softmax: the causal work of N/P queries against N/2 keys on average.",
      "",
      "| tokens N | devices P | DCA GFLOP | DCA MiB sent to it | DCA ms | softmax GFLOP "
      "| ring MiB | softmax ms | softmax / DCA time |",
      "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
  ]
  for r in rows:
    lines.append(f"| {r['tokens'] / 2**20:g}M | {r['devices']} | {_fmt(r['dca_gflop'])} | "
                 f"{_fmt(r['dca_mib'])} | {_fmt(r['dca_ms'])} | {_fmt(r['softmax_gflop'])} | "
                 f"{_fmt(r['ring_mib'])} | {_fmt(r['softmax_ms'])} | "
                 f"{r['softmax_ms'] / r['dca_ms']:,.0f}x |")
  lines += [
      "",
      "Reading: DCA's traffic per device is the P summaries (H x F x (V+1) each) plus one "
      "halo, independent of N; ring attention moves every key and value of the sequence "
      "through every device, N x H x 2K values, and its compute grows with N^2 / P. At 1024 "
      "devices DCA's all_gather (P x H x F x (V+1)) becomes the larger term; a tree or "
      "chunked prefix over the devices (log P steps of one summary) would bound it, and is "
      "not implemented.",
  ]
  return lines


# The measured run: one DCA layer (additive memory) with T sharded over S of 8 CPU host devices.
MEASURED = dict(d_model=128, heads=4, window=64, time=8192, batch=1)


def measure(shard_counts=(1, 2, 4, 8), repeats: int = 3) -> dict:
  """Per-device temporary memory (XLA's memory analysis of the compiled program) and wall time of
  one DCA layer's forward+backward with T sharded over S host devices, S in `shard_counts`.

  Needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8 set before JAX starts). On
  a CPU the host devices share its cores: the times show the cost of the sharded program's extra
  work (halo, summaries, fold), not a speed-up; the memory is what each device would hold.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top

  from dca_jax.nn import DCAttention  # pylint: disable=g-import-not-at-top
  from experiments.benchmark import time_interleaved  # pylint: disable=g-import-not-at-top

  if jax.device_count() < max(shard_counts):
    raise SystemExit(f"--measure needs {max(shard_counts)} devices, got {jax.device_count()}: run "
                     "it with XLA_FLAGS=--xla_force_host_platform_device_count=8")
  m = MEASURED
  x = jax.random.normal(jax.random.key(0), (m["batch"], m["time"], m["d_model"]))
  layer = DCAttention(m["d_model"], m["heads"], window=m["window"], sequence_axis="seq",
                      rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(layer)
  programs, temp = {}, {}
  for shards in shard_counts:
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:shards]), ("seq",))

    def loss(p, x, mesh=mesh):
      y = jax.shard_map(lambda p, x: nnx.merge(graphdef, p)(x), mesh=mesh,
                        in_specs=(P(), P(None, "seq")), out_specs=P(None, "seq"))(p, x)
      return jnp.sum(y ** 2)
    compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
    temp[shards] = int(compiled.memory_analysis().temp_size_in_bytes)
    programs[shards] = compiled
  timings = time_interleaved(
      {str(s): (lambda c=c: c(params, x)) for s, c in programs.items()}, repeats=repeats)
  rows = [{"shards": s, "temp_bytes_per_device": temp[s],
           "temp_vs_one_device": temp[s] / temp[shard_counts[0]],
           "forward_backward_s": timings[str(s)].median_s} for s in shard_counts]
  return {"layer": m, "devices": jax.device_count(), "repeats": repeats, "rows": rows}


def measured_markdown(result: dict) -> list[str]:
  m = result["layer"]
  lines = [
      "",
      f"## Measured on {result['devices']} CPU host devices: a correctness run, not a speed-up",
      "",
      f"One DCA layer (additive memory; d_model {m['d_model']}, {m['heads']} heads, window "
      f"{m['window']}), batch {m['batch']}, T = {m['time']}, forward+backward (`jax.grad` of a "
      "sum of squares), T sharded over S devices with `sequence_axis=\"seq\"`. The host devices "
      "share the machine's cores, so the time shows the cost of the sharded program's extra work "
      "(halo, summaries, fold) on the same cores, not a speed-up; the per-device temporary memory "
      "(XLA's memory analysis of the compiled program) is what each device would hold. Median of "
      f"{result['repeats']} calls after a warm-up, round-robin. Measured {result['date']} on "
      f"{result['machine']}; command: `XLA_FLAGS=--xla_force_host_platform_device_count=8 python "
      "-m experiments.scaling --measure`.",
      "",
      "| S | temp MiB per device | vs S = 1 | 1/S | forward+backward s |",
      "|---:|---:|---:|---:|---:|",
  ]
  for r in result["rows"]:
    lines.append(f"| {r['shards']} | {r['temp_bytes_per_device'] / 2**20:,.1f} | "
                 f"{r['temp_vs_one_device']:.3f} | {1 / r['shards']:.3f} | "
                 f"{r['forward_backward_s']:.3f} |")
  return lines


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="docs/scaling.md")
  parser.add_argument("--measure", action="store_true",
                      help="also measure on 8 CPU host devices (writes the .json beside --out); "
                           "without it the last measured run in that .json is kept")
  args = parser.parse_args(argv)
  layer = Layer()
  rows = table(layer, [2**20, 2**22, 2**24], [1, 8, 64, 1024])
  path = pathlib.Path(args.out)
  measured_path = path.with_suffix(".json")
  measured = None
  if args.measure:
    measured = measure()
    measured.update(date=now()[:10], machine=machine_line(machine_info()))
    measured_path.write_text(json.dumps(measured, indent=2) + "\n")
    print(f"wrote {measured_path}")
  elif measured_path.exists():
    measured = json.loads(measured_path.read_text())
  lines = markdown(layer, rows)
  if measured is not None:
    lines += measured_markdown(measured)
  path.write_text("\n".join(lines) + "\n")
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
