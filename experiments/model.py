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


def build_model(config: ExperimentConfig) -> TransformerLM:
  """The model of `config`, initialised from `config.seed`."""
  return TransformerLM(config.model_config(), rngs=nnx.Rngs(config.seed))


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


def make_train_step(graphdef, tx: optax.GradientTransformation) -> Callable:
  """A jitted (params, rest, opt_state, batch) -> (params, opt_state, loss, grad_norm).

  `rest` is the model's non-parameter state (`nnx.split(model, nnx.Param, ...)`). `params` and
  `opt_state` are donated: their buffers hold the new values, so each is held once per step, and
  the arrays passed in must not be used again.
  """
  def loss_fn(params, rest, batch):
    total, count, _ = masked_cross_entropy(_forward(graphdef, params, rest, batch),
                                           batch["targets"], batch["mask"])
    return total / jnp.maximum(count, 1.0)

  @functools.partial(jax.jit, donate_argnums=(0, 2))
  def train_step(params, rest, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, rest, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

  return train_step


def make_eval_step(graphdef) -> Callable:
  """A jitted (params, rest, batch) -> (sum nll, count, correct) (see `masked_cross_entropy`)."""
  @jax.jit
  def eval_step(params, rest, batch):
    return masked_cross_entropy(_forward(graphdef, params, rest, batch), batch["targets"],
                                batch["mask"])
  return eval_step


@functools.lru_cache(maxsize=8)
def compiled_steps(config: ExperimentConfig) -> tuple[Any, optax.GradientTransformation,
                                                      Callable, Callable]:
  """(graphdef, optimiser, train_step, eval_step) of a config, cached per config so that runs
  of one config in one process (a resume, the tests) share their compilations."""
  graphdef = nnx.split(nnx.eval_shape(lambda: build_model(config)))[0]
  tx = make_optimizer(config)
  return graphdef, tx, make_train_step(graphdef, tx), make_eval_step(graphdef)


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
