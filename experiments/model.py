"""The model, the optimiser, the loss and the jitted steps of a training run.

`build_model` makes the `TransformerLM` of an `ExperimentConfig`; `make_optimizer` is AdamW
(weight decay on matrices only, never on the parameters the layers name in
`dca_jax.nn.NO_WEIGHT_DECAY`) behind a global-norm gradient clip, with a linear warm-up to
`peak_lr` and a cosine decay to `peak_lr * min_lr_ratio` at `steps`
(`optax.warmup_cosine_decay_schedule`). The loss is the cross-entropy averaged over the positions
where `mask` is true (`masked_cross_entropy`).

`compiled_steps` gives a config's train and eval steps, jitted over the split model state
(`nnx.split(model, nnx.Param, ...)` -> graphdef, params, rest) and cached per config, so that the
runs of one config in one process share their compilations. The train step donates the
parameters and the optimiser state: they are updated in place, and the caller must use the ones
it returns, never the ones it passed.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from dca_jax.nn import NO_WEIGHT_DECAY, TransformerLM
from experiments.configs import ExperimentConfig


def build_model(config: ExperimentConfig, sequence_axis: str | None = None) -> TransformerLM:
  """The model of `config`, initialised from `config.seed`; with `sequence_axis`, its attention
  layers take T sharded over that mesh axis (the same parameters: the option changes how a
  call is computed, not what is initialised)."""
  model_config = config.model_config()
  if sequence_axis is not None:
    options = dict(model_config.attention_options.changed(), sequence_axis=sequence_axis)
    model_config = dataclasses.replace(model_config, attention_options=options)
  return TransformerLM(model_config, rngs=nnx.Rngs(config.seed))


def parse_mesh(text: str | None, devices: Any = None) -> jax.sharding.Mesh | None:
  """The training mesh of `--mesh data=D,seq=S`: D x S devices, batch rows sharded over "data",
  positions over "seq". None (the default) puts every device on "data"; a mesh of one device
  is None (the single-device steps).

  Raises:
    ValueError: naming the text, for an unknown axis, a size < 1, or more devices than exist.

  Example:
    >>> parse_mesh("data=1,seq=1") is None
    True
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = {"data": len(devices), "seq": 1} if text is None else {"data": 1, "seq": 1}
  if text is not None:
    for part in text.split(","):
      name, _, value = part.partition("=")
      if name.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
        raise ValueError(f"--mesh {text!r}: expected data=D,seq=S with integers >= 1, got "
                         f"{part!r}.")
      sizes[name.strip()] = int(value)
  count = sizes["data"] * sizes["seq"]
  if count > len(devices):
    raise ValueError(f"--mesh {text!r} needs {count} devices, {len(devices)} are available "
                     f"(on CPU: XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX "
                     f"starts).")
  if count == 1:
    return None
  grid = np.array(devices[:count]).reshape(sizes["data"], sizes["seq"])
  return jax.sharding.Mesh(grid, ("data", "seq"))


def check_batch_fits(mesh: jax.sharding.Mesh | None, batch_size: int, seq_len: int) -> None:
  """A clear error when a batch does not split over the mesh (rows over "data", positions over
  "seq")."""
  if mesh is None:
    return
  data, seq = mesh.shape["data"], mesh.shape["seq"]
  if batch_size % data:
    raise ValueError(f"a batch of {batch_size} rows (batch_size or eval_batch_size) is not "
                     f"divisible by the mesh's data={data}.")
  if seq_len % seq:
    raise ValueError(f"seq_len={seq_len} is not divisible by the mesh's seq={seq}.")


def learning_rate_schedule(config: ExperimentConfig) -> optax.Schedule:
  """Linear warm-up to peak_lr over warmup_steps, cosine decay to peak_lr * min_lr_ratio at steps."""
  warmup = min(config.warmup_steps, config.steps - 1) if config.steps > 1 else 0
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=config.peak_lr, warmup_steps=warmup,
      decay_steps=max(config.steps, warmup + 1), end_value=config.peak_lr * config.min_lr_ratio)


def _decay_mask(params: Any) -> Any:
  """True for the matrices (ndim >= 2) that weight decay applies to; norms, biases and the
  parameters the layers declare in `NO_WEIGHT_DECAY` (learned decay rates) are left alone."""
  def rule(path, leaf):
    names = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    return leaf.ndim >= 2 and not names & NO_WEIGHT_DECAY
  return jax.tree_util.tree_map_with_path(rule, params)


def make_optimizer(config: ExperimentConfig) -> optax.GradientTransformation:
  """Global-norm clip then AdamW with `learning_rate_schedule` (see the module docstring)."""
  adamw = optax.adamw(learning_rate_schedule(config), b1=0.9, b2=0.95, eps=1e-8,
                      weight_decay=config.weight_decay, mask=_decay_mask)
  if config.grad_clip:
    return optax.chain(optax.clip_by_global_norm(config.grad_clip), adamw)
  return adamw


def masked_cross_entropy(logits: jax.Array, targets: jax.Array,
                         mask: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Sums of the cross-entropy (nats), of the mask and of the correct argmax where mask is true.

  Args:
    logits: [B, T, V] float.
    targets: [B, T] int; entries where mask is false may be anything (e.g. -100).
    mask: [B, T] bool.

  Returns:
    (sum of -log p(target), number of counted positions, number of counted positions whose
    argmax is the target), float32 scalars.
  """
  mask = mask.astype(jnp.float32)
  safe = jnp.where(mask > 0, targets, 0)
  nll = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), safe)
  correct = (jnp.argmax(logits, axis=-1) == safe).astype(jnp.float32)
  return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(correct * mask)


def _forward(graphdef, params, rest, batch):
  model = nnx.merge(graphdef, params, rest)
  return model(batch["tokens"], reset=batch.get("reset"))


def _sums(graphdef, mesh: jax.sharding.Mesh | None) -> Callable:
  """(params, rest, batch) -> `masked_cross_entropy`'s three sums over the whole batch: directly,
  or with a mesh inside `jax.shard_map` (each device its [B / D, T / S] block, the sums psum'd
  over both axes; parameters replicated, so their gradients are summed over the devices by
  shard_map's transpose)."""
  def local(params, rest, batch):
    return masked_cross_entropy(_forward(graphdef, params, rest, batch), batch["targets"],
                                batch["mask"])
  if mesh is None:
    return local
  P = jax.sharding.PartitionSpec

  def sharded(params, rest, batch):
    return tuple(jax.lax.psum(x, ("data", "seq")) for x in local(params, rest, batch))
  return jax.shard_map(sharded, mesh=mesh, in_specs=(P(), P(), P("data", "seq")),
                       out_specs=(P(), P(), P()))


def fsdp_sharding(shape: tuple[int, ...], mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """Where an array of `shape` lives with parameters sharded FSDP-style over "data": split along
  its first axis whose size the data axis divides (each device holds 1/D of it), replicated when
  none does (scalars, small vectors). The "seq" devices of one data shard hold the same part.

  Example:
    >>> mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "seq"))
    >>> fsdp_sharding((6, 4), mesh).spec == jax.sharding.PartitionSpec("data")
    True
  """
  P = jax.sharding.PartitionSpec
  data = mesh.shape["data"]
  for axis, size in enumerate(shape):
    if size >= data and size % data == 0:
      return jax.sharding.NamedSharding(mesh, P(*([None] * axis + ["data"])))
  return jax.sharding.NamedSharding(mesh, P())


def place_train_state(params: Any, opt_state: Any, rest: Any, mesh: jax.sharding.Mesh,
                      fsdp: bool = False) -> tuple[Any, Any, Any]:
  """(params, opt_state, rest) on `mesh`: replicated on every device, or with `fsdp` the
  parameters and optimiser state sharded over "data" (`fsdp_sharding`; `rest` replicated)."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  rest = jax.device_put(rest, replicated)
  if not fsdp:
    return (*jax.device_put((params, opt_state), replicated), rest)
  place = lambda x: jax.device_put(x, fsdp_sharding(np.shape(x), mesh))
  return jax.tree.map(place, params), jax.tree.map(place, opt_state), rest


def make_train_step(graphdef, tx: optax.GradientTransformation,
                    mesh: jax.sharding.Mesh | None = None, fsdp: bool = False) -> Callable:
  """A jitted (params, rest, opt_state, batch) -> (params, opt_state, loss, grad_norm).

  `rest` is the model's non-parameter state (`nnx.split(model, nnx.Param, ...)`). `params` and
  `opt_state` are donated: their buffers hold the new values, so each is held once per step, and
  the arrays passed in must not be used again. With a `mesh` (`parse_mesh`) the batch is sharded
  over its "data" and "seq" axes and the graphdef's layers must take T sharded over "seq"
  (`build_model(config, "seq")`); the step computes the same function up to float reassociation.
  With `fsdp` the parameters and optimiser state stay sharded over "data" between steps
  (`place_train_state`): the step gathers the parameters where the model reads them (the
  shard_map's replicated inputs), and the update runs on each device's part.
  """
  sums = _sums(graphdef, mesh)

  def loss_fn(params, rest, batch):
    total, count, _ = sums(params, rest, batch)
    return total / jnp.maximum(count, 1.0)

  def keep_sharded(tree):
    if not fsdp or mesh is None:
      return tree
    return jax.tree.map(
        lambda x: jax.lax.with_sharding_constraint(x, fsdp_sharding(x.shape, mesh)), tree)

  @functools.partial(jax.jit, donate_argnums=(0, 2))
  def train_step(params, rest, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch)
    updates, opt_state = tx.update(keep_sharded(grads), opt_state, params)
    params = optax.apply_updates(params, updates)
    return keep_sharded(params), keep_sharded(opt_state), loss, optax.tree.norm(grads)

  return train_step


def make_eval_step(graphdef, mesh: jax.sharding.Mesh | None = None) -> Callable:
  """A jitted (params, rest, batch) -> (sum nll, count, correct) (see `masked_cross_entropy`;
  `mesh` as in `make_train_step`)."""
  return jax.jit(_sums(graphdef, mesh))


@functools.lru_cache(maxsize=8)
def compiled_steps(config: ExperimentConfig, mesh: jax.sharding.Mesh | None = None,
                   fsdp: bool = False
                   ) -> tuple[Any, optax.GradientTransformation, Callable, Callable]:
  """(graphdef, optimiser, train_step, eval_step) of a config (on `mesh`, see `parse_mesh`;
  `fsdp` as in `make_train_step`), cached per config and mesh so that runs of one config in one
  process (a resume, the tests) share their compilations."""
  axis = None if mesh is None or mesh.shape["seq"] == 1 else "seq"
  graphdef = nnx.split(nnx.eval_shape(lambda: build_model(config, axis)))[0]
  tx = make_optimizer(config)
  return (graphdef, tx, make_train_step(graphdef, tx, mesh, fsdp),
          make_eval_step(graphdef, mesh))


def evaluate_batches(eval_step: Callable, params: Any, rest: Any,
                     batches: Iterable[dict[str, np.ndarray]]) -> dict[str, float]:
  """Loss (nats per target), bits per target and argmax accuracy over `batches`."""
  total = count = correct = 0.0
  for batch in batches:
    t, c, k = eval_step(params, rest, batch)
    total, count, correct = total + float(t), count + float(c), correct + float(k)
  if count == 0:
    return {"loss": math.nan, "bpb": math.nan, "accuracy": math.nan, "targets": 0}
  loss = total / count
  return {"loss": loss, "bpb": loss / math.log(2.0), "accuracy": correct / count,
          "targets": int(count)}
