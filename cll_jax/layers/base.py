"""The Lipschitz contract shared by every layer family.

A layer of a `cll_jax.models.LipschitzNetwork` comes as a *spec* (a frozen
dataclass: what the layer is) and a Flax *module* (how it computes):

* `module(x) -> (y, training_bound)`: the output and the value of the
  layer's Lipschitz constant (L2) that the training loss uses. It may be an
  estimate (power iteration converges from below) and may carry gradient.
* `spec.certified_bound(variables, input_shape) -> scalar`: an upper bound
  of the layer's Lipschitz constant that is *proven*, computed from the
  weights at `precision=HIGHEST` and rounded up, for the eval-mode layer
  (the one certification runs). It is what certificates use, never the
  training value.
* `spec.rounding_step(...)`: how the layer's float rounding in the
  certification forward pass grows the logits' error bound
  (`cll_jax.forward_error`), so that margins can give it up.
* `spec.bound_kind`: how that proof goes. `PROVEN`: by construction (an
  orthogonal map, a series with a bounded remainder, ...); the certified
  bound follows from the construction plus sound bounds of the few norms it
  depends on. `ESTIMATED`: the layer is unconstrained and trained with a
  power-iteration estimate; its certified bound is a guaranteed upper bound
  of its operator norm (`cll_jax.sound_bounds`).

Training vs evaluation: a module is in training mode when the
`power_iteration` collection is mutable (`apply(..., mutable=[...])`, as
`train_step` does); then it advances its power iteration and may use cheaper
settings (fewer series terms, default matmul precision). With the collection
frozen (evaluation, certification) it uses its evaluation settings and
`precision=HIGHEST`: on GPUs/TPUs the default TF32/bf16 matmuls have ~1e-3
relative errors, enough to break a 1-Lipschitz guarantee.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp

from cll_jax import lipschitz
from cll_jax.operators import LinearOperator

POWER_ITERATION = 'power_iteration'
PROVEN = 'proven'
ESTIMATED = 'estimated'

# Kaiming normal with fan_in and gain sqrt(2), untruncated, as in the paper's
# PyTorch code (`kaiming_normal_`).
kaiming_normal = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')

HIGHEST = jax.lax.Precision.HIGHEST


def is_training(module: nn.Module) -> bool:
  """Training mode: the power-iteration collection is mutable."""
  return module.is_mutable_collection(POWER_ITERATION)


def precision(module: nn.Module) -> jax.lax.Precision | None:
  """HIGHEST outside training (what is certified), the default inside."""
  return None if is_training(module) else HIGHEST


def power_iterated_norm(module: nn.Module, op: LinearOperator,
                        num_iterations: int, name: str = 'u') -> jax.Array:
  """||op|| by warm-started power iteration; the iterate lives in the module.

  Reads the iterate `name` of the `power_iteration` collection, advances it
  `num_iterations` steps when the collection is mutable (training) and stores
  it back; frozen (evaluation) it is only read. The estimate converges to
  the norm from below and carries the spectral-norm gradient (see
  `lipschitz.power_iteration`).
  """
  u = module.variable(
      POWER_ITERATION, name,
      lambda: lipschitz.random_unit_vector(
          module.make_rng('params'), op.input_shape, op.kernel.dtype))
  steps = num_iterations if is_training(module) else 0
  new_u, sigma = lipschitz.power_iteration(op, u.value, steps)
  if steps:
    u.value = new_u
  return sigma


class LayerSpec(Protocol):
  """What a network needs of a layer family (see the module docstring)."""
  bound_kind: ClassVar[str]
  # Dense layers take flat inputs: the network flattens before them.
  flattens: ClassVar[bool]
  # Whether the network applies its activation after the layer: False for
  # layers with their own nonlinearity inside (residual CPL/SLL, Sandwich)
  # and for parameter-free reshapes and pooling.
  activated: ClassVar[bool]

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    """The Flax module, `module(x) -> (y, training_bound)`."""

  def output_shape(self, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """Shape of one output example."""

  def certified_bound(self, variables: dict[str, Any],
                      input_shape: tuple[int, ...]) -> jax.Array:
    """Proven upper bound of the eval-mode layer's Lipschitz constant.

    Args:
      variables: this layer's `{'params': ..., 'power_iteration': ...}`.
      input_shape: shape of one input example.
    """

  def power_iteration_operators(
      self, params: dict[str, Any],
      input_shape: tuple[int, ...]) -> dict[str, LinearOperator]:
    """The operator of each power-iteration vector, by variable name."""

  def rounding_step(self, variables: dict[str, Any],
                    input_shape: tuple[int, ...], forms, norm, *, dtype,
                    forward_dtype):
    """Propagates the forward pass's rounding bounds (X, E) through the
    eval-mode layer (`cll_jax.forward_error`)."""


def round_up(x: jax.Array, relative: float) -> jax.Array:
  """`x * (1 + relative)`: a relative allowance for float rounding."""
  return jnp.asarray(x) * (1.0 + relative)
