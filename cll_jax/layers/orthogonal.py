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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


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
