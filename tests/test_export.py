"""The exported decode step and prefill (ONNX through ONNX Runtime, StableHLO through
`jax.export.deserialize`) against the JAX model they came from, and the JAX-free runner.

CI (needs the `[export]` extra; skipped without it): every layer of the registry exports its
decode step and runs a few steps from a prefilled context equal to JAX (DCA's written by the
graph builder, `dca_jax.nn.onnx_graph`, which is also run 80 steps as its ring wraps); DCA goes through the
whole path (checkpoint -> `python -m experiments.export` -> manifest -> `onnx_generate.py`,
int8 included). The long checks (512 decode steps, 256 greedy tokens, every layer's prefill) are
`-m slow`. Tiny models: d_model 32, window 8, untrained (equality does not depend on training).
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.extend
import jax.interpreters.mlir
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import oracles
from dca_jax.nn import LAYERS, TransformerConfig, TransformerLM, generate
from dca_jax.nn import export as export_lib
from dca_jax.nn import onnx_graph

pytest.importorskip("jax2onnx")
ort = pytest.importorskip("onnxruntime")

from experiments import checkpoints as checkpoints_lib  # noqa: E402
from experiments import configs  # noqa: E402
from experiments import export as export_cli  # noqa: E402
from experiments import model as model_lib  # noqa: E402
from experiments.onnx_generate import OnnxLM, bits_per_byte  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
RTOL = 1e-5          # the bound on ONNX Runtime vs JAX, relative
MAX_LENGTH = 640
PREFILL = 16
_TINY_OPTIONS = {"dca": {"window": 8, "feature_dim": 4}, "window": {"window": 8}}


def _model(attention: str, num_layers: int = 1) -> TransformerLM:
  config = TransformerConfig(d_model=32, num_layers=num_layers, num_heads=2, attention=attention,
                             attention_options=_TINY_OPTIONS.get(attention, {}))
  return TransformerLM(config, rngs=nnx.Rngs(0))


def _session(data: bytes):
  options = ort.SessionOptions()
  options.log_severity_level = 3
  return ort.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def _run(session, *args):
  return session.run(None, dict(zip([i.name for i in session.get_inputs()], args)))


def _worst(got, want) -> float:
  return max(export_cli.relative_error(g, w) for g, w in zip(got, want))


def _check_decode(model, steps: int, batch: int, programs=("onnx", "stablehlo")) -> None:
  """Prefills a random context in JAX, then runs `steps` decode steps in JAX, ONNX Runtime and
  the deserialised StableHLO side by side, each from its own cache; all within RTOL."""
  layout = export_lib.cache_layout(model, MAX_LENGTH)
  onnx_result = export_lib.export_onnx(model, MAX_LENGTH)
  hlo_result = export_lib.export_stablehlo(model, MAX_LENGTH)
  if onnx_result.batch != "B" or hlo_result.batch != "B":
    batch = 1      # softmax attention: a fixed batch (the manifest records why)
    assert model.config.attention == "softmax" and onnx_result.fallback_reason
  session = _session(onnx_result.data)
  hlo = jax.jit(jax.export.deserialize(bytearray(hlo_result.data)).call)
  step = jax.jit(export_lib.decode_step_function(model, MAX_LENGTH))
  prefill = jax.jit(export_lib.prefill_function(model, MAX_LENGTH))
  rng = np.random.default_rng(1)
  context = rng.integers(0, 256, (batch, 2 * PREFILL), dtype=np.int32)
  cache = export_lib.init_cache_arrays(layout, batch)
  for chunk in (context[:, :PREFILL], context[:, PREFILL:]):
    cache = [np.asarray(x) for x in prefill(chunk, *cache)[1:]]
  caches = {"jax": cache, "onnx": cache, "stablehlo": cache}
  for i in range(steps):
    token = rng.integers(0, 256, (batch,), dtype=np.int32)
    want = [np.asarray(x) for x in step(token, *caches["jax"])]
    outs = {}
    if "onnx" in programs:
      outs["onnx"] = _run(session, token, *caches["onnx"])
    if "stablehlo" in programs:
      outs["stablehlo"] = [np.asarray(x) for x in hlo(token, *caches["stablehlo"])]
    for name, got in outs.items():
      error = _worst(got, want)
      assert error <= RTOL, f"{name} step {i}: relative error {error:.2e}"
      caches[name] = got[1:]
    caches["jax"] = want[1:]


# CI converts DCA's and the window's steps (the other layers take ~10-30 s each through jax2onnx);
# the full job every layer, here and at 64 steps in test_slow_every_layer_decode_and_prefill.
@pytest.mark.parametrize("attention", oracles.ci_cases(
    list(LAYERS), keep=[i for i, name in enumerate(LAYERS) if name in ("dca", "window")]))
def test_decode_step_equals_jax_every_layer(attention):
  _check_decode(_model(attention), steps=4, batch=2)


def test_cache_layout_names_shapes_and_fills():
  model = _model("dca", num_layers=2)
  layout = export_lib.cache_layout(model, MAX_LENGTH)
  cache = model.init_cache(3, MAX_LENGTH)
  leaves = jax.tree_util.tree_leaves(cache)
  assert [e.name for e in layout][:2] == ["layer0.state.keys", "layer0.state.values"]
  assert len({e.name for e in layout}) == len(layout) == len(leaves)
  for entry, leaf, built in zip(layout, leaves, export_lib.init_cache_arrays(layout, 3)):
    assert entry.concrete_shape(3) == leaf.shape and entry.dtype == leaf.dtype.name
    np.testing.assert_array_equal(built, np.asarray(leaf))
  assert {e.fill for e in layout if e.name.endswith(".doc_start")} == {0}
  assert next(e for e in layout if e.name.endswith("position")).batch_axis is None


def test_unsupported_primitive_names_layer_and_primitive(monkeypatch):
  # A primitive of our own, which no converter knows.
  unknown = jax.extend.core.Primitive("dca_test_unconvertible")
  unknown.def_impl(lambda x: x)
  unknown.def_abstract_eval(lambda x: x)
  jax.interpreters.mlir.register_lowering(unknown, lambda ctx, x: [x])
  model = _model("dca")
  original = TransformerLM.decode_step

  def decode_step(self, token, cache, reset=None):
    logits, cache = original(self, token, cache, reset)
    return unknown.bind(logits), cache

  monkeypatch.setattr(TransformerLM, "decode_step", decode_step)
  with pytest.raises(NotImplementedError,
                     match=r"(?s)'dca' \(DCAttention\).*'dca_test_unconvertible'"):
    # jax2onnx converts the (patched) jaxpr; the graph builder would write DCA from its maths.
    export_lib.export_onnx(model, MAX_LENGTH, symbolic_batch=False, converter="jax2onnx")


# --- the graph builder (dca_jax.nn.onnx_graph) -----------------------------------------------

_GRAPH_CASES = {
    "taylor_rotary_conv": ({"window": 8, "feature_dim": 4}, True),
    "elu_no_rotary_no_conv_untied": ({"window": 5, "feature_dim": 3, "feature_map": "elu",
                                      "rotary_base": None, "short_conv": 0}, False),
}


@pytest.mark.parametrize("case", [
    "taylor_rotary_conv",
    pytest.param("elu_no_rotary_no_conv_untied", marks=pytest.mark.slow)])
def test_graph_decode_step_equals_jax_as_the_ring_wraps(case):
  """80 steps (the 9- or 6-slot ring wraps many times, the memory fills) from a context with a
  reset in one row (doc_start > 0 there), ONNX Runtime from its own cache against JAX."""
  options, tied = _GRAPH_CASES[case]
  config = TransformerConfig(d_model=32, num_layers=2, num_heads=2, attention="dca",
                             attention_options=options, tie_embeddings=tied)
  model = TransformerLM(config, rngs=nnx.Rngs(3))
  result = export_lib.export_onnx(model, MAX_LENGTH)
  assert (result.converter, result.batch) == ("graph", "B")
  import onnx  # pylint: disable=import-outside-toplevel
  # A structural bound (jax2onnx writes ~680 nodes a layer): the builder's ~90.
  assert len(onnx.load_from_string(result.data).graph.node) < 100 * config.num_layers
  session = _session(result.data)
  step = jax.jit(export_lib.decode_step_function(model, MAX_LENGTH))
  rng = np.random.default_rng(4)
  # The context through JAX's decode step with a reset (cheaper to compile than a prefill).
  treedef = jax.tree_util.tree_structure(model.init_cache(2, MAX_LENGTH))
  feed = jax.jit(lambda t, r, *c: jax.tree_util.tree_leaves(
      model.decode_step(t, jax.tree_util.tree_unflatten(treedef, c), r)[1]))
  want = export_lib.init_cache_arrays(export_lib.cache_layout(model, MAX_LENGTH), 2)
  for i in range(13):
    reset = np.array([False, i == 9])
    want = feed(rng.integers(0, 256, (2,), dtype=np.int32), reset, *want)
  want = [np.asarray(x) for x in want]
  assert {int(x) for x in want[3]} == {0, 9}          # layer0's doc_start
  got = want
  for i in range(80):
    token = rng.integers(0, 256, (2,), dtype=np.int32)
    reference = [np.asarray(x) for x in step(token, *want)]
    out = _run(session, token, *got)
    error = _worst(out, reference)
    assert error <= RTOL, f"step {i}: relative error {error:.2e}"
    want, got = reference[1:], out[1:]


def test_graph_converter_names_what_it_does_not_write():
  gated = TransformerLM(TransformerConfig(d_model=32, num_layers=1, num_heads=2, attention="dca",
                                          attention_options={"window": 8, "combine": "gated"}),
                        rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"converter='graph'.*combine='gated'"):
    export_lib.export_onnx(gated, MAX_LENGTH, converter="graph")
  with pytest.raises(ValueError, match=r"converter='graph'.*decode step only"):
    export_lib.export_onnx(_model("dca"), MAX_LENGTH, prefill_length=PREFILL, converter="graph")
  with pytest.raises(ValueError, match=r"converter must be one of"):
    export_lib.export_onnx(_model("dca"), MAX_LENGTH, converter="fast")
  assert "softmax" in onnx_graph.unsupported_reason(_model("softmax"))


# --- DCA through the whole path: checkpoint -> CLI -> manifest -> runner ---------------------


@pytest.fixture(scope="module")
def dca_export(tmp_path_factory):
  """A checkpoint of the tiny lm_dca config (1 layer, untrained), exported by the CLI with a
  fixed batch of 2 (the symbolic-batch prefill takes jax2onnx ~10x longer to convert; the
  symbolic decode step is tested above, the symbolic prefill in the slow tests)."""
  config = configs.load_config("lm_dca", tiny=True)
  workdir = tmp_path_factory.mktemp("lm_dca_tiny")
  model = model_lib.build_model(config)
  _, params, _ = nnx.split(model, nnx.Param, ...)
  manager = checkpoints_lib.checkpoint_manager(workdir)
  checkpoints_lib.save_train_state(manager, 0, params, model_lib.make_optimizer(config).init(params))
  manager.close()
  checkpoints_lib.write_run(workdir, {"config": config.to_dict()})
  out = tmp_path_factory.mktemp("export")
  assert export_cli.main(["--workdir", str(workdir), "--out", str(out), "--prefill-length",
                          str(PREFILL), "--max-length", str(MAX_LENGTH), "--int8",
                          "--batch", "2"]) == 0
  return out, checkpoints_lib.load_checkpoint(workdir)[1]


def test_manifest_describes_the_files(dca_export):
  out, model = dca_export
  manifest = json.loads((out / "manifest.json").read_text())
  for name in ("decode_step", "prefill"):
    for suffix in (".onnx", ".stablehlo", ".int8.onnx"):
      entry = manifest["files"][name + suffix]
      assert entry["sha256"] == export_cli.sha256(out / (name + suffix))
      assert entry["bytes"] == (out / (name + suffix)).stat().st_size
    assert manifest["programs"][name + ".onnx"]["batch"] == 2
  assert manifest["vocabulary"]["kind"] == "bytes" and manifest["vocabulary"]["size"] == 256
  assert manifest["prefill_length"] == PREFILL and manifest["constant_size_cache"]
  assert manifest["model_config"]["attention"] == "dca"
  assert manifest["model_config"]["num_layers"] == 1
  assert [c["name"] for c in manifest["cache"]] == [
      e.name for e in export_lib.cache_layout(model, MAX_LENGTH)]
  assert manifest["check_against_jax"]["max_relative_error"] <= RTOL


def _decode_equal(out, model, steps: int) -> None:
  """The runner's `feed` (prefill chunks + decode steps) and then `steps` decode steps, against
  the JAX model's own prefill / decode_step."""
  lm = OnnxLM(out)
  rng = np.random.default_rng(2)
  prompt = rng.integers(0, 256, (2, 2 * PREFILL + 5), dtype=np.int32)
  logits, cache = lm.feed(prompt, lm.init_cache(2))
  layout = export_lib.cache_layout(model, MAX_LENGTH)
  prefill = jax.jit(export_lib.prefill_function(model, MAX_LENGTH))
  want_logits, *want = prefill(prompt, *export_lib.init_cache_arrays(layout, 2))
  assert export_cli.relative_error(logits, want_logits[:, -1]) <= RTOL
  hlo = jax.jit(jax.export.deserialize(bytearray((out / "decode_step.stablehlo").read_bytes())).call)
  step = jax.jit(export_lib.decode_step_function(model, MAX_LENGTH))
  hlo_cache = list(want)
  for i in range(steps):
    token = rng.integers(0, 256, (2,), dtype=np.int32)
    got_logits, cache = lm.decode_step(token, cache)
    reference = [np.asarray(x) for x in step(token, *want)]
    error = _worst([got_logits, *cache], reference)
    assert error <= RTOL, f"ONNX Runtime step {i}: relative error {error:.2e}"
    hlo_out = [np.asarray(x) for x in hlo(token, *hlo_cache)]
    error = _worst(hlo_out, reference)
    assert error <= RTOL, f"StableHLO step {i}: relative error {error:.2e}"
    want, hlo_cache = reference[1:], hlo_out[1:]


def test_dca_runner_decode_equals_jax(dca_export):
  _decode_equal(*dca_export, steps=8)


def _greedy_equal(out, model, tokens: int) -> None:
  # A prompt that is not a multiple of the prefill length: chunks + remainder by decode steps.
  prompt = np.frombuffer(b"def main():\n    return os.path.join(a, b)", np.uint8)
  lm = OnnxLM(out)
  fixed = [b for b in lm.batch.values() if b != "B"]
  prompt = np.tile(prompt.astype(np.int32)[None], (int(fixed[0]) if fixed else 2, 1))
  want = generate(model, jnp.asarray(prompt), max_new_tokens=tokens, rng=jax.random.key(0),
                  temperature=0.0, max_length=MAX_LENGTH)
  got = lm.generate(prompt, tokens, temperature=0.0)
  np.testing.assert_array_equal(got, np.asarray(want))


def test_dca_runner_greedy_tokens_equal_generate(dca_export):
  _greedy_equal(*dca_export, tokens=32)


def test_int8_programs_run_and_stay_close(dca_export):
  out, _ = dca_export
  data = (ROOT / "README.md").read_bytes()[:PREFILL * 8 + 1]
  fp32 = bits_per_byte(OnnxLM(out), data, batch_size=2)
  int8 = bits_per_byte(OnnxLM(out, int8=True), data, batch_size=2)
  assert np.isfinite(fp32["bpb"]) and np.isfinite(int8["bpb"])
  assert abs(int8["bpb"] - fp32["bpb"]) < 0.25 * fp32["bpb"]
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["files"]["decode_step.int8.onnx"]["bytes"] < manifest["files"]["decode_step.onnx"]["bytes"]
  # The folding before quantisation materialises the fills; the int8 file keeps them as nodes.
  assert manifest["files"]["prefill.int8.onnx"]["bytes"] <= manifest["files"]["prefill.onnx"]["bytes"]


def test_runner_never_imports_jax(dca_export):
  """The runner as a script, with `jax` poisoned: it must print bytes without touching JAX."""
  out, _ = dca_export
  code = ("import runpy, sys\n"
          "sys.modules['jax'] = None  # any 'import jax' now raises ImportError\n"
          f"sys.argv = ['onnx_generate.py', '--model', {str(out)!r}, '--prompt', 'def f(x):',\n"
          "            '--tokens', '12', '--top-k', '8', '--temperature', '0.7', '--batch', '2']\n"
          f"try:\n  runpy.run_path({str(ROOT / 'experiments' / 'onnx_generate.py')!r}, "
          "run_name='__main__')\n"
          "except SystemExit as e:\n  assert not e.code, e.code\n"
          "assert not [m for m, v in sys.modules.items() if v is not None and (m == 'jax' or "
          "m.startswith(('jax.', 'jaxlib', 'flax', 'dca_jax')))], 'JAX was imported'\n"
          "print('NO_JAX_OK')\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, env=env, cwd="/")
  assert result.returncode == 0, result.stderr[-2000:]
  assert "NO_JAX_OK" in result.stdout and "tokens/s" in result.stderr


# --- slow: the full lengths ---------------------------------------------------------


@pytest.fixture(scope="module")
def dca_symbolic_export(tmp_path_factory):
  """A 2-layer DCA model exported with a symbolic batch (prefill included)."""
  model = _model("dca", num_layers=2)
  out = tmp_path_factory.mktemp("dca_symbolic")
  manifest = export_cli.export_model(model, out, prefill_length=PREFILL, max_length=MAX_LENGTH,
                                     log=lambda *_: None)
  assert {p["batch"] for p in manifest["programs"].values()} == {"B"}
  return out, model


@pytest.mark.slow
def test_slow_dca_512_decode_steps(dca_symbolic_export):
  _decode_equal(*dca_symbolic_export, steps=512)


@pytest.mark.slow
def test_slow_dca_256_greedy_tokens(dca_symbolic_export):
  out, model = dca_symbolic_export
  _greedy_equal(out, model, tokens=256)


@pytest.mark.slow
@pytest.mark.parametrize("attention", list(LAYERS))
def test_slow_every_layer_decode_and_prefill(attention, tmp_path):
  model = _model(attention, num_layers=2)
  _check_decode(model, steps=64, batch=2)
  manifest = export_cli.export_model(model, tmp_path, prefill_length=PREFILL,
                                     max_length=MAX_LENGTH, log=lambda *_: None)
  assert manifest["check_against_jax"]["max_relative_error"] <= RTOL
  _greedy_equal(tmp_path, model, tokens=48)


def test_onnx_speed_breakdown_programs_run():
  """`onnx_speed --breakdown`'s reference programs: the step's weight products (the weights of
  its MatMul / Gemm nodes, not the activation products) and a chain of Adds, run by ONNX
  Runtime with the expected results."""
  import onnx  # pylint: disable=import-outside-toplevel

  from experiments import decode_rate, onnx_speed  # pylint: disable=import-outside-toplevel
  model = decode_rate.demo_model("dca")
  step = onnx_graph.decode_step_model(model, max_length=128, batch=1)
  program, feed = onnx_speed._matmul_program(step)  # pylint: disable=protected-access
  weights = onnx.load_from_string(program).graph.initializer
  # Per layer: the fused projection, the attention output, the MLP's gate, up and down; the head.
  assert len(feed) == len(weights) == 2 * 5 + 1
  outputs = ort.InferenceSession(program, providers=["CPUExecutionProvider"]).run(None, feed)
  assert all(o.shape[0] == 1 and np.all(np.isfinite(o)) for o in outputs)
  chain = ort.InferenceSession(onnx_speed._chain_program(7),  # pylint: disable=protected-access
                               providers=["CPUExecutionProvider"])
  (y,) = chain.run(None, {"x": np.zeros((1, 128), np.float32)})
  np.testing.assert_array_equal(y, np.full((1, 128), 7.0, np.float32))


def test_uniform_constants_become_constant_of_shape_nodes():
  """`uniform_constants_as_nodes` turns large all-equal initializers (zeros, -inf, NaN) into
  ConstantOfShape nodes and leaves the function unchanged; other initializers stay as they are."""
  import onnx
  import onnxruntime
  from onnx import TensorProto, helper, numpy_helper

  signed = np.zeros((8, 64), np.float32)
  signed[3, 5] = -0.0                       # equal to 0.0 by value, not by bits: kept
  values = {"zeros": np.zeros((8, 64), np.float32), "ninf": np.full((8, 64), -np.inf, np.float32),
            "nans": np.full((8, 64), np.nan, np.float32),
            "varied": np.arange(512, dtype=np.float32).reshape(8, 64),
            "signed": signed, "small": np.zeros((2,), np.float32)}
  nodes = [helper.make_node("Max", ["x", "ninf"], ["m"]),
           helper.make_node("Add", ["m", "zeros"], ["a"]),
           helper.make_node("Add", ["a", "varied"], ["b0"]),
           helper.make_node("Add", ["b0", "signed"], ["b"]),
           helper.make_node("IsNaN", ["nans"], ["isnan"]),
           helper.make_node("Where", ["isnan", "b", "zeros"], ["y"])]
  graph = helper.make_graph(
      nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])],
      [numpy_helper.from_array(v, k) for k, v in values.items()])
  proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
  x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)

  def run(p):
    session = onnxruntime.InferenceSession(p.SerializeToString(),
                                           providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]

  before = run(proto)
  removed = export_lib.uniform_constants_as_nodes(proto, min_bytes=1024)
  assert removed == 3 * 8 * 64 * 4
  assert sorted(t.name for t in proto.graph.initializer) == ["signed", "small", "varied"]
  assert sum(n.op_type == "ConstantOfShape" for n in proto.graph.node) == 3
  onnx.checker.check_model(proto)
  np.testing.assert_array_equal(run(proto), before)
  # A float64 fill stays visible to the export's float64 check after the rewrite.
  double = helper.make_model(helper.make_graph(
      [helper.make_node("Cast", ["z"], ["y"], to=TensorProto.FLOAT)], "d", [],
      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [64, 64])],
      [numpy_helper.from_array(np.zeros((64, 64)), "z")]),
      opset_imports=[helper.make_opsetid("", 17)])
  assert export_lib.uniform_constants_as_nodes(double) > 0
  assert export_lib._float64_tensors(double)


def test_exported_prefill_holds_no_uniform_fill(dca_export):
  """The exported prefill (jax2onnx) writes its fills as ConstantOfShape nodes: no initializer
  of >= UNIFORM_CONSTANT_MIN_BYTES is all one value."""
  import onnx
  from onnx import numpy_helper
  out, _ = dca_export
  proto = onnx.load(str(out / "prefill.onnx"))
  for tensor in proto.graph.initializer:
    array = numpy_helper.to_array(tensor)
    if array.nbytes >= export_lib.UNIFORM_CONSTANT_MIN_BYTES:
      flat = array.reshape(-1)
      assert not (flat == flat[0]).all() and not np.isnan(flat).all(), tensor.name
  assert any(n.op_type == "ConstantOfShape" for n in proto.graph.node)
