"""The energy model of the suite's speed table: energy per token relative to softmax attention.

An estimate, not a measurement (no power meter is available on these machines):
  E = e_flop * FLOPs + e_dram * bytes moved from DRAM,
with e_flop = 2.3 pJ (a 32-bit floating multiply-add, 3.7 pJ + 0.9 pJ, counted as 2 FLOPs) and
e_dram = 160 pJ per byte (640 pJ per 32-bit DRAM read), Horowitz, "Computing's energy problem
(and what we can do about it)", ISSCC 2014, 45 nm figures. Training and prefill are counted as
compute (FLOPs only: a lower bound; the same for every model). One decoding step at batch 1
reads every parameter and the whole decode cache once, so its DRAM bytes are parameters + cache.
Ratios to the softmax transformer are the main figures: the constants cancel in compute-bound
rows. Joules per token are given too, and the watts they imply at the measured throughput
(`implied_watts`: joules per token x tokens per second), beside the brain's figure
(`BRAIN_WATTS`, with its source) and the request's (`REQUEST_WATTS`, unsourced).

What the model leaves out (`LEFT_OUT`): on-chip caches and SRAM traffic (every decode byte is
charged as a DRAM read, even when it sits in a cache; training rows are charged no memory traffic
at all), instruction overhead (fetch, decode, scheduling, the framework's dispatch), static and
idle power (leakage, the rest of the machine), and the gap between 45 nm constants and this CPU.
The project's machine exposes no power counter (checked 2026-12-03: no /sys/class/powercap, so no
RAPL, and no /sys/class/hwmon), so nothing here is a measured joule. Where measured speed and the
estimate disagree (`contradictions`), the reports say so beside the table.

Example:
  >>> info = {a: {"forward_flops_per_token": {"8": f}, "decode_flops_per_token/8": f,
  ...             "param_bytes": 100, "cache_bytes/8": 10} for a, f in (("softmax", 2.0),
  ...                                                                   ("dca", 1.0))}
  >>> energy_table(info, [8], [8])["dca"]["forward/8"]
  0.5
  >>> implied_watts(2e-4, 500.0)
  0.1
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

E_FLOP_PJ = 2.3
E_DRAM_PJ_PER_BYTE = 160.0
ENERGY_SOURCE = ("Horowitz, 'Computing's energy problem (and what we can do about it)', "
                 "ISSCC 2014 (45 nm): fp32 mult 3.7 pJ + add 0.9 pJ; 32-bit DRAM read 640 pJ")

# The whole human brain: about 20% of a resting adult's energy (~2,000 kcal a day, ~100 W).
BRAIN_WATTS = 20.0
BRAIN_SOURCE = ("Raichle & Gusnard, 'Appraising the brain's energy budget', PNAS 99(16): "
                "10237-10239, 2002: the brain, about 2% of the body's weight, uses about 20% of "
                "its oxygen and calories; 20% of a resting adult's ~100 W (~2,000 kcal a day) is "
                "~20 W")
# The figure in the request this library answers; the request gives no source for it.
REQUEST_WATTS = 1.0
REQUEST_NOTE = "it gives no source, and none was found for it here"

LEFT_OUT = ("The model leaves out on-chip caches and SRAM traffic (every decode byte is charged "
            "as a DRAM read even when it sits in a cache; training and prefill are charged no "
            "memory traffic), instruction overhead (fetch, decode, scheduling, the framework's "
            "dispatch), static and idle power (leakage, the rest of the machine), and the gap "
            "between its 45 nm constants and this CPU. No joule here is measured: the project's "
            "machine exposes no power counter (checked 2026-12-03: no /sys/class/powercap, so "
            "no RAPL, and no /sys/class/hwmon).")


def brain_text() -> str:
  """The paragraph the reports print under their joules and watts: the brain's figure with its
  source, the request's, and what the model leaves out."""
  return (f"For scale: the whole human brain runs on about {BRAIN_WATTS:.0f} W ({BRAIN_SOURCE}). "
          f"The request this library answers puts the brain at {REQUEST_WATTS:g} W; {REQUEST_NOTE}. Neither is a "
          "like-for-like comparison: the brain's figure is a whole organ's metabolism, the watts "
          "above are the counted part of one small model's decoding step. " + LEFT_OUT)


def compute_joules(flops: float) -> float:
  """Joules of `flops` floating-point operations under the model (compute only, no memory)."""
  return E_FLOP_PJ * flops * 1e-12


def implied_watts(joules_per_token: float, tokens_per_s: float) -> float:
  """The power the estimate implies at a measured rate: joules per token x tokens per second."""
  return joules_per_token * tokens_per_s


def contradictions(estimates: Mapping[str, float], rates: Mapping[str, float | None],
                   base: str = "softmax") -> list[dict[str, Any]]:
  """The attentions whose measured speed contradicts their energy estimate against `base`.

  At equal power, energy follows time; so an estimate below `base`'s (ratio < 1) for an
  attention measured no faster than `base`, or above it (ratio > 1) for one measured faster,
  disagrees with the measurement.

  Args:
    estimates: attention -> estimated energy per token relative to `base`.
    rates: attention -> measured tokens/s (None or absent: not measured).
    base: the reference attention.

  Returns:
    One {"attention", "estimate", "time_ratio", "rate", "base_rate"} per disagreement, where
    time_ratio = base's tokens/s / the attention's (its time per token relative to base).

  Example:
    >>> found = contradictions({"softmax": 1.0, "dca": 0.58, "gla": 0.43},
    ...                        {"softmax": 682.0, "dca": 644.0, "gla": 1160.0})
    >>> [(c["attention"], round(c["time_ratio"], 2)) for c in found]
    [('dca', 1.06)]
  """
  base_rate = rates.get(base)
  found = []
  if not base_rate:
    return found
  for attention, estimate in estimates.items():
    rate = rates.get(attention)
    if attention == base or not rate:
      continue
    time_ratio = base_rate / rate
    if (estimate < 1.0 and time_ratio >= 1.0) or (estimate > 1.0 and time_ratio < 1.0):
      found.append({"attention": attention, "estimate": estimate, "time_ratio": time_ratio,
                    "rate": rate, "base_rate": base_rate})
  return found


def contradiction_text(found: Sequence[Mapping[str, Any]], where: str,
                       base: str = "softmax") -> str:
  """One sentence on the disagreements of `contradictions` at `where` ('' if none).

  Example:
    >>> print(contradiction_text([{"attention": "dca", "estimate": 0.58, "time_ratio": 1.06,
    ...                            "rate": 644.0, "base_rate": 682.0}], "Decoding at 1024"))
    Decoding at 1024, the measured speed contradicts the estimate: dca is estimated at 0.580 of
    softmax's energy per token but was measured no faster (644 against 682 tokens/s, 1.06x its
    time per token).
  """
  if not found:
    return ""
  parts = []
  for c in found:
    verdict = "no faster" if c["estimate"] < 1.0 else "faster"
    parts.append(f"{c['attention']} is estimated at {c['estimate']:.3f} of {base}'s energy per "
                 f"token but was measured {verdict} ({c['rate']:,.0f} against "
                 f"{c['base_rate']:,.0f} tokens/s, {c['time_ratio']:.2f}x its time per token)")
  return f"{where}, the measured speed contradicts the estimate: " + "; ".join(parts) + "."


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
    attention -> {"forward/<T>": ratio, "forward_joules/<T>": joules (compute only),
    "decode/<T>": ratio, "decode_joules/<T>": joules}.
  """
  base = info["softmax"]
  table: dict[str, Any] = {}
  for attention, m in info.items():
    row = {}
    for length in flop_lengths:
      row[f"forward/{length}"] = (m["forward_flops_per_token"][str(length)]
                                  / base["forward_flops_per_token"][str(length)])
      row[f"forward_joules/{length}"] = compute_joules(m["forward_flops_per_token"][str(length)])
    for length in decode_lengths:
      def joules(m, length=length):
        bytes_moved = m["param_bytes"] + m[f"cache_bytes/{length}"]
        return (compute_joules(m[f"decode_flops_per_token/{length}"])
                + E_DRAM_PJ_PER_BYTE * bytes_moved * 1e-12)
      row[f"decode/{length}"] = joules(m) / joules(base)
      row[f"decode_joules/{length}"] = joules(m)
    table[attention] = row
  return table
