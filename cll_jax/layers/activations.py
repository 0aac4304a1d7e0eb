"""1-Lipschitz, gradient-norm-preserving activations: MaxMin and Householder.

Both act on channel pairs (a_k, b_k) = (x[..., k], x[..., k + C/2]), the two
halves of the last axis. Per pair each is a piecewise orthogonal map that is
continuous across the pieces, hence 1-Lipschitz in L2 (proven), with an
orthogonal Jacobian almost everywhere.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def _halves(x: jax.Array, name: str) -> tuple[jax.Array, jax.Array]:
  channels = x.shape[-1]
  if channels % 2:
    raise ValueError(f'{name} needs an even number of channels, got '
                     f'{channels}')
  return jnp.split(x, 2, axis=-1)


def minmax(x: jax.Array) -> jax.Array:
  """MinMax activation (Anil et al. 2019) on the last (channel) axis.

  Splits the channels into halves a, b and returns [max(a, b), min(a, b)].
  Per pair (a_k, b_k) this sorts two numbers, so it is a piecewise permutation:
  1-Lipschitz in L2 and gradient-norm preserving. Pairing halves rather than
  neighbours avoids an interleaving reshape; with learned weights on both
  sides the choice of pairs is immaterial. Elementwise selects are used
  instead of a sort, which is about 3x slower on CPU.
  """
  a, b = _halves(x, 'MinMax')
  # A select, not maximum/minimum: at ties a == b those split the gradient
  # 0.5/0.5, which shrinks gradient norms; a select keeps the Jacobian a
  # permutation everywhere.
  a_wins = a >= b
  return jnp.concatenate([jnp.where(a_wins, a, b), jnp.where(a_wins, b, a)],
                         axis=-1)


class Householder(nn.Module):
  """Householder activation HH of Singla, Singla & Feizi (ICLR 2022).

  Per channel pair z = (a_k, b_k) with a learned unit vector
  theta_k = (cos phi_k, sin phi_k):

      sigma(z) = z                               if theta^T z > 0,
                 (I - 2 theta theta^T) z          otherwise.

  Both pieces are orthogonal and agree on the hyperplane theta^T z = 0 (the
  reflection fixes it), so sigma is continuous and 1-Lipschitz. With
  phi = -pi/4, theta = (1, -1)/sqrt(2) and sigma is exactly MinMax
  ([max, min]); that is the initialisation.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    a, b = _halves(x, 'Householder')
    phi = self.param('angle',
                     nn.initializers.constant(-jnp.pi / 4),
                     (x.shape[-1] // 2,), jnp.float32).astype(x.dtype)
    c, s = jnp.cos(phi), jnp.sin(phi)
    inner = c * a + s * b
    keep = inner > 0
    # Reflection: z - 2 (theta^T z) theta.
    ra, rb = a - 2 * inner * c, b - 2 * inner * s
    return jnp.concatenate([jnp.where(keep, a, ra), jnp.where(keep, b, rb)],
                           axis=-1)
