"""On-device data augmentation of CLL supplement B ("Data preprocessing").

Images are float NHWC in [0, 1] (convert uint8 with `to_float`). Per example,
in this fixed order (the paper's list):

1. random crop back to (H, W) from the image zero-padded by `crop_padding`
   pixels (4 for 32x32 CIFAR, 8 for 64x64 Tiny-ImageNet), i.e. a translation
   by (dy, dx) uniform in {-p..p}^2 with zero fill;
2. horizontal flip with probability 1/2;
3. colour jitter with torchvision `ColorJitter(brightness=j, contrast=j,
   saturation=j)` semantics (j = 0.25): factors uniform in
   [max(0, 1 - j), 1 + j], applied as brightness, contrast, saturation in this
   fixed order (torchvision draws a random order; the distribution of the
   result differs only slightly) and clipped to [0, 1] after each step as
   torchvision does for float images;
4. rotation by an angle uniform in [-max_rotation_degrees, max_rotation_degrees]
   (positive = counter-clockwise, as torchvision) about the image centre,
   bilinear interpolation, zero fill;

and the result is clipped to [0, 1]. Everything is jittable; each example
draws its own randomness from `example_keys(rng, batch)`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from cll_jax import _validation

# ITU-R 601-2 luma, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)


def to_float(images) -> jax.Array:
  """uint8 images -> float32 in [0, 1] (x / 255)."""
  return jnp.asarray(images).astype(jnp.float32) / 255.0


def _grayscale(image: jax.Array) -> jax.Array:
  """(H, W, C) -> (H, W, 1) luma for RGB, the image itself for C == 1."""
  if image.shape[-1] == 1:
    return image
  return jnp.tensordot(image, jnp.asarray(_LUMA, image.dtype),
                       axes=[[-1], [0]])[..., None]


def _blend(image, other, factor):
  # torchvision's _blend for float images: f * img + (1 - f) * other, clamped.
  return jnp.clip(factor * image + (1.0 - factor) * other, 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor) -> jax.Array:
  """clip(f * x, 0, 1); one image (H, W, C)."""
  return _blend(image, jnp.zeros_like(image), factor)


def adjust_contrast(image: jax.Array, factor) -> jax.Array:
  """clip(f * x + (1 - f) * mean(gray(x)), 0, 1); one image (H, W, C)."""
  return _blend(image, jnp.mean(_grayscale(image)), factor)


def adjust_saturation(image: jax.Array, factor) -> jax.Array:
  """clip(f * x + (1 - f) * gray(x), 0, 1); identity for one channel."""
  if image.shape[-1] == 1:
    return image
  return _blend(image, _grayscale(image), factor)


def translate(image: jax.Array, dy, dx, max_shift: int) -> jax.Array:
  """out[i, j] = image[i - dy, j - dx], zero outside the image.

  This is torchvision's RandomCrop(size=(H, W), padding=p): zero-pad by
  p = `max_shift` (static) and cut the (H, W) window at (p - dy, p - dx).
  `dy`, `dx` may be traced integers; they must lie in [-p, p] (values outside
  are clamped to it by `dynamic_slice`).
  """
  p = max_shift
  padded = jnp.pad(image, ((p, p), (p, p), (0, 0)))
  return jax.lax.dynamic_slice(
      padded, (p - dy, p - dx, 0), image.shape)


def rotate(image: jax.Array, degrees) -> jax.Array:
  """Rotates one (H, W, C) image counter-clockwise by `degrees`.

  Rotation about the centre c = ((H - 1) / 2, (W - 1) / 2) (pixel-centre
  convention, as torchvision). Output pixel (y, x) samples the input at
    x_s = c_x + cos(a) (x - c_x) - sin(a) (y - c_y)
    y_s = c_y + sin(a) (x - c_x) + cos(a) (y - c_y)
  (rows point down, so this is a counter-clockwise turn on screen) with
  bilinear interpolation and zero outside the image.
  """
  h, w, c = image.shape
  a = jnp.deg2rad(jnp.asarray(degrees, image.dtype))
  cy, cx = (h - 1) / 2.0, (w - 1) / 2.0
  y, x = jnp.meshgrid(jnp.arange(h, dtype=image.dtype),
                      jnp.arange(w, dtype=image.dtype), indexing='ij')
  cos, sin = jnp.cos(a), jnp.sin(a)
  xs = cx + cos * (x - cx) - sin * (y - cy)
  ys = cy + sin * (x - cx) + cos * (y - cy)

  def one_channel(ch):
    return jax.scipy.ndimage.map_coordinates(
        ch, [ys, xs], order=1, mode='constant', cval=0.0)

  return jax.vmap(one_channel, in_axes=2, out_axes=2)(image)


def augment_image(rng: jax.Array, image: jax.Array, *, crop_padding: int = 4,
                  flip: bool = True, color_jitter: float = 0.25,
                  max_rotation_degrees: float = 2.0) -> jax.Array:
  """Augments one float (H, W, C) image in [0, 1]; see the module docstring.

  Zero/False arguments switch the corresponding step off statically, so with
  crop_padding=0, flip=False, color_jitter=0, max_rotation_degrees=0 this is
  the identity (up to the final clip to [0, 1]).
  """
  k_crop, k_flip, k_jit, k_rot = jax.random.split(rng, 4)
  out = image
  if crop_padding:
    d = jax.random.randint(k_crop, (2,), -crop_padding, crop_padding + 1)
    out = translate(out, d[0], d[1], crop_padding)
  if flip:
    out = jnp.where(jax.random.bernoulli(k_flip), out[:, ::-1], out)
  if color_jitter:
    f = jax.random.uniform(k_jit, (3,), out.dtype,
                           max(0.0, 1.0 - color_jitter), 1.0 + color_jitter)
    out = adjust_brightness(out, f[0])
    out = adjust_contrast(out, f[1])
    out = adjust_saturation(out, f[2])
  if max_rotation_degrees:
    angle = jax.random.uniform(k_rot, (), out.dtype, -max_rotation_degrees,
                               max_rotation_degrees)
    out = rotate(out, angle)
  return jnp.clip(out, 0.0, 1.0)


def augment_batch(rng: jax.Array, images: jax.Array, *, crop_padding: int = 4,
                  flip: bool = True, color_jitter: float = 0.25,
                  max_rotation_degrees: float = 2.0) -> jax.Array:
  """Per-example random augmentation of a float (B, H, W, C) batch in [0, 1].

  CLL supplement B: crop_padding=4 on CIFAR (32x32), 8 on Tiny-ImageNet
  (64x64); flip; colour jitter 0.25; rotation up to 2 degrees.

  Args:
    rng: PRNG key; example b uses `example_keys(rng, B)[b]`
      (`jax.random.fold_in(rng, b)`), so an example's augmentation does not
      depend on the batch size (padding rows added for the device count
      change nothing).
    images: (B, H, W, C) floating, values in [0, 1].
    crop_padding: zero padding p of the random crop (0: no crop).
    flip: random horizontal flip with p = 0.5.
    color_jitter: strength j of brightness/contrast/saturation jitter (0: off);
      colour jitter needs C in {1, 3}.
    max_rotation_degrees: maximal rotation angle (0: off).

  Returns:
    (B, H, W, C) array of the input dtype, in [0, 1].
  """
  _validation.check_floating('images', images)
  _validation.check_ndim('images', images, 4)
  _, h, w, c = images.shape
  if not 0 <= crop_padding <= min(h, w):
    raise ValueError(
        f'crop_padding must lie in [0, {min(h, w)}], got {crop_padding}')
  if color_jitter < 0:
    raise ValueError(f'color_jitter must be >= 0, got {color_jitter}')
  if color_jitter and c not in (1, 3):
    raise ValueError(
        f'colour jitter needs 1 or 3 channels, got images of shape '
        f'{images.shape}')
  if max_rotation_degrees < 0:
    raise ValueError(
        f'max_rotation_degrees must be >= 0, got {max_rotation_degrees}')
  return _augment_batch(rng, images, int(crop_padding), bool(flip),
                        float(color_jitter), float(max_rotation_degrees))


def example_keys(rng: jax.Array, batch_size: int) -> jax.Array:
  """Key b of a batch is `fold_in(rng, b)`: independent of the batch size."""
  return jax.vmap(lambda i: jax.random.fold_in(rng, i))(
      jnp.arange(batch_size))


# Jitted so that eager calls compile once instead of dispatching op by op.
@functools.partial(jax.jit, static_argnums=(2, 3, 4, 5))
def _augment_batch(rng, images, crop_padding, flip, color_jitter,
                   max_rotation_degrees):
  keys = example_keys(rng, images.shape[0])
  fn = lambda k, x: augment_image(
      k, x, crop_padding=crop_padding, flip=flip, color_jitter=color_jitter,
      max_rotation_degrees=max_rotation_degrees)
  return jax.vmap(fn)(keys, images)


__all__ = ['to_float', 'augment_batch', 'augment_image', 'example_keys', 'adjust_brightness',
           'adjust_contrast', 'adjust_saturation', 'translate', 'rotate']
