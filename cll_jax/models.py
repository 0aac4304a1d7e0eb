"""The paper's architectures as Lipschitz networks, and the model registry.

Architectures follow CLL table B2 (c(C, K, S, P): C channels, KxK kernel,
stride S, padding P; d(C): dense with C outputs), the two-moons MLP of table
B1, and the ReLU variants used by the CRM/LipLT paper (arXiv 2310.00116). The
last dense layer (the head, `num_classes` outputs) is added by the network.

A `LipschitzNetwork` returns a `NetworkOutput` with the logits and the
Lipschitz information the losses and certification need: the per-layer norm
estimates and the pairwise bounds K_ij of the logit differences.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Union

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from cll_jax import layers
from cll_jax import lipschitz
from cll_jax.operators import LinearOperator, conv_output_spatial


@dataclasses.dataclass(frozen=True)
class Conv:
  """c(features, kernel_size, stride, padding) of table B2."""
  features: int
  kernel_size: int
  stride: int = 1
  padding: int = 0


@dataclasses.dataclass(frozen=True)
class Dense:
  """d(features) of table B2."""
  features: int


LayerSpec = Union[Conv, Dense]

ARCHITECTURES: dict[str, tuple[LayerSpec, ...]] = {
    # Table B1: 2-10-20-40-40-20-10-2 (the head adds the last 2).
    'moons_mlp': tuple(Dense(n) for n in (10, 20, 40, 40, 20, 10)),
    # Table B2.
    '4c3f': (Conv(32, 3, 1, 1), Conv(32, 4, 2, 1), Conv(64, 3, 1, 1),
             Conv(64, 4, 2, 1), Dense(512), Dense(512)),
    '6c2f': (Conv(32, 3, 1, 1), Conv(32, 3, 1, 1), Conv(32, 4, 2, 1),
             Conv(64, 3, 1, 1), Conv(64, 3, 1, 1), Conv(64, 4, 2, 1),
             Dense(512)),
    '8c2f': (Conv(64, 3, 1, 1), Conv(64, 3, 1, 1), Conv(64, 4, 2, 0),
             Conv(128, 3, 1, 1), Conv(128, 3, 1, 1), Conv(128, 4, 2, 0),
             Conv(256, 3, 1, 1), Conv(256, 4, 2, 0), Dense(256)),
    # A small conv net for tests and tiny configs.
    'tiny_cnn': (Conv(8, 3, 1, 1), Conv(8, 4, 2, 1), Dense(32)),
}

# Activations and their slope interval [alpha, beta] (for LipLT).
ACTIVATIONS = {
    'minmax': (layers.minmax, None),  # not elementwise: no slope interval
    'relu': (nn.relu, (0.0, 1.0)),
}


@flax.struct.dataclass
class NetworkOutput:
  """What a forward pass returns.

  Attributes:
    logits: (B, N).
    layer_norms: (L,) spectral-norm estimates of every linear layer, head last.
    pairwise_lipschitz: (N, N) bounds K_ij of f_i - f_j (zero diagonal),
      including the input-scaling factor.
    lipschitz: scalar bound of the whole network (input scale times the
      product of all layer norms).
  """
  logits: jax.Array
  layer_norms: jax.Array
  pairwise_lipschitz: jax.Array
  lipschitz: jax.Array


class LipschitzNetwork(nn.Module):
  """A feed-forward Lipschitz network built from layer specs.

  Attributes:
    architecture: the hidden layers (the head is appended).
    num_classes: outputs of the head.
    activation: 'minmax' or 'relu'.
    input_mean, input_std: optional per-channel normalisation applied first;
      its Lipschitz factor 1 / min(std) enters every bound.
    num_power_iterations: power-iteration steps per training step.
  """
  architecture: tuple[LayerSpec, ...]
  num_classes: int
  activation: str = 'minmax'
  input_mean: tuple[float, ...] | None = None
  input_std: tuple[float, ...] | None = None
  num_power_iterations: int = 5
  bound: str = 'naive'

  @property
  def input_scale(self) -> float:
    return 1.0 if self.input_std is None else 1.0 / min(self.input_std)

  @nn.compact
  def __call__(self, x: jax.Array) -> NetworkOutput:
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'unknown activation {self.activation!r}; known: '
                       f'{sorted(ACTIVATIONS)}')
    act, _ = ACTIVATIONS[self.activation]
    if self.input_mean is not None:
      x = x - jnp.asarray(self.input_mean, x.dtype)
    if self.input_std is not None:
      x = x / jnp.asarray(self.input_std, x.dtype)
    norms = []
    modules = []
    for i, spec in enumerate(self.architecture):
      if isinstance(spec, Conv):
        module = layers.LipschitzConv(
            spec.features, spec.kernel_size, spec.stride, spec.padding,
            num_power_iterations=self.num_power_iterations,
            name=f'layer_{i}')
      else:
        x = x.reshape(x.shape[0], -1)  # flatten: an isometry
        module = layers.LipschitzDense(
            spec.features, num_power_iterations=self.num_power_iterations,
            name=f'layer_{i}')
      x, sigma = module(x)
      modules.append(module)
      norms.append(sigma)
      x = act(x)
    x = x.reshape(x.shape[0], -1)
    head = layers.LipschitzDense(
        self.num_classes, num_power_iterations=self.num_power_iterations,
        name='head')
    logits, head_norm = head(x)
    modules.append(head)
    norms = jnp.stack(norms + [head_norm])
    if self.bound == 'liplt':
      pairwise, bound = self._liplt(modules, tuple(x.shape[1:]))
      return NetworkOutput(logits=logits, layer_norms=norms,
                           pairwise_lipschitz=pairwise, lipschitz=bound)
    if self.bound != 'naive':
      raise ValueError(f"bound must be 'naive' or 'liplt', got {self.bound!r}")
    prefix = self.input_scale * jnp.prod(norms[:-1])
    head_kernel = head.variables['params']['kernel']
    return NetworkOutput(
        logits=logits,
        layer_norms=norms,
        pairwise_lipschitz=lipschitz.pairwise_lipschitz(head_kernel, prefix),
        lipschitz=prefix * head_norm)

  def _liplt(self, modules, head_input_shape):
    """LipLT bounds (arXiv 2310.00116) from warm-started product norms."""
    from cll_jax import liplt  # pylint: disable=g-import-not-at-top
    slopes = ACTIVATIONS[self.activation][1]
    if slopes is None:
      raise ValueError(
          f'the LipLT bound needs an elementwise slope-restricted activation; '
          f'{self.activation!r} is not (use bound=\'naive\' or relu)')
    params = {m.name: m.variables['params'] for m in modules}
    ops = network_operators(self, params, self._input_shape(modules))
    if ops[-1].input_shape != (math.prod(head_input_shape),):
      raise ValueError('internal: head shape mismatch')
    states = self.variable(
        layers.POWER_ITERATION, 'liplt_products',
        lambda: liplt.init_product_states(ops, self.make_rng('params')))
    steps = (self.num_power_iterations
             if self.is_mutable_collection(layers.POWER_ITERATION) else 0)
    norms, new_states = liplt.product_norms(ops, states.value, steps)
    if steps:
      states.value = new_states
    alpha, beta = slopes
    pairwise = liplt.liplt_pairwise_bound(ops, norms, alpha, beta)
    bound = liplt.liplt_bound(norms, alpha, beta)
    return self.input_scale * pairwise, self.input_scale * bound

  def _input_shape(self, modules) -> tuple[int, ...]:
    """Shape of one input example, read off the first layer's kernel."""
    first = modules[0]
    if isinstance(first, layers.LipschitzConv):
      return tuple(first.get_variable(layers.POWER_ITERATION, 'u').shape)
    return (first.variables['params']['kernel'].shape[0],)


MODELS = tuple(ARCHITECTURES)
# 'naive': product of layer norms with the exact head differences (CLL);
# 'liplt': the LipLT loop-transformation bound (elementwise activations).
BOUNDS = ('naive', 'liplt')


def create_model(name: str, num_classes: int, *, activation: str = 'minmax',
                 input_mean: Sequence[float] | None = None,
                 input_std: Sequence[float] | None = None,
                 num_power_iterations: int = 5,
                 bound: str = 'naive') -> LipschitzNetwork:
  """Builds a registered architecture; unknown names raise ValueError."""
  if name not in ARCHITECTURES:
    raise ValueError(f'unknown model {name!r}; known models: {sorted(MODELS)}')
  if activation not in ACTIVATIONS:
    raise ValueError(f'unknown activation {activation!r}; known: '
                     f'{sorted(ACTIVATIONS)}')
  if num_classes < 2:
    raise ValueError(f'num_classes must be >= 2, got {num_classes}')
  for key, values in (('input_mean', input_mean), ('input_std', input_std)):
    if values is not None and not all(math.isfinite(v) for v in values):
      raise ValueError(f'{key} must be finite, got {tuple(values)}')
  if input_std is not None and min(input_std) <= 0:
    raise ValueError(f'input_std must be > 0, got {tuple(input_std)}')
  if num_power_iterations < 0:
    raise ValueError(
        f'num_power_iterations must be >= 0, got {num_power_iterations}')
  if bound not in BOUNDS:
    raise ValueError(f'unknown bound {bound!r}; known: {BOUNDS}')
  if bound == 'liplt' and ACTIVATIONS[activation][1] is None:
    raise ValueError(
        f'the LipLT bound needs an elementwise slope-restricted activation, '
        f'not {activation!r}')
  if activation == 'minmax':
    for spec in ARCHITECTURES[name]:
      if spec.features % 2:
        raise ValueError(f'MinMax needs even widths; {name} has {spec}')
  return LipschitzNetwork(
      architecture=ARCHITECTURES[name], num_classes=num_classes,
      activation=activation,
      input_mean=None if input_mean is None else tuple(input_mean),
      input_std=None if input_std is None else tuple(input_std),
      num_power_iterations=num_power_iterations, bound=bound)


def layer_names(model: LipschitzNetwork) -> list[str]:
  return [f'layer_{i}' for i in range(len(model.architecture))] + ['head']


def network_operators(model: LipschitzNetwork, params,
                      input_shape: Sequence[int]) -> list[LinearOperator]:
  """The linear operator of every layer, in order, head last.

  Args:
    model: the network.
    params: its 'params' collection.
    input_shape: shape of one input example, e.g. (32, 32, 3) or (2,).
  """
  shape = tuple(input_shape)
  ops = []
  for name, spec in zip(layer_names(model),
                        model.architecture + (Dense(model.num_classes),)):
    kernel = params[name]['kernel']
    if isinstance(spec, Conv):
      pad = (spec.padding, spec.padding)
      op = LinearOperator(kernel, 'conv', shape, (spec.stride, spec.stride),
                          (pad, pad))
    else:
      op = LinearOperator(kernel, 'dense', (math.prod(shape),))
    ops.append(op)
    shape = op.output_shape
  return ops


def converge_power_iteration(model: LipschitzNetwork, variables,
                             input_shape: Sequence[int], *, tol: float = 1e-6,
                             max_iterations: int = 2000):
  """Runs every layer's power iteration to convergence (paper: every epoch end).

  Returns:
    The new `power_iteration` collection; combine it with the params for
    evaluation, where it stays frozen.
  """
  ops = network_operators(model, variables['params'], input_shape)
  state = variables[layers.POWER_ITERATION]
  new_state = {}
  for name, op in zip(layer_names(model), ops):
    u, _ = lipschitz.converge_power_iteration(
        op, state[name]['u'], tol=tol, max_iterations=max_iterations)
    new_state[name] = {'u': u}
  if 'liplt_products' in state:
    from cll_jax import liplt  # pylint: disable=g-import-not-at-top
    _, new_state['liplt_products'] = liplt.converge_product_norms(
        ops, state['liplt_products'], tol=tol, max_iterations=max_iterations)
  return new_state


def activation_slopes(model: LipschitzNetwork) -> tuple[float, float] | None:
  """[alpha, beta] of an elementwise activation, None for MinMax."""
  return ACTIVATIONS[model.activation][1]


def conv_output_shape(spec: Conv, shape: Sequence[int]) -> tuple[int, ...]:
  h, w, _ = shape
  pad = (spec.padding, spec.padding)
  return (conv_output_spatial(h, spec.kernel_size, spec.stride, pad),
          conv_output_spatial(w, spec.kernel_size, spec.stride, pad),
          spec.features)
