"""Exports a trained `TransformerLM` for runtimes without JAX: ONNX and StableHLO, plus a manifest.

Usage:
  python -m experiments.export --workdir runs/lm_dca --out exports/lm_dca [--int8]
      [--prefill-length 64] [--max-length 4096] [--batch N] [--step S]

Writes in --out:
  decode_step.onnx, prefill.onnx   (token(s), past.<cache>...) -> (logits, present.<cache>...)
                                   (DCA's decode step written by dca_jax.nn.onnx_graph, the
                                   rest by jax2onnx; each program's "converter" says which)
  decode_step.stablehlo, prefill.stablehlo   `jax.export` serialisations of the same functions
  decode_step.int8.onnx, prefill.int8.onnx   with --int8: ONNX Runtime's dynamic quantisation
                                   (int8 weights of the matrix products, activations quantised
                                   on the fly)
  manifest.json                    vocabulary, cache layout, model config, prefill length,
                                   max_length, batch (symbolic "B" or fixed), the check against
                                   JAX, sha256 and size of every file

The batch size is symbolic ("B": any batch runs) unless the layer's code needs a concrete one
(softmax attention sizes its score matrix from it) or `--batch` fixes it; the manifest records
it per program, with the exporter's reason for a fallback. Before writing, each ONNX program is
run by ONNX Runtime against JAX (a prefill and a few decode steps from an empty cache, at two
batch sizes when symbolic); a symbolic-batch program that disagrees is re-exported with a fixed
batch. `python experiments/onnx_generate.py --model DIR --prompt TEXT --tokens N` runs the
result with NumPy and ONNX Runtime only. Needs the `[export]` extra.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import re
import sys
import time
from typing import Any

import jax
import numpy as np

from dca_jax.nn import export as export_lib
from experiments import checkpoints as checkpoints_lib
from experiments.bookkeeping import git_commit, now

# Programs an export holds: name -> prefill (True) or decode step (False).
PROGRAMS = {"decode_step": False, "prefill": True}
# The agreement an exported program must reach against JAX before it is written.
CHECK_RTOL = 1e-4
MANIFEST_VERSION = 1


def sha256(path: str | os.PathLike[str]) -> str:
  """The hex sha256 of a file."""
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


def relative_error(got: Any, want: Any) -> float:
  """max |got - want| / max(max |want|, 1e-30) over one array (booleans and ints: 0 or inf)."""
  got, want = np.asarray(got), np.asarray(want)
  if got.shape != want.shape:
    return float("inf")
  if not np.issubdtype(want.dtype, np.floating):
    return 0.0 if np.array_equal(got, want) else float("inf")
  scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-30)
  return float(np.max(np.abs(got.astype(np.float64) - want))) / scale if want.size else 0.0


def _check_onnx(model: Any, layout: Any, data: dict[str, bytes], batch: int | str,
                prefill_length: int, max_length: int, steps: int = 4) -> float:
  """ONNX Runtime against JAX: one prefill then `steps` decode steps from an empty cache, at
  batch 1 and 3 when symbolic; the worst relative error over logits and cache arrays."""
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel

  options = ort.SessionOptions()
  options.log_severity_level = 3
  sessions = {name: ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
              for name, blob in data.items()}
  jax_fns = {"decode_step": jax.jit(export_lib.decode_step_function(model, max_length)),
             "prefill": jax.jit(export_lib.prefill_function(model, max_length))}
  worst = 0.0
  rng = np.random.default_rng(0)
  steps = min(steps, max_length - prefill_length)
  for b in ((1, 3) if batch == "B" else (batch,)):
    cache = export_lib.init_cache_arrays(layout, b)
    feeds = [("prefill", rng.integers(0, 256, (b, prefill_length), dtype=np.int32))]
    feeds += [("decode_step", rng.integers(0, 256, (b,), dtype=np.int32)) for _ in range(steps)]
    for name, tokens in feeds:
      session = sessions[name]
      got = session.run(None, dict(zip([i.name for i in session.get_inputs()], [tokens, *cache])))
      want = [np.asarray(x) for x in jax_fns[name](tokens, *cache)]
      worst = max(worst, *(relative_error(g, w) for g, w in zip(got, want)))
      cache = want[1:]
  return worst


def export_model(model: Any, out: str | os.PathLike[str], *, prefill_length: int = 64,
                 max_length: int = 4096, batch: int | None = None, int8: bool = False,
                 extra: dict[str, Any] | None = None, log: Any = print) -> dict[str, Any]:
  """Writes the programs and manifest of `model` in `out` (see the module docstring).

  Args:
    model: a `TransformerLM`.
    out: the output directory (created).
    prefill_length: P, the prefill program's fixed number of tokens.
    max_length: L of the cache (the most tokens a softmax model's cache holds; constant-size
      caches ignore it).
    batch: None tries a symbolic batch; an integer fixes it.
    int8: also write the dynamically quantised ONNX programs.
    extra: more entries for the manifest (e.g. the run's config and step).
    log: where progress lines go.

  Returns:
    The manifest (also written to out/manifest.json).

  Raises:
    ValueError / NotImplementedError: an export that fails (naming layer and primitive) or an
      ONNX program that disagrees with JAX by more than CHECK_RTOL.
  """
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  config = model.config
  if max_length < prefill_length:
    raise ValueError(f"max_length must be >= prefill_length = {prefill_length}, got {max_length}.")
  layout = export_lib.cache_layout(model, max_length)
  symbolic = batch is None
  fixed = 1 if batch is None else batch
  programs: dict[str, Any] = {}
  onnx_data: dict[str, bytes] = {}
  onnx_results: dict[str, Any] = {}
  for name, is_prefill in PROGRAMS.items():
    length = prefill_length if is_prefill else None
    start = time.perf_counter()
    result = export_lib.export_onnx(model, max_length, prefill_length=length,
                                    fallback_batch=fixed, symbolic_batch=symbolic)
    onnx_results[name] = (result, time.perf_counter() - start)
    onnx_data[name] = result.data
  # One check of both ONNX programs against JAX; a symbolic batch that disagrees is redone fixed.
  batches = {r.batch for r, _ in onnx_results.values()}
  error = _check_onnx(model, layout, onnx_data, "B" if batches == {"B"} else fixed,
                      prefill_length, max_length)
  if error > CHECK_RTOL and "B" in batches:
    log(f"symbolic-batch ONNX programs disagree with JAX (relative error {error:.2e}): "
        f"re-exporting with batch {fixed}")
    for name, is_prefill in PROGRAMS.items():
      length = prefill_length if is_prefill else None
      result = export_lib.export_onnx(model, max_length, prefill_length=length,
                                      fallback_batch=fixed, symbolic_batch=False)
      reason = f"the symbolic-batch program disagreed with JAX (relative error {error:.2e})"
      onnx_results[name] = (export_lib.ExportResult(result.data, fixed, reason),
                            onnx_results[name][1])
      onnx_data[name] = result.data
    error = _check_onnx(model, layout, onnx_data, fixed, prefill_length, max_length)
  if error > CHECK_RTOL:
    raise ValueError(f"the ONNX programs of attention {config.attention!r} disagree with JAX: "
                     f"relative error {error:.2e} > {CHECK_RTOL}.")
  for name, is_prefill in PROGRAMS.items():
    result, seconds = onnx_results[name]
    (out / f"{name}.onnx").write_bytes(result.data)
    in_names, out_names = export_lib.io_names(layout, is_prefill)
    programs[f"{name}.onnx"] = {"format": "onnx", "program": name, "batch": result.batch,
                                "batch_fallback_reason": result.fallback_reason,
                                "converter": result.converter,
                                "inputs": in_names, "outputs": out_names,
                                "export_seconds": round(seconds, 2)}
    log(f"{name}.onnx: batch {result.batch}, {len(result.data):,} bytes, {seconds:.1f} s "
        f"({result.converter})")
    start = time.perf_counter()
    hlo = export_lib.export_stablehlo(model, max_length, prefill_length=prefill_length if is_prefill
                                      else None, fallback_batch=fixed, symbolic_batch=symbolic)
    (out / f"{name}.stablehlo").write_bytes(hlo.data)
    programs[f"{name}.stablehlo"] = {"format": "stablehlo", "program": name, "batch": hlo.batch,
                                     "batch_fallback_reason": hlo.fallback_reason,
                                     "inputs": in_names, "outputs": out_names,
                                     "export_seconds": round(time.perf_counter() - start, 2)}
    log(f"{name}.stablehlo: batch {hlo.batch}, {len(hlo.data):,} bytes")
  if int8:
    for name in PROGRAMS:
      source = out / f"{name}.onnx"
      target = out / f"{name}.int8.onnx"
      quantize_int8(source, target)
      programs[f"{name}.int8.onnx"] = {**programs[f"{name}.onnx"], "format": "onnx",
                                       "quantization": "dynamic int8 weights (QInt8, "
                                       "onnxruntime.quantization.quantize_dynamic)"}
      log(f"{target.name}: {target.stat().st_size:,} bytes (fp32 {source.stat().st_size:,})")
  for file, entry in programs.items():
    entry["bytes"] = (out / file).stat().st_size
    entry["sha256"] = sha256(out / file)
  manifest = {
      "manifest_version": MANIFEST_VERSION,
      "vocabulary": {"kind": "bytes", "size": config.vocab_size,
                     "description": "token id i is the byte value i (UTF-8 text is fed and "
                                    "printed byte by byte; no special tokens)"},
      "model_config": {**{k: v for k, v in vars(config).items() if k != "attention_options"},
                       "attention_options": config.attention_kwargs},
      "attention": config.attention,
      "prefill_length": prefill_length,
      "prefill_lengths": [prefill_length],
      "max_length": max_length,
      # True when no cache array grows with max_length (every layer but softmax attention).
      "constant_size_cache": [e.shape for e in layout] == [
          e.shape for e in export_lib.cache_layout(model, max_length + 1)],
      "cache": [e.to_dict() for e in layout],
      "cache_bytes_per_row": int(sum(np.prod(e.concrete_shape(1)) * np.dtype(e.dtype).itemsize
                                     for e in layout)),
      "programs": programs,
      "files": {file: {"sha256": p["sha256"], "bytes": p["bytes"]} for file, p in programs.items()},
      "check_against_jax": {"max_relative_error": error, "rtol": CHECK_RTOL},
      "software": {"jax": jax.__version__, **_versions()},
      "git_commit": git_commit(),
      "date": now(),
      **(extra or {}),
  }
  (out / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str) + "\n")
  return manifest


def _versions() -> dict[str, str]:
  versions = {}
  for module in ("jax2onnx", "onnx", "onnxruntime"):
    try:
      from importlib import metadata  # pylint: disable=import-outside-toplevel
      versions[module] = metadata.version(module)
    except Exception:  # noqa: BLE001
      versions[module] = "unknown"
  return versions


def _einsum_as_matmul(equation: str) -> bool | None:
  """For an Einsum "<x>c,cd-><x>d" (a dense layer on any leading dims): False; for
  "<x>c,dc-><x>d": True (the weight is transposed); None for anything else."""
  match = re.fullmatch(r"([a-z]*)([a-z]),([a-z])([a-z])->([a-z]*)([a-z])", equation.replace(" ", ""))
  if not match:
    return None
  lead, contracted, w0, w1, out_lead, out_last = match.groups()
  if lead != out_lead or len(set(lead + contracted + w0 + w1)) != len(lead) + 2:
    return None
  if (w0, w1) == (contracted, out_last):
    return False
  if (w0, w1) == (out_last, contracted):
    return True
  return None


def _gemm_to_matmul(model: Any) -> int:
  """Rewrites dense layers with a constant weight (Gemm, or Einsum "...c,cd->...d") as MatMul
  (+ Add for a Gemm's bias), in place; returns how many.

  jax2onnx writes dense layers as Gemm or Einsum, which ONNX Runtime's dynamic quantisation
  leaves in float32 (it quantises MatMul); the MatMul form lets it store the weights as int8.
  """
  import onnx  # pylint: disable=import-outside-toplevel
  from onnx import helper, numpy_helper  # pylint: disable=import-outside-toplevel

  inits = {t.name: t for t in model.graph.initializer}
  nodes, count = [], 0
  for node in model.graph.node:
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    equation = attrs.get("equation", b"")
    equation = equation.decode() if isinstance(equation, bytes) else str(equation)
    transposed = _einsum_as_matmul(equation)
    if node.op_type == "Einsum" and len(node.input) == 2 and node.input[1] in inits and (
        transposed is not None):
      weight = numpy_helper.to_array(inits[node.input[1]])
      name = f"{node.input[1]}_matmul_{count}"
      model.graph.initializer.append(numpy_helper.from_array(
          (weight.T if transposed else weight).copy(), name))
      nodes.append(helper.make_node("MatMul", [node.input[0], name], [node.output[0]],
                                    name=node.name + "_matmul"))
      count += 1
      continue
    if (node.op_type != "Gemm" or node.input[1] not in inits or attrs.get("transA", 0)
        or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) not in (0.0, 1.0)):
      nodes.append(node)
      continue
    weight = numpy_helper.to_array(inits[node.input[1]])
    if attrs.get("transB", 0):
      weight = weight.T
    name = f"{node.input[1]}_matmul_{count}"
    model.graph.initializer.append(numpy_helper.from_array(weight.copy(), name))
    has_bias = len(node.input) > 2 and node.input[2] and attrs.get("beta", 1.0) == 1.0
    product = node.output[0] + "_matmul" if has_bias else node.output[0]
    nodes.append(helper.make_node("MatMul", [node.input[0], name], [product],
                                  name=node.name + "_matmul"))
    if has_bias:
      nodes.append(helper.make_node("Add", [product, node.input[2]], [node.output[0]],
                                    name=node.name + "_bias"))
    count += 1
  del model.graph.node[:]
  model.graph.node.extend(nodes)
  onnx.checker.check_model(model)
  return count


def quantize_int8(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> None:
  """ONNX Runtime's dynamic quantisation of `source` (int8 weights, QInt8, for the matrix
  products and the embedding lookup; activations quantised on the fly), written to `target`.
  First ONNX Runtime's basic graph optimisations fold the constant parts of the graph (weights
  that the exporter concatenates or transposes at run time become initializers), then dense
  layers are rewritten from Gemm to MatMul (`_gemm_to_matmul`)."""
  import contextlib  # pylint: disable=import-outside-toplevel
  import io  # pylint: disable=import-outside-toplevel
  import tempfile  # pylint: disable=import-outside-toplevel

  import onnx  # pylint: disable=import-outside-toplevel
  from onnxruntime.quantization import QuantType, quantize_dynamic  # pylint: disable=import-outside-toplevel

  import onnxruntime as ort  # pylint: disable=import-outside-toplevel

  with tempfile.TemporaryDirectory() as tmp:
    folded = pathlib.Path(tmp) / "folded.onnx"
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(folded)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
    model = onnx.load(str(folded))
    _gemm_to_matmul(model)
    # The folding materialises the exporter's ConstantOfShape fills again: back to nodes, here
    # and after the quantiser (the demo prefill's int8 file was 13.7 MB against 2.7 MB in fp32).
    export_lib.uniform_constants_as_nodes(model)
    staged = pathlib.Path(tmp) / "matmul.onnx"
    onnx.save(model, str(staged))
    # The quantiser prints the shapes it cannot infer; they are not errors.
    with contextlib.redirect_stdout(io.StringIO()):
      quantize_dynamic(str(staged), str(target), weight_type=QuantType.QInt8)
  quantized = onnx.load(str(target))
  if export_lib.uniform_constants_as_nodes(quantized):
    onnx.save(quantized, str(target))


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True, help="a training run's directory")
  parser.add_argument("--out", required=True, help="the directory to write")
  parser.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
  parser.add_argument("--prefill-length", type=int, default=64,
                      help="tokens per prefill call (prompts are fed in chunks of it)")
  parser.add_argument("--max-length", type=int, default=4096,
                      help="cache length: the most tokens a softmax model holds")
  parser.add_argument("--batch", type=int, default=None,
                      help="fix the batch size (default: symbolic where the exporter allows)")
  parser.add_argument("--int8", action="store_true", help="also write int8-quantised programs")
  args = parser.parse_args(argv)
  config, model, step = checkpoints_lib.load_checkpoint(args.workdir, args.step)
  manifest = export_model(model, args.out, prefill_length=args.prefill_length,
                          max_length=args.max_length, batch=args.batch, int8=args.int8,
                          extra={"run": {"workdir": str(args.workdir), "step": step,
                                         "config": config.to_dict()}})
  print(json.dumps({"out": args.out, "attention": manifest["attention"],
                    "files": manifest["files"],
                    "max_relative_error": manifest["check_against_jax"]["max_relative_error"]}))
  return 0


if __name__ == "__main__":
  sys.exit(main())
