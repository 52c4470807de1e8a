"""The energy model of the suite's speed table: energy per token relative to softmax attention.

An estimate, not a measurement (no power meter is available on these machines):
  E = e_flop * FLOPs + e_dram * bytes moved from DRAM,
with e_flop = 2.3 pJ (a 32-bit floating multiply-add, 3.7 pJ + 0.9 pJ, counted as 2 FLOPs) and
e_dram = 160 pJ per byte (640 pJ per 32-bit DRAM read), Horowitz, "Computing's energy problem
(and what we can do about it)", ISSCC 2014, 45 nm figures. Training and prefill are counted as
compute (FLOPs only: a lower bound; the same for every model). One decoding step at batch 1
reads every parameter and the whole decode cache once, so its DRAM bytes are parameters + cache.
Only ratios to the softmax transformer are reported: the constants cancel in compute-bound rows.

Example:
  >>> info = {a: {"forward_flops_per_token": {"8": f}, "decode_flops_per_token/8": f,
  ...             "param_bytes": 100, "cache_bytes/8": 10} for a, f in (("softmax", 2.0),
  ...                                                                   ("dca", 1.0))}
  >>> energy_table(info, [8], [8])["dca"]["forward/8"]
  0.5
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

E_FLOP_PJ = 2.3
E_DRAM_PJ_PER_BYTE = 160.0
ENERGY_SOURCE = ("Horowitz, 'Computing's energy problem (and what we can do about it)', "
                 "ISSCC 2014 (45 nm): fp32 mult 3.7 pJ + add 0.9 pJ; 32-bit DRAM read 640 pJ")


def energy_table(info: Mapping[str, Any], decode_lengths: Sequence[int],
                 flop_lengths: Sequence[int]) -> dict[str, Any]:
  """Energy per token relative to softmax, from the model in the module docstring.

  Args:
    info: attention -> its measured figures: "forward_flops_per_token" (str(T) -> FLOPs),
      and, for every decode length T, "decode_flops_per_token/<T>" (one step with a cache
      holding T tokens), "cache_bytes/<T>", and "param_bytes".
    decode_lengths: the contexts of the decoding rows.
    flop_lengths: the lengths of the forward rows.

  Returns:
    attention -> {"forward/<T>": ratio, "decode/<T>": ratio, "decode_joules/<T>": joules}.
  """
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
        return (E_FLOP_PJ * m[f"decode_flops_per_token/{length}"]
                + E_DRAM_PJ_PER_BYTE * bytes_moved) * 1e-12
      row[f"decode/{length}"] = joules(m) / joules(base)
      row[f"decode_joules/{length}"] = joules(m)
    table[attention] = row
  return table
