"""Row-wise sums on XLA:CPU: a reduce-of-multiply against the same sum as a dot_general.

    python -m experiments.rowwise_study [--shape 1 1024 4 64] [--repeats 50] [--out FILE]

Times, jitted, on the machine at hand (median of `--repeats` calls after one warm-up), the
forward of sum(x * y, -1) written four ways, and the gradient with respect to s of
sum(sin(x * s[..., None])) written with a broadcasting multiply and with
`dca_jax.ops.rowwise.scale_rows`. The reason `dca_jax.ops.rowwise` exists: XLA:CPU (jax 0.10.2)
hands reduce-of-multiply ops to YNNPACK's reduction, which is slow for many short rows, while a
dot_general takes its matmul path (docs/performance.md; `python -m experiments.profile_ops`
shows the ops by name). Prints a Markdown table; `--out FILE` also writes the figures as JSON with
the command, machine and date (docs/rowwise_study.json is the run the README quotes).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from dca_jax.ops.rowwise import row_dot, scale_rows
from experiments import bookkeeping


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shape", type=int, nargs="+", default=[1, 1024, 4, 64])
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--out", default=None, help="also write the figures as JSON here")
  args = parser.parse_args(argv)
  if len(args.shape) < 2 or min(args.shape) < 1 or args.repeats < 1:
    parser.error("--shape needs >= 2 positive sizes and --repeats >= 1")
  shape = tuple(args.shape)
  x, y = (jax.random.normal(jax.random.key(i), shape) for i in range(2))
  s = jax.random.normal(jax.random.key(2), shape[:-1])
  forms = {
      "sum(x * y, -1)": lambda x, y: jnp.sum(x * y, -1),
      "einsum('...k,...k->...')": lambda x, y: jnp.einsum("...k,...k->...", x, y),
      "rowwise.row_dot (its primal is sum(x * y, -1))": row_dot,
      "(x * y) @ ones": lambda x, y: (x * y) @ jnp.ones((shape[-1],), x.dtype),
  }
  grads = {
      "grad wrt s of sum(sin(x * s[..., None]))":
          jax.grad(lambda s, x: jnp.sum(jnp.sin(x * s[..., None]))),
      "grad wrt s of sum(sin(rowwise.scale_rows(x, s)))":
          jax.grad(lambda s, x: jnp.sum(jnp.sin(scale_rows(x, s)))),
  }
  rows = {name: _time(jax.jit(f), x, y, repeats=args.repeats) for name, f in forms.items()}
  rows.update({name: _time(jax.jit(f), s, x, repeats=args.repeats) for name, f in grads.items()})
  machine, date = bookkeeping.machine_info(), bookkeeping.now()
  print(f"{bookkeeping.machine_line(machine)}, {date}, shape {list(shape)}, "
        f"median of {args.repeats} jitted calls:\n\n| form | us |\n|---|---:|")
  for name, seconds in rows.items():
    print(f"| {name} | {1e6 * seconds:.1f} |")
  if args.out:
    bookkeeping.write_json(args.out, {
        "command": bookkeeping.command_line("experiments.rowwise_study", argv),
        "date": date, "machine": machine, "shape": list(shape), "repeats": args.repeats,
        "us": {name: 1e6 * seconds for name, seconds in rows.items()}})
  return rows


if __name__ == "__main__":
  main()
