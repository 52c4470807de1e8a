"""experiments/profile_ops.py: HLO lines are classed and attributed as its docstring says.

The profile itself (a traced run) is exercised by the slow job (`pytest -m slow`), since its
figures are what docs/profile_ops.md shows; these checks run on fixed HLO text.
"""

from __future__ import annotations

import pytest

from experiments import profile_ops

HLO = """
HloModule jit_loss

%fused_computation.5 (param_0: f32[8,4]) -> f32[8,4] {
  ROOT %dot.9 = f32[8,4]{1,0} dot(%param_0, %param_0), lhs_contracting_dims={1}
}

ENTRY %main.1 (x.1: f32[8,4]) -> f32[8,4] {
  %ynn_fusion.5 = f32[8,4]{1,0} fusion(%x.1), kind=kCustom, calls=%fused_computation.5, metadata={op_name="jit(loss)/jvp(jit(_compiled_weights))/dot_general" stack_frame_id=3}, backend_config={"fusion_config":{"kind":"__ynn_fusion"}}
  %copy_bitcast_fusion.2 = f32[4,8]{1,0} fusion(%ynn_fusion.5), kind=kLoop, calls=%fc.2, metadata={op_name="jit(loss)/transpose(jvp(jit(_compiled_compress)))/jit(_where)/select_n"}
  %add_exponential_fusion = f32[4,8]{1,0} fusion(%copy_bitcast_fusion.2), kind=kLoop, calls=%fc.3, metadata={op_name="jit(loss)/jvp(jit(_where))/exp"}
  %pad_dynamic-update-slice_fusion = f32[9,8]{1,0} fusion(%add_exponential_fusion), kind=kLoop, calls=%fc.4
  %dot.3 = f32[4,4]{1,0} dot(%add_exponential_fusion, %add_exponential_fusion), lhs_contracting_dims={1}
  ROOT %transpose.1 = f32[8,4]{0,1} transpose(%add_exponential_fusion), dimensions={1,0}
}
"""


def test_instructions_are_classed_and_attributed():
  hlo = profile_ops.parse_hlo(HLO)
  assert hlo["ynn_fusion.5"]["shape"] == "f32[8,4]{1,0}" and hlo["dot.3"]["opcode"] == "dot"
  cls = {name: profile_ops.op_class(name, hlo[name]) for name in hlo}
  assert cls["ynn_fusion.5"] == cls["dot.3"] == cls["dot.9"] == "matmul"
  assert cls["copy_bitcast_fusion.2"] == cls["transpose.1"] == "data movement"
  assert cls["pad_dynamic-update-slice_fusion"] == "data movement"
  assert cls["add_exponential_fusion"] == "elementwise / reduce"
  part = {name: profile_ops.op_part(hlo[name]) for name in hlo}
  assert part["ynn_fusion.5"] == "compute_weights, forward"
  # The outermost library entry point wins over jnp's own jits (_where) inside it.
  assert part["copy_bitcast_fusion.2"] == "attention_compress, backward"
  assert part["add_exponential_fusion"] == f"{profile_ops.LAYER_PART}, forward"
  assert part["dot.3"] == profile_ops.NO_METADATA


@pytest.mark.slow      # a traced run (~20 s): the figures of docs/profile_ops.md come from it
def test_profile_of_a_small_step_accounts_its_ops(tmp_path):
  result = profile_ops.main(["--layers", "dca", "--lengths", "128", "--repeats", "2",
                             "--out", str(tmp_path)])
  profile, = result["profiles"]
  assert profile["ops_seen"] > 50 and profile["op_ms"] > 0 and profile["flops"] > 0
  assert sum(profile["by_class_ms"].values()) == pytest.approx(profile["op_ms"])
  assert sum(profile["by_part_ms"].values()) == pytest.approx(profile["op_ms"])
  assert "compute_weights, forward" in profile["by_part_ms"]
  assert (tmp_path / "profile_ops.md").read_text().startswith("# Per-op profile")
