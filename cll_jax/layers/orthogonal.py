"""Parameter-free maps with norm exactly 1: rearrangements, pads, crops.

Used around orthogonal layers to change resolution and width without
breaking their bound:

* `space_to_depth` (SOC's "invertible downsampling"): each s x s block of
  pixels becomes s*s*C channels of one pixel. A permutation of the entries:
  orthogonal. Odd sizes are first zero-padded at the bottom/right, an
  isometric embedding (norm 1, not onto).
* `pad_channels`: zero channels appended, an isometric embedding.
* `keep_channels`: the first channels kept, a coordinate projection
  (norm 1, not injective).
* `scaled_sum_pool`: the sum over non-overlapping w x w windows divided by
  w (norm exactly 1: each window is the row vector of w^2 ones over w).
  Average pooling would have norm 1 / w and waste the Lipschitz budget;
  this is PyTorch's `AvgPool2d(w, divisor_override=w)` of the CPL, SLL and
  LBDN networks.

Each map also comes as a layer spec of a `cll_jax.models.LipschitzNetwork`
(`SpaceToDepth`, `PadChannels`, `KeepChannels`, `ScaledSumPool`): no
parameters, certified bound 1 (exact, kind PROVEN), no activation after it.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from cll_jax.layers import base


def space_to_depth(x: jax.Array, block: int) -> jax.Array:
  """(B, H, W, C) -> (B, ceil(H/b), ceil(W/b), b*b*C), zero-padding odd sizes.

  Output channel (r * b + q) * C + c of pixel (i, j) is input
  (b i + r, b j + q, c).
  """
  if block == 1:
    return x
  b, h, w, c = x.shape
  ph, pw = -h % block, -w % block
  if ph or pw:
    x = jnp.pad(x, ((0, 0), (0, ph), (0, pw), (0, 0)))
    h, w = h + ph, w + pw
  x = x.reshape(b, h // block, block, w // block, block, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // block, w // block, block * block * c)


def space_to_depth_shape(shape: tuple[int, ...], block: int
                         ) -> tuple[int, ...]:
  h, w, c = shape
  return (-(-h // block), -(-w // block), block * block * c)


def pad_channels(x: jax.Array, channels: int) -> jax.Array:
  """Appends zero channels up to `channels` (an isometric embedding)."""
  extra = channels - x.shape[-1]
  if extra < 0:
    raise ValueError(f'cannot pad {x.shape[-1]} channels to {channels}')
  if not extra:
    return x
  return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)])


def keep_channels(x: jax.Array, channels: int) -> jax.Array:
  """The first `channels` channels (a coordinate projection)."""
  return x[..., :channels]


def scaled_sum_pool(x: jax.Array, window: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/w, W/w, C): window sums over w (norm 1).

  H and W must be multiples of `window`: a partial window would make the
  map's rows unequal (and a zero-padded one is still norm 1, but silently
  changes the architecture).
  """
  b, h, w, c = x.shape
  if h % window or w % window:
    raise ValueError(f'scaled_sum_pool: spatial size {(h, w)} is not a '
                     f'multiple of the window {window}')
  x = x.reshape(b, h // window, window, w // window, window, c)
  return x.sum(axis=(2, 4)) / window


class _Fixed(nn.Module):
  """A parameter-free map as a network layer: `(fn(x), 1)`."""
  spec: object = None

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    if x.ndim != 4:
      raise ValueError(f'{type(self.spec).__name__} expects NHWC input, got '
                       f'shape {x.shape}')
    return self.spec.apply(x), jnp.ones((), jnp.float32)


class _FixedSpec:
  """What the parameter-free specs share: norm exactly 1, no state."""
  bound_kind: ClassVar[str] = base.PROVEN
  flattens: ClassVar[bool] = False
  activated: ClassVar[bool] = False

  def module(self, name: str, num_power_iterations: int) -> nn.Module:
    del num_power_iterations
    return _Fixed(spec=self, name=name)

  def certified_bound(self, variables, input_shape) -> jax.Array:
    del variables, input_shape
    return jnp.ones((), jnp.float32)

  def power_iteration_operators(self, params, input_shape):
    del params, input_shape
    return {}

  def rounding_step(self, variables, input_shape, forms, norm, *, dtype,
                    forward_dtype):
    """Rearrangements, zero pads and crops are exact."""
    del variables, input_shape, norm, dtype, forward_dtype
    return forms


@dataclasses.dataclass(frozen=True)
class SpaceToDepth(_FixedSpec):
  """`space_to_depth(x, block)` as a layer (a permutation: norm 1)."""
  block: int = 2

  def apply(self, x):
    return space_to_depth(x, self.block)

  def output_shape(self, input_shape):
    return space_to_depth_shape(tuple(input_shape), self.block)


@dataclasses.dataclass(frozen=True)
class PadChannels(_FixedSpec):
  """Zero channels up to `channels` (an isometric embedding: norm 1)."""
  channels: int

  def apply(self, x):
    return pad_channels(x, self.channels)

  def output_shape(self, input_shape):
    h, w, c = input_shape
    if c > self.channels:
      raise ValueError(f'PadChannels({self.channels}) got {c} channels')
    return (h, w, self.channels)


@dataclasses.dataclass(frozen=True)
class KeepChannels(_FixedSpec):
  """The first `channels` channels (a coordinate projection: norm 1)."""
  channels: int

  def apply(self, x):
    return keep_channels(x, self.channels)

  def output_shape(self, input_shape):
    h, w, c = input_shape
    if c < self.channels:
      raise ValueError(f'KeepChannels({self.channels}) got {c} channels')
    return (h, w, self.channels)


@dataclasses.dataclass(frozen=True)
class ScaledSumPool(_FixedSpec):
  """`scaled_sum_pool(x, window)` as a layer (norm exactly 1)."""
  window: int = 2

  def apply(self, x):
    return scaled_sum_pool(x, self.window)

  def output_shape(self, input_shape):
    h, w, c = input_shape
    if h % self.window or w % self.window:
      raise ValueError(f'ScaledSumPool({self.window}): spatial size '
                       f'{(h, w)} is not a multiple of the window')
    return (h // self.window, w // self.window, c)

  def rounding_step(self, variables, input_shape, forms, norm, *, dtype,
                    forward_dtype):
    """Each output sums w^2 entries and divides by w (or multiplies by a
    rounded 1 / w): within gamma_{w^2+2} of the exact value relative to
    (sum |x|) / w, whose norm is <= ||x|| (the map has norm 1). So
    R = gamma X, X' = X + R, E' = E + R."""
    del variables, input_shape, norm
    from cll_jax import forward_error  # pylint: disable=g-import-not-at-top
    gamma = forward_error._gamma(  # pylint: disable=protected-access
        self.window ** 2 + 2, dtype, forward_dtype)
    (xp, xq), (ep, eq) = forms
    return ((xp + gamma * xp, xq + gamma * xq),
            (ep + gamma * xp, eq + gamma * xq))
