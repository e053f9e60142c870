r"""Our Flax coupling layers vs distrax 0.1.9's MaskedCoupling, same model and training.

Not part of the package (distrax is not a dependency). To rerun:

  pip install --target /tmp/distrax_pkgs --no-deps distrax==0.1.9 chex==0.1.92 \
      tfp-nightly==0.26.0.dev20261027 toolz decorator gast
  PYTHONPATH=/tmp/distrax_pkgs:. python experiments/distrax_comparison.py

Both flows: 6 affine coupling layers, alternating parity masks, a 2 x 64 GELU
MLP conditioner per layer with zero-initialised output, log-scale bounded by
3 tanh(raw / 3), AdamW + warm-up/cosine schedule, full-batch-free minibatch
training on two moons (600 train rows, 300 test rows), same initial weights
and minibatch order. Prints the wall time per epoch (after compilation), the
compile time and the test log-likelihood of each.
"""

import time

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import make_moons

from jax_gad.densities import flow

EPOCHS, BATCH, LAYERS, HIDDEN = 60, 128, 6, 64


class Conditioner(nn.Module):
  """Same MLP as jax_gad.densities.flow.Coupling, returning (log_scale, shift) params."""

  d: int

  @nn.compact
  def __call__(self, h):
    for _ in range(2):
      h = nn.gelu(nn.Dense(HIDDEN)(h))
    return nn.Dense(2 * self.d, kernel_init=nn.initializers.zeros)(h)


class DistraxFlow(nn.Module):
  d: int

  @nn.compact
  def __call__(self, x):
    layers = []
    for i in range(LAYERS):
      mask = jnp.arange(self.d) % 2 == i % 2
      cond = Conditioner(self.d)

      def bij(params):
        raw, shift = params[..., : self.d], params[..., self.d :]
        return distrax.ScalarAffine(shift=shift, log_scale=3.0 * jnp.tanh(raw / 3.0))

      layers.append(distrax.MaskedCoupling(mask=mask, conditioner=cond, bijector=bij))
    chain = distrax.Chain(layers[::-1])  # Chain applies the last element first
    y, log_det = chain.forward_and_log_det(x)
    return -0.5 * jnp.sum(y * y, -1) - 0.5 * self.d * jnp.log(2 * jnp.pi) + log_det


def ours_logp(params, x):
  module = flow.RealNVP(LAYERS, HIDDEN, 2, 3.0)
  y, log_det = module.apply(params, x, jnp.ones(x.shape[1]))
  return -0.5 * jnp.sum(y * y, -1) - 0.5 * x.shape[1] * jnp.log(2 * jnp.pi) + log_det


def train(logp, params, x, key):
  steps = x.shape[0] // BATCH
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 3e-3, steps * 3, EPOCHS * steps), 1e-4)

  @jax.jit
  def epoch(params, opt, key):
    idx = jax.random.permutation(key, x.shape[0])[: steps * BATCH].reshape(steps, BATCH)

    def step(carry, i):
      p, o = carry
      g = jax.grad(lambda p: -jnp.mean(logp(p, x[i])))(p)
      u, o = tx.update(g, o, p)
      return (optax.apply_updates(p, u), o), None

    return jax.lax.scan(step, (params, opt), idx)[0]

  opt = tx.init(params)
  t0 = time.perf_counter()
  params, opt = jax.block_until_ready(epoch(params, opt, jax.random.fold_in(key, 0)))
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  for e in range(1, EPOCHS):
    params, opt = epoch(params, opt, jax.random.fold_in(key, e))
  jax.block_until_ready(params)
  per_epoch = (time.perf_counter() - t0) / (EPOCHS - 1)
  return params, first - per_epoch, per_epoch


def main():
  x, _ = make_moons(900, noise=0.08, random_state=0)
  x = ((x - x[:600].mean(0)) / x[:600].std(0)).astype(np.float32)
  train_x, test_x = jnp.asarray(x[:600]), jnp.asarray(x[600:])
  key = jax.random.key(0)
  ours = flow.RealNVP(LAYERS, HIDDEN, 2, 3.0).init(key, train_x[:1], jnp.ones(2))
  theirs = DistraxFlow(2).init(key, train_x[:1])
  for name, logp, params in [
    ('jax_gad Coupling', ours_logp, ours),
    ('distrax MaskedCoupling', DistraxFlow(2).apply, theirs),
  ]:
    params, compile_s, per_epoch = train(logp, params, train_x, key)
    ll = float(jnp.mean(logp(params, test_x)))
    print(
      f'{name}: compile {compile_s:.2f} s, {1e3 * per_epoch:.2f} ms/epoch, '
      f'test log-likelihood {ll:.4f} (standardised units)'
    )


if __name__ == '__main__':
  main()
