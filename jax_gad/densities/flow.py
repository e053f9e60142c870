"""RealNVP normalizing flow (affine coupling layers in Flax) trained with optax.

Model. Rows are standardised per dimension with the training mean and
standard deviation (a constant training dimension keeps scale 1), then pass
through ``n_layers`` affine coupling layers (Dinh et al., RealNVP): layer i
keeps the dimensions of parity ``i % 2`` and maps the others to
``x * exp(s) + t``, with ``(s, t)`` from an MLP of the kept ones. The
log-scale is bounded, ``s = b tanh(raw / b)`` with ``b = scale_bound``, and the
MLP's last layer starts at zero, so the flow starts as the identity. The base
density is the standard normal, so the exact log-likelihood is

  log p(x) = log N(f(z(x)); 0, I) + sum_layers sum s - sum_d log std_d,

with z the standardised row. :func:`score` returns ``-log p(x)``.

Training. The training rows are split (from the key) into a fitting part and
a held-out part of ``val_fraction``; AdamW (optax) with a linear warm-up and
cosine decay of the learning rate and global-norm gradient clipping minimises
the mean negative log-likelihood over shuffled minibatches; each epoch is one
jit-compiled ``lax.scan`` over its steps. After every epoch the held-out
negative log-likelihood is measured; the parameters with the best held-out
value are kept, and training stops after ``patience`` epochs without
improvement (or at ``epochs``). A non-finite training or held-out loss stops
training with a ValueError naming the epoch and the level.

Several levels (:func:`fit_many`). Levels have different widths, so training
them in one ``vmap``-ed program means padding every level to the widest one
(padded dimensions are masked out of the couplings and the likelihood). That
multiplies the work by ``L * max(D) / sum(D)`` (5.5x for B4's nine levels), so
it pays only where the small levels alone leave the device idle;
``vmap_levels`` (default False) switches it on; docs/densities.md has the measured
times. The two modes draw different initial weights (the padded shapes
differ), so they are each deterministic but not equal to each other.

Why not distrax: distrax 0.1.9 installs and runs against jax 0.10.2, but it
pulls in ``tfp-nightly`` (a dated TensorFlow Probability snapshot) and chex,
and its ``MaskedCoupling`` + ``ScalarAffine`` would replace only the ~30 lines
of :class:`Coupling` below, while the masking of padded dimensions for the
vmapped levels is ours either way. docs/densities.md has the measurement.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Sequence

from flax import struct
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_gad import densities
from jax_gad import gaussian as core
from jax_gad.densities import _checks

Array = jax.Array

_LOG_2PI = math.log(2.0 * math.pi)


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """Hyper-parameters of the flow and its training.

  Attributes:
    n_layers: affine coupling layers (>= 1; use an even number so every
      dimension is transformed equally often).
    hidden: width of each conditioner MLP's hidden layers.
    depth: hidden layers per conditioner MLP (>= 1).
    scale_bound: bound b on the log-scale, ``s = b tanh(raw / b)`` (> 0).
    learning_rate: peak AdamW learning rate (> 0).
    weight_decay: AdamW decoupled weight decay (>= 0).
    warmup: fraction of all steps spent in linear warm-up, in [0, 1).
    clip_norm: global gradient-norm clip (> 0).
    epochs: maximum number of epochs (>= 1).
    batch_size: minibatch rows (>= 1; capped at the fitting rows).
    val_fraction: held-out fraction of the training rows for early stopping,
      in (0, 1); at least one row is held out and one kept.
    patience: epochs without a better held-out loss before stopping (>= 1).
    vmap_levels: train all levels of :func:`fit_many` in one vmapped program
      (padded to the widest level) instead of one program per level.
  """

  n_layers: int = 6
  hidden: int = 128
  depth: int = 2
  scale_bound: float = 3.0
  learning_rate: float = 1e-3
  weight_decay: float = 1e-4
  warmup: float = 0.05
  clip_norm: float = 10.0
  epochs: int = 200
  batch_size: int = 64
  val_fraction: float = 0.2
  patience: int = 20
  vmap_levels: bool = False

  def __post_init__(self):
    o = 'FlowConfig'
    for f in ('n_layers', 'hidden', 'depth', 'epochs', 'batch_size', 'patience'):
      _checks.positive_int(o, f, getattr(self, f))
    _checks.real(o, 'scale_bound', self.scale_bound, low=0.0, low_open=True)
    _checks.real(o, 'learning_rate', self.learning_rate, low=0.0, low_open=True)
    _checks.real(o, 'weight_decay', self.weight_decay, low=0.0)
    _checks.real(o, 'warmup', self.warmup, low=0.0, high=1.0, high_open=True)
    _checks.real(o, 'clip_norm', self.clip_norm, low=0.0, low_open=True)
    _checks.real(
      o, 'val_fraction', self.val_fraction, low=0.0, high=1.0, low_open=True, high_open=True
    )
    if not isinstance(self.vmap_levels, bool):
      raise ValueError(f'{o}.vmap_levels must be a bool, got {self.vmap_levels!r}.')


# ---------------------------------------------------------------------------
# Flax modules
# ---------------------------------------------------------------------------


class Coupling(nn.Module):
  """One affine coupling layer; keeps the dimensions of parity ``parity``.

  Attributes:
    parity: 0 or 1, which dimensions (by index parity) condition the rest.
    hidden: conditioner MLP width.
    depth: conditioner hidden layers.
    scale_bound: bound on the log-scale.
  """

  parity: int
  hidden: int
  depth: int
  scale_bound: float

  @nn.compact
  def __call__(self, x: Array, dim_mask: Array) -> tuple[Array, Array]:
    """Maps (n, D) rows to (y (n, D), log|det dy/dx| (n,)); ``dim_mask`` (D,) marks real dims."""
    d = x.shape[-1]
    keep = (jnp.arange(d) % 2 == self.parity).astype(x.dtype) * dim_mask
    change = dim_mask - keep
    h = x * keep
    for _ in range(self.depth):
      h = nn.gelu(nn.Dense(self.hidden)(h))
    out = nn.Dense(2 * d, kernel_init=nn.initializers.zeros, bias_init=nn.initializers.zeros)(h)
    raw, shift = out[..., :d], out[..., d:]
    log_scale = self.scale_bound * jnp.tanh(raw / self.scale_bound) * change
    y = x * jnp.exp(log_scale) + shift * change
    return y, jnp.sum(log_scale, axis=-1)


class RealNVP(nn.Module):
  """A stack of :class:`Coupling` layers with alternating parity."""

  n_layers: int
  hidden: int
  depth: int
  scale_bound: float

  @nn.compact
  def __call__(self, x: Array, dim_mask: Array) -> tuple[Array, Array]:
    log_det = jnp.zeros(x.shape[:-1], x.dtype)
    for i in range(self.n_layers):
      x, ld = Coupling(i % 2, self.hidden, self.depth, self.scale_bound)(x, dim_mask)
      log_det = log_det + ld
    return x, log_det


def _module(config: FlowConfig) -> RealNVP:
  return RealNVP(config.n_layers, config.hidden, config.depth, config.scale_bound)


# ---------------------------------------------------------------------------
# State and likelihood
# ---------------------------------------------------------------------------


@struct.dataclass
class FlowState:
  """A trained flow for rows of width D (possibly stored padded to Dp >= D).

  Attributes:
    params: the :class:`RealNVP` parameters (for width Dp).
    mean: (D,) standardisation mean.
    std: (D,) standardisation scale (1 for constant training dimensions).
    dim_mask: (Dp,) 1 for the D real dimensions, 0 for padding.
    held_out_nll: () best mean negative log-likelihood of the held-out rows.
    epochs: () epochs trained.
    n_layers, hidden, depth, scale_bound: the module's shape (static).
  """

  params: Any
  mean: Array
  std: Array
  dim_mask: Array
  held_out_nll: Array
  epochs: Array
  n_layers: int = struct.field(pytree_node=False)
  hidden: int = struct.field(pytree_node=False)
  depth: int = struct.field(pytree_node=False)
  scale_bound: float = struct.field(pytree_node=False)


def _base_logp(z: Array, dim_mask: Array) -> Array:
  return -0.5 * jnp.sum(dim_mask * z * z, axis=-1) - 0.5 * jnp.sum(dim_mask) * _LOG_2PI


def _std_loss(module, params, z, dim_mask):
  """Mean negative log-likelihood of standardised (padded) rows."""
  y, log_det = module.apply(params, z, dim_mask)
  return -jnp.mean(_base_logp(y, dim_mask) + log_det)


def _standardise(state: FlowState, x: Array) -> Array:
  z = (x - state.mean) / state.std
  pad = state.dim_mask.shape[0] - z.shape[1]
  return jnp.pad(z, ((0, 0), (0, pad))) if pad else z


@jax.jit
def _forward_jit(state: FlowState, x: Array) -> tuple[Array, Array]:
  module = RealNVP(state.n_layers, state.hidden, state.depth, state.scale_bound)
  y, log_det = module.apply(state.params, _standardise(state, x), state.dim_mask)
  return y[:, : x.shape[1]], log_det - jnp.sum(jnp.log(state.std))


@jax.jit
def _log_prob_jit(state: FlowState, x: Array) -> Array:
  module = RealNVP(state.n_layers, state.hidden, state.depth, state.scale_bound)
  y, log_det = module.apply(state.params, _standardise(state, x), state.dim_mask)
  return _base_logp(y, state.dim_mask) + log_det - jnp.sum(jnp.log(state.std))


def _check_state(state) -> None:
  if not isinstance(state, FlowState):
    raise ValueError(f'state must be a FlowState, got {type(state).__name__}.')


def _input(state: FlowState, x) -> Array:
  _check_state(state)
  return core.check_features(
    x, 'x', min_samples=0, width=state.mean.shape[0], dtype=state.mean.dtype
  )


def forward(state: FlowState, x) -> tuple[Array, Array]:
  """The flow's map of raw rows to the base space.

  Args:
    state: trained :class:`FlowState`.
    x: (n, D) rows.

  Returns:
    (y, log_det): (n, D) base-space rows and (n,) ``log|det dy/dx|``,
    standardisation included.
  """
  return _forward_jit(state, _input(state, x))


def log_prob(state: FlowState, x) -> Array:
  """Exact log-density of each row of ``x`` (n, D), in the raw units; (n,)."""
  return _log_prob_jit(state, _input(state, x))


def score(state: FlowState, x) -> Array:
  """Negative log-likelihood of each row, (n,); larger = more anomalous."""
  return -log_prob(state, x)


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


@struct.dataclass
class _Train:
  """Per-level training state (stacked over levels)."""

  params: Any
  opt_state: Any
  best_params: Any
  best_val: Array
  bad: Array
  active: Array
  epochs: Array


def _schedule(config: FlowConfig, total_steps: int):
  """Linear warm-up from 0 over ``warmup`` of the steps, then cosine decay to 1 % of the peak."""
  warmup = int(config.warmup * total_steps)
  if warmup == 0:  # (optax logs a warning for a zero-step warm-up)
    return optax.cosine_decay_schedule(config.learning_rate, max(total_steps, 1), alpha=0.01)
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=config.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(total_steps, warmup + 1),
    end_value=0.01 * config.learning_rate,
  )


def _optimizer(config: FlowConfig, total_steps: int):
  return optax.chain(
    optax.clip_by_global_norm(config.clip_norm),
    optax.adamw(_schedule(config, total_steps), weight_decay=config.weight_decay),
  )


def _split_sizes(config: FlowConfig, n: int) -> tuple[int, int, int, int]:
  """(n_fit, n_val, batch, steps per epoch)."""
  n_val = min(max(1, int(round(config.val_fraction * n))), n - 1)
  n_fit = n - n_val
  batch = min(config.batch_size, n_fit)
  return n_fit, n_val, batch, n_fit // batch


@functools.lru_cache(maxsize=64)
def _make_epoch(config: FlowConfig, batch: int, steps: int):
  """(optimizer, vmapped jitted epoch ``(train, x_fit, x_val, mask, key) -> (train, loss, val)``).

  Cached per (config, batch, steps), so folds and levels of equal shapes reuse
  one compiled program.
  """
  tx = _optimizer(config, config.epochs * steps)
  module = _module(config)
  patience = config.patience

  def one_level(tr: _Train, x_fit, x_val, mask, key):
    perm = jax.random.permutation(key, x_fit.shape[0])[: steps * batch].reshape(steps, batch)

    def loss_fn(p, xb):
      return _std_loss(module, p, xb, mask)

    def step(carry, idx):
      params, opt_state = carry
      loss, grads = jax.value_and_grad(loss_fn)(params, x_fit[idx])
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    (params, opt_state), losses = jax.lax.scan(step, (tr.params, tr.opt_state), perm)
    train_loss = jnp.mean(losses)
    val = loss_fn(params, x_val)
    act = tr.active
    better = act & (val < tr.best_val)

    def pick(flag, new, old):
      return jax.tree.map(lambda a, b: jnp.where(flag, a, b), new, old)

    bad = jnp.where(act, jnp.where(better, 0, tr.bad + 1), tr.bad)
    new = _Train(
      params=pick(act, params, tr.params),
      opt_state=pick(act, opt_state, tr.opt_state),
      best_params=pick(better, params, tr.best_params),
      best_val=jnp.where(better, val, tr.best_val),
      bad=bad,
      active=act & (bad < patience),
      epochs=tr.epochs + act.astype(jnp.int32),
    )
    # Losses of levels that already stopped are reported as 0 (not checked).
    return new, jnp.where(act, train_loss, 0.0), jnp.where(act, val, 0.0)

  return tx, jax.jit(jax.vmap(one_level))


def _train_stack(config: FlowConfig, zs: list, keys: list, names: list, width: int):
  """Trains one flow per standardised level in ``zs`` (all padded to ``width``), vmapped."""
  n = zs[0].shape[0]
  n_fit, n_val, batch, steps = _split_sizes(config, n)
  dtype = zs[0].dtype
  module = _module(config)
  tx, epoch_fn = _make_epoch(config, batch, steps)
  fits, vals, masks, params, epoch_keys = [], [], [], [], []
  for z, key in zip(zs, keys):
    k_split, k_init, k_epochs = jax.random.split(key, 3)
    order = jax.random.permutation(k_split, n)
    zp = jnp.pad(z, ((0, 0), (0, width - z.shape[1])))
    vals.append(zp[order[:n_val]])
    fits.append(zp[order[n_val:]])
    mask = (jnp.arange(width) < z.shape[1]).astype(dtype)
    masks.append(mask)
    params.append(module.init(k_init, zp[:1], mask))
    epoch_keys.append(k_epochs)

  def stack(xs):
    return jax.tree.map(lambda *a: jnp.stack(a), *xs)

  params = stack(params)
  x_fit, x_val, mask = stack(fits), stack(vals), stack(masks)
  levels = len(zs)
  train = _Train(
    params=params,
    opt_state=jax.vmap(tx.init)(params),
    best_params=params,
    best_val=jnp.full((levels,), jnp.inf, dtype),
    bad=jnp.zeros((levels,), jnp.int32),
    active=jnp.ones((levels,), bool),
    epochs=jnp.zeros((levels,), jnp.int32),
  )
  for epoch in range(config.epochs):
    ekeys = jnp.stack([jax.random.fold_in(k, epoch) for k in epoch_keys])
    train, loss, val = epoch_fn(train, x_fit, x_val, mask, ekeys)
    loss, val = np.asarray(loss), np.asarray(val)
    bad = np.flatnonzero(~(np.isfinite(loss) & np.isfinite(val)))
    if bad.size:
      i = int(bad[0])
      which, value = ('training', loss[i]) if not np.isfinite(loss[i]) else ('held-out', val[i])
      raise ValueError(
        f'flow {which} loss became non-finite ({value}) at epoch {epoch + 1} of '
        f'level {names[i]}; lower FlowConfig.learning_rate (now '
        f'{config.learning_rate:g}) or check the features.'
      )
    if not bool(np.asarray(train.active).any()):
      break
  return train, masks


def _prepare(x_train, name: str):
  x = core.check_features(x_train, f'x_train (level {name})', min_samples=2)
  mean = jnp.mean(x, axis=0)
  std = jnp.std(x, axis=0)
  std = jnp.where(std > 0, std, 1.0)
  return x, mean, std, (x - mean) / std


def _states(config: FlowConfig, train: _Train, masks, means, stds) -> list:
  out = []
  for i, (mask, mean, std) in enumerate(zip(masks, means, stds)):
    params = jax.tree.map(lambda a: a[i], train.best_params)
    # held-out NLL in raw units: standardised NLL + sum log std.
    nll = train.best_val[i] + jnp.sum(jnp.log(std))
    out.append(
      FlowState(
        params=params,
        mean=mean,
        std=std,
        dim_mask=mask,
        held_out_nll=nll,
        epochs=train.epochs[i],
        n_layers=config.n_layers,
        hidden=config.hidden,
        depth=config.depth,
        scale_bound=config.scale_bound,
      )
    )
  return out


def _check_config(config) -> None:
  if not isinstance(config, FlowConfig):
    raise ValueError(f'config must be a FlowConfig, got {type(config).__name__}.')


def fit(config: FlowConfig, x_train, key, name: str = '0') -> FlowState:
  """Trains a flow on rows ``x_train`` (n, D), n >= 2.

  Args:
    config: :class:`FlowConfig`.
    x_train: (n, D) finite training rows.
    key: PRNG key (held-out split, initial weights, minibatch order).
    name: the level's name for error messages.

  Returns:
    :class:`FlowState` with the parameters of the best held-out epoch.

  Raises:
    ValueError: bad rows, or a non-finite loss (naming the epoch and level).
  """
  _check_config(config)
  _, mean, std, z = _prepare(x_train, name)
  train, masks = _train_stack(config, [z], [key], [str(name)], z.shape[1])
  return _states(config, train, masks, [mean], [std])[0]


def fit_many(config: FlowConfig, xs: Sequence, keys: Sequence, names: Sequence[str]) -> list:
  """Trains one flow per level; vmapped over levels when ``config.vmap_levels``.

  Args:
    config: :class:`FlowConfig`.
    xs: per level (n, D_l) rows; n must agree across levels when vmapping.
    keys: one PRNG key per level.
    names: level names for error messages.

  Returns:
    list of :class:`FlowState`; equals ``[fit(config, x, k, name) ...]`` when
    ``vmap_levels`` is False.
  """
  _check_config(config)
  if not config.vmap_levels:
    return [fit(config, x, k, nm) for x, k, nm in zip(xs, keys, names)]
  prepared = [_prepare(x, str(nm)) for x, nm in zip(xs, names)]
  rows = {p[0].shape[0] for p in prepared}
  if len(rows) != 1:
    raise ValueError(
      f'FlowConfig.vmap_levels needs the same number of rows in every level, got {sorted(rows)}.'
    )
  width = max(p[0].shape[1] for p in prepared)
  train, masks = _train_stack(
    config, [p[3] for p in prepared], list(keys), [str(n) for n in names], width
  )
  return _states(config, train, masks, [p[1] for p in prepared], [p[2] for p in prepared])


def describe(state: FlowState) -> dict:
  """What training reached: ``epochs`` and the best ``held_out_nll``."""
  return {'epochs': int(state.epochs), 'held_out_nll': float(state.held_out_nll)}


DENSITY = densities.register(
  densities.Density(
    name='flow',
    config=FlowConfig,
    fit=fit,
    scorers={'nll': score},
    default_scorer='nll',
    fit_many=fit_many,
    describe=describe,
  )
)
