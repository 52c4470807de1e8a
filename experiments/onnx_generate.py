"""Generates bytes from an exported model with ONNX Runtime and NumPy only: no JAX.

Usage:
  python experiments/onnx_generate.py --model DIR --prompt TEXT --tokens N
      [--temperature T] [--top-k K] [--greedy] [--seed S] [--int8] [--batch B]

DIR is the output of `python -m experiments.export` (its manifest.json says what the programs
and the cache are). The prompt's bytes are fed through the prefill program in chunks of its
fixed length and the remainder through the decode step, then N tokens are sampled one decode
step at a time; the cache arrays go out of each call and back into the next. The generated
bytes are printed (UTF-8, undecodable bytes replaced); the timing goes to stderr.

This file imports nothing from JAX or from the rest of the repository, so it can be copied next
to an exported model on a small device (needs numpy and onnxruntime).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sys
import time
from typing import Sequence

import numpy as np
import onnxruntime as ort


class OnnxLM:
  """An exported language model: its prefill and decode-step programs and its cache layout.

  Args:
    model_dir: an export directory (manifest.json and the programs).
    int8: use the int8-quantised programs (exported with --int8).
    threads: ONNX Runtime's intra-op threads of both programs. None: the decode step runs on one
      thread (a step is ~180 small nodes, where a pool's synchronisation costs more than it
      saves: 0.27 ms per step at batch 1 on one thread against 0.28-0.58 ms on two, in
      docs/edge.md of 2026-12-04, which times both), the prefill on ONNX Runtime's default (one
      thread per core).
    verify: check the sha256 of the program files against the manifest.

  Raises:
    FileNotFoundError: no manifest or a missing program.
    ValueError: a program whose sha256 differs from the manifest's.
  """

  def __init__(self, model_dir: str | os.PathLike[str], *, int8: bool = False,
               threads: int | None = None, verify: bool = True):
    self.dir = pathlib.Path(model_dir)
    path = self.dir / "manifest.json"
    if not path.exists():
      raise FileNotFoundError(f"no manifest.json in {model_dir}: not an export directory "
                              f"(python -m experiments.export --workdir RUN --out DIR).")
    self.manifest = json.loads(path.read_text())
    self.cache_layout = self.manifest["cache"]
    self.prefill_length = int(self.manifest["prefill_length"])
    self.max_length = int(self.manifest["max_length"])
    self.vocab_size = int(self.manifest["vocabulary"]["size"])
    self.constant_size = bool(self.manifest.get("constant_size_cache", False))
    suffix = ".int8.onnx" if int8 else ".onnx"
    self.sessions, self.batch = {}, {}
    for program in ("decode_step", "prefill"):
      file = program + suffix
      if file not in self.manifest["files"]:
        raise FileNotFoundError(f"{file} is not in {path}" + (" (export with --int8)" if int8
                                                               else ""))
      if verify:
        digest = hashlib.sha256((self.dir / file).read_bytes()).hexdigest()
        if digest != self.manifest["files"][file]["sha256"]:
          raise ValueError(f"{self.dir / file} has sha256 {digest}, the manifest says "
                           f"{self.manifest['files'][file]['sha256']}: a changed file.")
      options = ort.SessionOptions()
      options.log_severity_level = 3
      intra = threads if threads is not None else (1 if program == "decode_step" else None)
      if intra is not None:
        options.intra_op_num_threads = intra
        options.inter_op_num_threads = 1
      self.sessions[program] = ort.InferenceSession(str(self.dir / file), options,
                                                    providers=["CPUExecutionProvider"])
      self.batch[program] = self.manifest["programs"][file]["batch"]
    self.input_names = {p: [i.name for i in s.get_inputs()] for p, s in self.sessions.items()}

  def check_batch(self, batch_size: int) -> None:
    """Raises ValueError when a program was exported for another fixed batch size."""
    for program, batch in self.batch.items():
      if batch != "B" and int(batch) != batch_size:
        raise ValueError(f"{program} was exported for batch size {batch} (the exporter could "
                         f"not keep it symbolic), got batch size {batch_size}.")

  def init_cache(self, batch_size: int) -> list[np.ndarray]:
    """The empty cache for `batch_size` rows, from the manifest's layout."""
    self.check_batch(batch_size)
    return [np.full([batch_size if d == "B" else d for d in e["shape"]], e["fill"],
                    dtype=np.dtype(e["dtype"])) for e in self.cache_layout]

  def _run(self, program: str, tokens: np.ndarray, cache: Sequence[np.ndarray]
           ) -> tuple[np.ndarray, list[np.ndarray]]:
    names = self.input_names[program]
    out = self.sessions[program].run(None, dict(zip(names, [tokens, *cache])))
    return out[0], out[1:]

  def decode_step(self, tokens: np.ndarray, cache: Sequence[np.ndarray]
                  ) -> tuple[np.ndarray, list[np.ndarray]]:
    """One token per row: tokens int [B] -> (logits float32 [B, V], new cache)."""
    return self._run("decode_step", np.asarray(tokens, np.int32), cache)

  def prefill(self, tokens: np.ndarray, cache: Sequence[np.ndarray]
              ) -> tuple[np.ndarray, list[np.ndarray]]:
    """Exactly `prefill_length` tokens per row: [B, P] -> (logits [B, P, V], new cache)."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] != self.prefill_length:
      raise ValueError(f"prefill takes tokens of shape [B, {self.prefill_length}], got "
                       f"{tokens.shape}.")
    return self._run("prefill", tokens, cache)

  def feed(self, tokens: np.ndarray, cache: Sequence[np.ndarray], position: int = 0,
           all_logits: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """Any number T >= 1 of tokens [B, T]: whole chunks through prefill, the rest through the
    decode step. Returns (logits of the last position [B, V], or of all [B, T, V] with
    `all_logits`, the new cache). `position` is the number of tokens the cache holds already
    (checked against max_length when the cache does not have a constant size)."""
    tokens = np.asarray(tokens, np.int32)
    if tokens.ndim != 2 or tokens.shape[1] < 1:
      raise ValueError(f"tokens must have shape [B, T] with T >= 1, got {tokens.shape}.")
    total = tokens.shape[1]
    if not self.constant_size and position + total > self.max_length:
      raise ValueError(f"the cache holds at most max_length = {self.max_length} tokens; "
                       f"{position} + {total} were given (export with a larger --max-length).")
    pieces, cache = [], list(cache)
    start, p = 0, self.prefill_length
    while total - start >= p:
      logits, cache = self.prefill(tokens[:, start:start + p], cache)
      pieces.append(logits if all_logits else logits[:, -1:])
      start += p
    while start < total:
      logits, cache = self.decode_step(tokens[:, start], cache)
      pieces.append(logits[:, None])
      start += 1
    out = np.concatenate(pieces, axis=1)
    return (out if all_logits else out[:, -1]), cache

  def generate(self, prompt: np.ndarray, new_tokens: int, *, temperature: float = 1.0,
               top_k: int | None = None, seed: int = 0) -> np.ndarray:
    """Prompt ids [B, P] -> [B, N] sampled ids (temperature 0: greedy), as `dca_jax.nn.generate`
    does: N - 1 decode steps after the prompt (the last token is never fed back)."""
    prompt = np.asarray(prompt, np.int32)
    rng = np.random.default_rng(seed)
    cache = self.init_cache(prompt.shape[0])
    logits, cache = self.feed(prompt, cache)
    position = prompt.shape[1]
    out = np.zeros((prompt.shape[0], new_tokens), np.int32)
    for i in range(new_tokens):
      out[:, i] = sample(logits, rng, temperature, top_k)
      if i + 1 < new_tokens:
        if not self.constant_size and position + 1 > self.max_length:
          raise ValueError(f"the cache holds at most max_length = {self.max_length} tokens.")
        logits, cache = self.decode_step(out[:, i], cache)
        position += 1
    return out


def sample(logits: np.ndarray, rng: np.random.Generator, temperature: float,
           top_k: int | None = None) -> np.ndarray:
  """Token ids [B] from logits [B, V]: argmax when temperature is 0, else softmax(logits / T)
  sampling, among the k largest logits only when top_k is given."""
  logits = np.asarray(logits, np.float64)
  if temperature <= 0:
    return np.argmax(logits, axis=-1).astype(np.int32)
  scaled = logits / temperature
  if top_k is not None:
    kth = np.sort(scaled, axis=-1)[:, -top_k][:, None]
    scaled = np.where(scaled >= kth, scaled, -np.inf)
  scaled -= scaled.max(axis=-1, keepdims=True)
  probs = np.exp(scaled)
  probs /= probs.sum(axis=-1, keepdims=True)
  return np.array([rng.choice(probs.shape[1], p=row) for row in probs], np.int32)


def bits_per_byte(lm: OnnxLM, data: bytes, *, rows: int | None = None,
                  batch_size: int = 1) -> dict[str, float]:
  """Bits per byte of `data` through the prefill program: the bytes cut into rows of
  prefill_length + 1 (inputs and next-byte targets), each row from an empty cache.

  Returns:
    {"bpb", "bytes" (predicted), "rows", "seconds"}.
  """
  p = lm.prefill_length
  stream = np.frombuffer(data, dtype=np.uint8).astype(np.int32)
  count = (len(stream) - 1) // p
  if rows is not None:
    count = min(count, rows)
  if count < 1:
    raise ValueError(f"need at least prefill_length + 1 = {p + 1} bytes, got {len(stream)}.")
  count -= count % batch_size
  if count < 1:
    raise ValueError(f"fewer rows than batch_size = {batch_size}.")
  nats, start = 0.0, time.perf_counter()
  for first in range(0, count, batch_size):
    idx = (np.arange(first, first + batch_size) * p)[:, None] + np.arange(p + 1)
    rows_ = stream[idx]
    logits, _ = lm.prefill(rows_[:, :-1], lm.init_cache(batch_size))
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_z = np.log(np.exp(logits - top).sum(axis=-1)) + top[..., 0]
    target = np.take_along_axis(logits, rows_[:, 1:, None], axis=-1)[..., 0]
    nats += float(np.sum(log_z - target))
  predicted = count * p
  return {"bpb": nats / (np.log(2) * predicted), "bytes": predicted, "rows": count,
          "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", required=True, help="an export directory (manifest.json)")
  parser.add_argument("--prompt", required=True, help="the prompt text (UTF-8 bytes)")
  parser.add_argument("--tokens", type=int, required=True, help="bytes to generate")
  parser.add_argument("--temperature", type=float, default=0.8)
  parser.add_argument("--top-k", type=int, default=None)
  parser.add_argument("--greedy", action="store_true", help="argmax (temperature 0)")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--int8", action="store_true", help="the int8-quantised programs")
  parser.add_argument("--batch", type=int, default=1, help="rows sampled from the same prompt")
  parser.add_argument("--threads", type=int, default=None,
                      help="ONNX Runtime's intra-op threads (default: 1 for the decode step, "
                           "one per core for the prefill)")
  args = parser.parse_args(argv)
  if args.tokens < 1:
    parser.error("--tokens must be >= 1")
  lm = OnnxLM(args.model, int8=args.int8, threads=args.threads)
  prompt_bytes = args.prompt.encode("utf-8") or b"\n"
  prompt = np.tile(np.frombuffer(prompt_bytes, np.uint8).astype(np.int32), (args.batch, 1))
  start = time.perf_counter()
  out = lm.generate(prompt, args.tokens, temperature=0.0 if args.greedy else args.temperature,
                    top_k=args.top_k, seed=args.seed)
  seconds = time.perf_counter() - start
  for row in out:
    sys.stdout.write(bytes(row.astype(np.uint8)).decode("utf-8", errors="replace") + "\n")
  sys.stdout.flush()
  print(f"{args.batch * args.tokens} tokens in {seconds:.3f} s "
        f"({args.batch * args.tokens / seconds:,.0f} tokens/s, prompt included)", file=sys.stderr)
  return 0


if __name__ == "__main__":
  sys.exit(main())
