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
from typing import Any, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from cll_jax import layers
from cll_jax import lipschitz
from cll_jax.layers import base as layer_base
from cll_jax.layers import orthogonal
from cll_jax.layers.soc import SOCConvSpec, SOCDenseSpec
from cll_jax.layers.unconstrained import Conv, Dense
from cll_jax.operators import LinearOperator

LayerSpec = layer_base.LayerSpec


def lipconv(depth: int, init_channels: int = 32, blocks: int = 5
            ) -> tuple[layer_base.LayerSpec, ...]:
  """LipConv-depth of the SOC paper: `blocks` blocks of depth/blocks SOC convs.

  Each block keeps its width and resolution except its last conv, a stride-2
  SOC conv (invertible downsampling) that doubles the channels (4x from the
  downsampling, then the first half kept); 3x3 kernels except the very last
  conv, 1x1 (as the SOC code's LipConvNet). The first conv zero-pads the
  input channels (RGB) to `init_channels`. On 32x32 inputs the body ends at
  1x1 with init_channels * 2^blocks channels.
  """
  if depth % blocks or depth < blocks:
    raise ValueError(f'LipConv depth must be a positive multiple of {blocks}, '
                     f'got {depth}')
  per_block = depth // blocks
  specs, channels = [], init_channels
  for b in range(blocks):
    for j in range(per_block):
      if j < per_block - 1:
        specs.append(SOCConvSpec(channels, 3, 1))
      else:
        specs.append(SOCConvSpec(2 * channels, 1 if b == blocks - 1 else 3,
                                 2))
    channels *= 2
  return tuple(specs)


def residual_network(family: str, n_conv: int, n_dense: int, width: int,
                     dense_hidden: int, conv_hidden: int | None = None,
                     pool: int = 4) -> tuple[layer_base.LayerSpec, ...]:
  """The CPL / SLL network: residual 1-Lipschitz layers at one width.

  As the CPL and SLL code builds it: the input's channels zero-padded to
  `width`, `n_conv` residual convs (3x3, `conv_hidden` inner channels,
  default `width`) at full resolution, a scaled sum-pool by `pool` (norm 1),
  then `n_dense` residual dense layers on the flattened features
  (`dense_hidden` inner units); the head (LLN in their code) is added by the
  network. No activation between layers: each layer has its ReLU inside.
  """
  from cll_jax.layers import cpl, sll  # pylint: disable=g-import-not-at-top
  conv, dense = {'cpl': (cpl.CPLConvSpec, cpl.CPLDenseSpec),
                 'sll': (sll.SLLConvSpec, sll.SLLDenseSpec)}[family]
  return ((orthogonal.PadChannels(width),)
          + tuple(conv(conv_hidden or width) for _ in range(n_conv))
          + (orthogonal.ScaledSumPool(pool),)
          + tuple(dense(dense_hidden) for _ in range(n_dense)))


# (convs, dense layers, width, dense inner units) of SLL's sizes (the SLL
# code's `reproduce_tables.py`); CLL evaluates CPL and SLL on the same XL
# network ("XL [2, 29]", 85 layers: 70 convs + 15 dense).
RESIDUAL_SIZES = {'s': (20, 7, 45, 2048), 'm': (30, 10, 60, 2048),
                  'l': (50, 10, 90, 2048), 'xl': (70, 15, 120, 2048),
                  'tiny': (2, 1, 8, 32)}


def sandwich_network(width: int, dense: Sequence[int],
                     multipliers: Sequence[int] = (1, 1, 2, 2, 4, 4, 8, 8)
                     ) -> tuple[layer_base.LayerSpec, ...]:
  """The LBDN conv network (Wang & Manchester 2023): 8 Sandwich convs.

  Widths w, w, 2w, 2w, 4w, 4w, 8w, 8w, every second conv with stride 2
  (an orthogonal space-to-depth inside the layer), then Sandwich dense
  layers of `dense` units; width 64 with dense (2048, 2048, 1024) is the
  Tiny-ImageNet network CLL compares with (64 -> 512 channels).
  """
  from cll_jax.layers import sandwich  # pylint: disable=g-import-not-at-top
  convs = []
  for i, mult in enumerate(multipliers):
    convs.append(sandwich.SandwichConvSpec(width * mult, 3, 2 if i % 2 else 1))
  return tuple(convs) + tuple(sandwich.SandwichDenseSpec(n) for n in dense)


SANDWICH_SIZES = {'s': (32, (1024, 1024, 512)), 'm': (64, (2048, 2048, 1024)),
                  'l': (128, (4096, 4096, 2048)),
                  'tiny': (4, (32,), (1, 2))}


def aol_network(width: int, per_block: int, blocks: int = 5,
                dense: Sequence[int] = ()) -> tuple[layer_base.LayerSpec, ...]:
  """An AOL conv network (Prach & Lampert 2022), MaxMin after every AOL layer.

  `blocks` blocks of `per_block` 3x3 AOL convs at one resolution, each block
  closed by a space-to-depth (4x the channels, norm 1) and a 1x1 AOL conv
  to twice the block's width; then AOL dense layers. AOL has no native
  stride, hence the parameter-free downsampling.
  """
  from cll_jax.layers import aol  # pylint: disable=g-import-not-at-top
  specs, channels = [], width
  for _ in range(blocks):
    specs += [aol.AOLConvSpec(channels, 3) for _ in range(per_block)]
    specs += [orthogonal.SpaceToDepth(2), aol.AOLConvSpec(2 * channels, 1)]
    channels *= 2
  return tuple(specs) + tuple(aol.AOLDenseSpec(n) for n in dense)


# (width, convs per block, dense layers[, blocks])
AOL_SIZES = {'small': (16, 2, (256,)), 'large': (64, 4, (1024,)),
             'tiny': (4, 1, (16,), 2)}


def _constrained_architectures() -> dict[str, tuple[layer_base.LayerSpec,
                                                    ...]]:
  nets = {}
  for size, (n_conv, n_dense, width, hidden) in RESIDUAL_SIZES.items():
    for family in ('cpl', 'sll'):
      nets[f'{family}_{size}'] = residual_network(family, n_conv, n_dense,
                                                  width, hidden)
  for size, (width, dense, *mults) in SANDWICH_SIZES.items():
    nets[f'sandwich_{size}'] = sandwich_network(width, dense, *mults)
  for size, (width, per_block, dense, *blocks) in AOL_SIZES.items():
    nets[f'aol_{size}'] = aol_network(width, per_block, *blocks, dense=dense)
  return nets


ARCHITECTURES: dict[str, tuple[layer_base.LayerSpec, ...]] = {
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
    # SOC (Singla & Feizi 2021): LipConv-n, and a narrow one for tests.
    **{f'lipconv{n}': lipconv(n) for n in (5, 10, 15, 20, 25, 30, 35, 40)},
    'lipconv_tiny': lipconv(5, init_channels=4),
    # Dense SOC MLPs of CLL fig. D3 (two-moons; width 32, input zero-padded).
    **{f'soc_mlp{n}': tuple(SOCDenseSpec(32) for _ in range(n))
       for n in (3, 7, 25)},
    # CPL / SLL (residual), LBDN (Sandwich), AOL, each with a tiny size.
    **_constrained_architectures(),
}

# Activations: (function or None for a module with parameters, slope
# interval [alpha, beta] for LipLT or None when not elementwise).
ACTIVATIONS = {
    'minmax': (layers.minmax, None),
    'householder': (None, None),  # `layers.Householder`, learned angles
    'relu': (nn.relu, (0.0, 1.0)),
}
# Per-layer options of the SOC families (dataclass fields of their specs).
SOC_OPTIONS = ('max_norm', 'terms_train', 'terms_eval')


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

  Every layer follows the contract of `cll_jax.layers.base`: it returns its
  output and the value of its Lipschitz constant the training loss uses
  (`layer_norms`), and its spec computes the proven bound certificates use
  (`certified_bounds`).

  Attributes:
    architecture: the hidden layers (the head is appended).
    num_classes: outputs of the head.
    activation: 'minmax', 'householder' or 'relu', after every hidden layer.
    head: 'dense' (unconstrained) or 'lln' (last-layer normalisation).
    input_mean, input_std: optional per-channel normalisation applied first;
      its Lipschitz factor 1 / min(std) enters every bound.
    num_power_iterations: power-iteration steps per training step.
    bound: the training bound, 'naive' (product) or 'liplt'.
    liplt_power_iterations: power-iteration steps per training step of the
      LipLT product norms (None: `num_power_iterations`). Warm-started, the
      iterates move little between steps; fewer steps make the LipLT step
      cheaper (benchmarks/RESULTS.md). Evaluation converges them anyway
      (`converge_power_iteration`) and certification uses sound bounds.
  """
  architecture: tuple[layer_base.LayerSpec, ...]
  num_classes: int
  activation: str = 'minmax'
  input_mean: tuple[float, ...] | None = None
  input_std: tuple[float, ...] | None = None
  num_power_iterations: int = 5
  bound: str = 'naive'
  head: str = 'dense'
  liplt_power_iterations: int | None = None

  @property
  def input_scale(self) -> float:
    return 1.0 if self.input_std is None else 1.0 / min(self.input_std)

  @property
  def head_spec(self) -> layers.DenseHead:
    return layers.HEADS[self.head]

  def _activation(self, index: int):
    fn, _ = ACTIVATIONS[self.activation]
    if fn is None:
      return layers.Householder(name=f'activation_{index}')
    return fn

  @nn.compact
  def __call__(self, x: jax.Array) -> NetworkOutput:
    if self.activation not in ACTIVATIONS:
      raise ValueError(f'unknown activation {self.activation!r}; known: '
                       f'{sorted(ACTIVATIONS)}')
    if not jnp.issubdtype(x.dtype, jnp.floating):
      # uint8 images would run through the network as values up to 255 and
      # give meaningless logits; training feeds floats in [0, 1].
      raise ValueError(
          f'the network takes floating-point inputs (images in [0, 1]), got '
          f'dtype {x.dtype}; convert uint8 images with '
          'cll_jax.data.to_float (x / 255)')
    if self.input_mean is not None:
      x = x - jnp.asarray(self.input_mean, x.dtype)
    if self.input_std is not None:
      x = x / jnp.asarray(self.input_std, x.dtype)
    norms = []
    modules = []
    for i, spec in enumerate(self.architecture):
      if spec.flattens:
        x = x.reshape(x.shape[0], -1)  # flatten: an isometry
      module = spec.module(f'layer_{i}', self.num_power_iterations)
      x, sigma = module(x)
      modules.append(module)
      norms.append(sigma)
      if spec.activated:
        x = self._activation(i)(x)
    x = x.reshape(x.shape[0], -1)
    head = self.head_spec.module(self.num_classes, self.num_power_iterations)
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
    return NetworkOutput(
        logits=logits,
        layer_norms=norms,
        pairwise_lipschitz=self.head_spec.pairwise(
            head.variables['params']) * prefix,
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
    steps = (self.num_power_iterations if self.liplt_power_iterations is None
             else self.liplt_power_iterations)
    if not self.is_mutable_collection(layers.POWER_ITERATION):
      steps = 0
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


def is_unconstrained(architecture, head: str = 'dense') -> bool:
  """Only `Conv`/`Dense` layers and a dense head: LinearOperators exist."""
  return head == 'dense' and all(isinstance(s, (Conv, Dense))
                                 for s in architecture)


def create_model(name: str, num_classes: int, *, activation: str = 'minmax',
                 input_mean: Sequence[float] | None = None,
                 input_std: Sequence[float] | None = None,
                 num_power_iterations: int = 5,
                 bound: str = 'naive', head: str = 'dense',
                 soc: dict[str, Any] | None = None,
                 liplt_power_iterations: int | None = None
                 ) -> LipschitzNetwork:
  """Builds a registered architecture; bad arguments raise ValueError.

  Args:
    name: a key of `ARCHITECTURES`.
    num_classes: outputs of the head, >= 2.
    activation: a key of `ACTIVATIONS`.
    input_mean, input_std: optional per-channel normalisation (std > 0).
    num_power_iterations: power-iteration steps per training step.
    bound: the training bound, a member of `BOUNDS`.
    head: 'dense' or 'lln' (`cll_jax.layers.HEADS`).
    soc: options of the SOC layers (`SOC_OPTIONS`: max_norm, terms_train,
      terms_eval); None keeps the specs' defaults.
    liplt_power_iterations: power-iteration steps of the LipLT product
      norms per training step (None: `num_power_iterations`).
  """
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
  if input_std is not None and not min(input_std) > 0:
    raise ValueError(f'input_std must be > 0, got {tuple(input_std)}')
  if num_power_iterations < 0:
    raise ValueError(
        f'num_power_iterations must be >= 0, got {num_power_iterations}')
  if bound not in BOUNDS:
    raise ValueError(f'unknown bound {bound!r}; known: {BOUNDS}')
  if liplt_power_iterations is not None and liplt_power_iterations < 0:
    raise ValueError(f'liplt_power_iterations must be >= 0 or None, got '
                     f'{liplt_power_iterations}')
  if head not in layers.HEADS:
    raise ValueError(f'unknown head {head!r}; known: {sorted(layers.HEADS)}')
  architecture = ARCHITECTURES[name]
  if soc:
    unknown = sorted(set(soc) - set(SOC_OPTIONS))
    if unknown:
      raise ValueError(f'unknown SOC options {unknown}; known: {SOC_OPTIONS}')
    architecture = tuple(
        dataclasses.replace(spec, **soc)
        if isinstance(spec, (SOCConvSpec, SOCDenseSpec)) else spec
        for spec in architecture)
  if bound == 'liplt':
    if ACTIVATIONS[activation][1] is None:
      raise ValueError(
          f'the LipLT bound needs an elementwise slope-restricted activation, '
          f'not {activation!r}')
    if not is_unconstrained(architecture, head):
      raise ValueError(
          f'the LipLT bound needs Conv/Dense layers and a dense head; {name} '
          f'with head {head!r} has others')
  if activation in ('minmax', 'householder'):
    for spec in architecture:
      if spec.activated and spec.features % 2:
        raise ValueError(f'{activation} needs even widths; {name} has {spec}')
  return LipschitzNetwork(
      architecture=architecture, num_classes=num_classes,
      activation=activation,
      input_mean=None if input_mean is None else tuple(input_mean),
      input_std=None if input_std is None else tuple(input_std),
      num_power_iterations=num_power_iterations, bound=bound, head=head,
      liplt_power_iterations=liplt_power_iterations)


def layer_names(model: LipschitzNetwork) -> list[str]:
  return [f'layer_{i}' for i in range(len(model.architecture))] + ['head']


def layer_input_shapes(model: LipschitzNetwork, input_shape: Sequence[int]
                       ) -> list[tuple[int, ...]]:
  """The shape of one input example of every layer, head last."""
  shape, shapes = tuple(input_shape), []
  for spec in model.architecture:
    if spec.flattens:
      shape = (math.prod(shape),)
    shapes.append(shape)
    shape = spec.output_shape(shape)
  return shapes + [(math.prod(shape),)]


def network_operators(model: LipschitzNetwork, params,
                      input_shape: Sequence[int]) -> list[LinearOperator]:
  """The linear operator of every layer, in order, head last.

  Only for unconstrained networks (`Conv`/`Dense` layers, dense head): other
  layer families are not linear maps of one kernel.

  Args:
    model: the network.
    params: its 'params' collection.
    input_shape: shape of one input example, e.g. (32, 32, 3) or (2,).
  """
  if not is_unconstrained(model.architecture, model.head):
    raise ValueError(
        'network_operators needs Conv/Dense layers and a dense head; this '
        'network has constrained layers (use certified_bounds)')
  shapes = layer_input_shapes(model, input_shape)
  ops = [spec.operator(params[name], shape) for name, spec, shape in
         zip(layer_names(model), model.architecture, shapes)]
  return ops + [model.head_spec.operator(params['head'])]


def certified_bounds(model: LipschitzNetwork, variables,
                     input_shape: Sequence[int]) -> dict[str, jax.Array]:
  """Proven bounds of every layer and the pairwise certificate bounds.

  Each hidden layer's spec gives its proven bound (`certified_bound`: a
  sound operator-norm bound for estimated layers, the construction's bound
  for proven ones); the activations and reshapes are 1-Lipschitz; the head
  contributes its exact pairwise factor, rounded up. So

      K_ij = ||w_i - w_j|| * input_scale * prod_l b_l

  bounds the Lipschitz constant of f_i - f_j of the eval-mode network.

  Returns:
    {'pairwise': (N, N) K_ij, 'layer_norms': (L + 1,) the hidden layers'
    bounds and the head's sound global norm, 'lipschitz': the global bound}.
  """
  from cll_jax import sound_bounds  # pylint: disable=g-import-not-at-top
  params = variables['params']
  state = variables.get(layers.POWER_ITERATION, {})
  bounds = []
  for name, spec, shape in zip(layer_names(model), model.architecture,
                               layer_input_shapes(model, input_shape)):
    bounds.append(spec.certified_bound(
        {'params': params.get(name, {}),
         layers.POWER_ITERATION: state.get(name, {})}, shape))
  allowance = 1.0 + sound_bounds.DEFAULT_RELATIVE_FLOAT_ALLOWANCE
  head_params = params['head']
  head_norm = sound_bounds.operator_norm_upper_bound(
      model.head_spec.operator(head_params)) * allowance
  # One more allowance for the rounding of the product and of the head's
  # column differences (as `sound_bounds.network_upper_bound`).
  prefix = (model.input_scale * jnp.prod(jnp.stack(bounds)) * allowance
            if bounds else jnp.asarray(model.input_scale * allowance))
  return {
      'pairwise': model.head_spec.pairwise(head_params) * prefix,
      'layer_norms': jnp.stack(bounds + [head_norm]),
      'lipschitz': prefix * head_norm,
  }


def converge_power_iteration(model: LipschitzNetwork, variables,
                             input_shape: Sequence[int], *, tol: float = 1e-6,
                             max_iterations: int = 2000):
  """Runs every layer's power iteration to convergence (paper: every epoch end).

  Returns:
    The new `power_iteration` collection; combine it with the params for
    evaluation, where it stays frozen.
  """
  params = variables['params']
  state = variables[layers.POWER_ITERATION]
  specs = list(model.architecture) + [model.head_spec]
  new_state = {}
  for name, spec, shape in zip(layer_names(model), specs,
                               layer_input_shapes(model, input_shape)):
    ops = spec.power_iteration_operators(params.get(name, {}), shape)
    if not ops:
      continue  # a layer without power iteration (parameter-free, AOL, ...)
    new_state[name] = {
        var: lipschitz.converge_power_iteration(
            op, state[name][var], tol=tol, max_iterations=max_iterations)[0]
        for var, op in ops.items()}
  if 'liplt_products' in state:
    from cll_jax import liplt  # pylint: disable=g-import-not-at-top
    _, new_state['liplt_products'] = liplt.converge_product_norms(
        network_operators(model, params, input_shape),
        state['liplt_products'], tol=tol, max_iterations=max_iterations)
  return new_state


def activation_slopes(model: LipschitzNetwork) -> tuple[float, float] | None:
  """[alpha, beta] of an elementwise activation, None for MinMax."""
  return ACTIVATIONS[model.activation][1]


def conv_output_shape(spec: Conv, shape: Sequence[int]) -> tuple[int, ...]:
  return spec.output_shape(shape)
