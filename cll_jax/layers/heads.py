"""Classification heads and their pairwise bounds.

The head is the last (dense) layer. Certificates use the exact pairwise
factor of the head, ||w_i - w_j|| for the logit difference f_i - f_j, times
the body's bound (CLL supp. eq. 2 and 18), never a single head norm:

* `DenseHead`: an unconstrained dense layer (what CLL uses on constrained
  bodies instead of last-layer normalisation, table B2's text);
* `LLNHead`: last-layer normalisation (Singla et al. 2022): the class
  vectors w_i / ||w_i||. Unit rows do not make the head 1-Lipschitz (its
  norm can reach sqrt(N)); pairwise, ||w_i - w_j|| <= 2, and that exact
  factor is what certifies, not margin / sqrt(2).

Bound kind: the pairwise factor is computed exactly from the weights
(column differences, no Gram cancellation); the head's global norm, which
only the lambda K^2 regulariser and the reported global constant use, is a
power-iteration estimate in training and a sound bound in certification.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cll_jax import lipschitz
from cll_jax.layers import base
from cll_jax.layers.unconstrained import LipschitzDense
from cll_jax.operators import LinearOperator


def normalized_columns(kernel: jax.Array) -> jax.Array:
  """w_:,i / ||w_:,i|| for a (d, N) kernel."""
  norms = lipschitz.safe_norm(jnp.sum(kernel * kernel, axis=0))
  return kernel / jnp.maximum(norms, 1e-30)


class LLNDense(nn.Module):
  """Dense layer with unit-norm class vectors: `(x @ W_hat + b, ||W_hat||)`."""
  features: int
  num_power_iterations: int = 5
  kernel_init: Any = base.kaiming_normal

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    kernel = self.param('kernel', self.kernel_init,
                        (x.shape[-1], self.features), jnp.float32)
    op = LinearOperator(normalized_columns(kernel).astype(x.dtype), 'dense',
                        (x.shape[-1],), precision=base.precision(self))
    y = op(x) + self.param('bias', nn.initializers.zeros, (self.features,),
                           jnp.float32).astype(x.dtype)
    return y, base.power_iterated_norm(self, op, self.num_power_iterations)


@dataclasses.dataclass(frozen=True)
class DenseHead:
  """An unconstrained dense head; K_ij = ||w_i - w_j|| * body."""
  name: ClassVar[str] = 'dense'

  def module(self, num_classes: int, num_power_iterations: int) -> nn.Module:
    return LipschitzDense(num_classes,
                          num_power_iterations=num_power_iterations,
                          name='head')

  def class_vectors(self, params) -> jax.Array:
    return params['kernel']

  def pairwise(self, params) -> jax.Array:
    """(N, N) exact ||w_i - w_j||, zero diagonal."""
    return lipschitz.pairwise_column_distances(self.class_vectors(params))

  def class_vector_error(self, dim: int, forward_dtype) -> float:
    """Bound of ||w^_i - w_i|| of the forward pass's class vectors."""
    del dim, forward_dtype
    return 0.0  # the stored kernel itself

  def operator(self, params) -> LinearOperator:
    vectors = self.class_vectors(params)
    return LinearOperator(vectors, 'dense', (vectors.shape[0],),
                          precision=base.HIGHEST)

  def power_iteration_operators(self, params, input_shape):
    del input_shape
    return {'u': self.operator(params)}


@dataclasses.dataclass(frozen=True)
class LLNHead(DenseHead):
  """Last-layer normalisation; K_ij = ||w_i/|w_i| - w_j/|w_j||| * body."""
  name: ClassVar[str] = 'lln'

  def module(self, num_classes: int, num_power_iterations: int) -> nn.Module:
    return LLNDense(num_classes, num_power_iterations=num_power_iterations,
                    name='head')

  def class_vectors(self, params) -> jax.Array:
    return normalized_columns(params['kernel'])

  def class_vector_error(self, dim: int, forward_dtype) -> float:
    # w / ||w||: a sum of dim squares, a square root and a division.
    from cll_jax import _rounding  # pylint: disable=g-import-not-at-top
    return _rounding.gamma(dim + 4, forward_dtype)


HEADS = {'dense': DenseHead(), 'lln': LLNHead()}
