"""On-device augmentation, each step against an independent numpy version."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax.data import augment

OFF = dict(crop_padding=0, flip=False, color_jitter=0.0,
           max_rotation_degrees=0.0)


def _images(b=4, h=8, w=8, c=3, seed=0, low=0.0):
  return np.random.default_rng(seed).uniform(low, 1.0, (b, h, w, c)).astype(
      np.float32)


def _shift(img, dy, dx):
  """Independent translation: out[i, j] = img[i - dy, j - dx], zero fill."""
  h, w, _ = img.shape
  out = np.zeros_like(img)
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
      img[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
  return out


def _smooth(h, w, sigma=6.0):
  y, x = np.mgrid[:h, :w].astype(np.float64)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  g = np.exp(-((y - cy)**2 + (x - cx)**2) / (2 * sigma**2))
  return np.stack([g, 0.5 * g, 1 - 0.5 * g], -1).astype(np.float32)


def test_to_float():
  x = np.array([[0, 1, 128, 255]], np.uint8)
  y = augment.to_float(x)
  assert y.dtype == jnp.float32
  np.testing.assert_allclose(y, x / 255.0, rtol=1e-7)


def test_all_off_is_identity():
  x = _images()
  y = augment.augment_batch(jax.random.key(0), jnp.asarray(x), **OFF)
  np.testing.assert_array_equal(y, x)


def test_crop_is_translation_with_zero_fill():
  img = _images(1, 8, 8, 3, low=0.1)[0]
  batch = np.repeat(img[None], 200, 0)
  out = np.asarray(augment.augment_batch(
      jax.random.key(1), jnp.asarray(batch), **{**OFF, 'crop_padding': 2}))
  shifts = set()
  for o in out:
    match = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)
             if np.array_equal(o, _shift(img, dy, dx))]
    assert len(match) == 1
    shifts.add(match[0])
  assert len(shifts) >= 20  # Per-example offsets cover {-2..2}^2.
  assert {d for s in shifts for d in s} == {-2, -1, 0, 1, 2}


def test_translate_helper_matches_numpy():
  img = _images(1, 6, 7, 2)[0]
  for dy, dx in [(0, 0), (3, -2), (-3, 3), (1, 0)]:
    np.testing.assert_array_equal(
        augment.translate(jnp.asarray(img), dy, dx, 3), _shift(img, dy, dx))


def test_flip_is_exact_mirror():
  img = _images(1)[0]
  out = np.asarray(augment.augment_batch(
      jax.random.key(2), jnp.asarray(np.repeat(img[None], 100, 0)),
      **{**OFF, 'flip': True}))
  flipped = np.array([np.array_equal(o, img[:, ::-1]) for o in out])
  same = np.array([np.array_equal(o, img) for o in out])
  assert np.all(flipped ^ same)
  assert 25 < flipped.sum() < 75


def test_colour_ops_against_closed_forms():
  img = _images(1, 5, 6, 3)[0]
  luma = img @ np.array([0.299, 0.587, 0.114])
  x = jnp.asarray(img)
  np.testing.assert_allclose(augment.adjust_brightness(x, 1.2),
                             np.clip(1.2 * img, 0, 1), atol=1e-6)
  np.testing.assert_allclose(augment.adjust_saturation(x, 0.0),
                             np.repeat(luma[..., None], 3, -1), atol=1e-6)
  np.testing.assert_allclose(
      augment.adjust_saturation(x, 1.25),
      np.clip(1.25 * img - 0.25 * luma[..., None], 0, 1), atol=1e-6)
  np.testing.assert_allclose(augment.adjust_contrast(x, 0.0),
                             np.full_like(img, luma.mean()), atol=1e-6)
  np.testing.assert_allclose(
      augment.adjust_contrast(x, 0.8),
      np.clip(0.8 * img + 0.2 * luma.mean(), 0, 1), atol=1e-6)
  for f in (augment.adjust_brightness, augment.adjust_contrast,
            augment.adjust_saturation):
    np.testing.assert_allclose(f(x, 1.0), img, atol=1e-7)
  gray = jnp.asarray(img[..., :1])
  np.testing.assert_array_equal(augment.adjust_saturation(gray, 0.3), gray)
  np.testing.assert_allclose(augment.adjust_contrast(gray, 0.0),
                             np.full_like(img[..., :1], img[..., 0].mean()),
                             atol=1e-6)


def test_jitter_factors_in_range():
  # On a constant gray image contrast and saturation are no-ops, so the
  # output is 0.5 * brightness factor.
  x = jnp.full((500, 4, 4, 3), 0.5, jnp.float32)
  out = np.asarray(augment.augment_batch(
      jax.random.key(3), x, **{**OFF, 'color_jitter': 0.25}))
  f = out[:, 0, 0, 0] / 0.5
  np.testing.assert_allclose(out, f[:, None, None, None] * 0.5 *
                             np.ones_like(out), atol=1e-6)
  assert f.min() >= 0.75 - 1e-6 and f.max() <= 1.25 + 1e-6
  assert f.min() < 0.77 and f.max() > 1.23
  assert abs(f.mean() - 1.0) < 0.02


def test_rotate_exact_cases():
  img = _images(1, 7, 7, 2)[0]
  x = jnp.asarray(img)
  np.testing.assert_array_equal(augment.rotate(x, 0.0), img)
  # Counter-clockwise, as np.rot90; 180 degrees flips both axes.
  np.testing.assert_allclose(augment.rotate(x, 90.0),
                             np.rot90(img, 1, axes=(0, 1)), atol=1e-5)
  np.testing.assert_allclose(augment.rotate(x, 180.0), img[::-1, ::-1],
                             atol=1e-5)
  # Non-square: the centre pixel of an odd-sized image is fixed.
  odd = _images(1, 9, 11, 1)[0]
  np.testing.assert_allclose(augment.rotate(jnp.asarray(odd), 37.0)[4, 5],
                             odd[4, 5], atol=1e-6)


def test_rotate_bilinear_half_pixel():
  # A 90-degree turn about the centre of a 4x4 image maps pixel centres to
  # pixel centres; 45 degrees samples between them: check one bilinear value.
  img = np.arange(16, dtype=np.float32).reshape(4, 4, 1) / 16
  out = np.asarray(augment.rotate(jnp.asarray(img), 45.0))
  c = 1.5
  a = np.deg2rad(45.0)
  y, x = 1, 2  # Output pixel; sample point by the documented inverse map.
  xs = c + np.cos(a) * (x - c) - np.sin(a) * (y - c)
  ys = c + np.sin(a) * (x - c) + np.cos(a) * (y - c)
  y0, x0 = int(np.floor(ys)), int(np.floor(xs))
  wy, wx = ys - y0, xs - x0
  expect = ((1 - wy) * (1 - wx) * img[y0, x0] + (1 - wy) * wx * img[y0, x0 + 1]
            + wy * (1 - wx) * img[y0 + 1, x0] + wy * wx * img[y0 + 1, x0 + 1])
  np.testing.assert_allclose(out[y, x], expect, atol=1e-6)


def test_small_rotation_of_smooth_image():
  img = _smooth(32, 32)
  batch = jnp.asarray(np.repeat(img[None], 16, 0))
  out = np.asarray(augment.augment_batch(
      jax.random.key(4), batch, **{**OFF, 'max_rotation_degrees': 2.0}))
  # Rotation-invariant blob: the centre pixels barely move, the interior
  # only by interpolation error, and the random angles differ per example.
  expect = np.broadcast_to(img, out.shape)
  np.testing.assert_allclose(out[:, 15:17, 15:17], expect[:, 15:17, 15:17],
                             atol=2e-3)
  np.testing.assert_allclose(out[:, 4:28, 4:28], expect[:, 4:28, 4:28],
                             atol=1e-2)
  assert len({o.tobytes() for o in out}) == 16


def test_full_augmentation_shapes_range_jit_vmap():
  x = jnp.asarray(_images(6, 16, 16, 3))
  rng = jax.random.key(5)
  kwargs = dict(crop_padding=4, flip=True, color_jitter=0.25,
                max_rotation_degrees=2.0)
  eager = augment.augment_batch(rng, x, **kwargs)
  assert eager.shape == x.shape and eager.dtype == x.dtype
  assert float(eager.min()) >= 0.0 and float(eager.max()) <= 1.0

  @jax.jit
  def both(rng, x):
    keys = augment.example_keys(rng, x.shape[0])
    vmapped = jax.vmap(functools.partial(augment.augment_image, **kwargs))(
        keys, x)
    return augment.augment_batch(rng, x, **kwargs), vmapped

  jitted, vmapped = both(rng, x)
  np.testing.assert_allclose(jitted, eager, atol=1e-5)
  np.testing.assert_allclose(vmapped, eager, atol=1e-5)
  # Tiny-ImageNet setting and single-channel (MNIST) images.
  big = augment.augment_batch(rng, jnp.asarray(_images(2, 64, 64, 3)),
                              crop_padding=8)
  assert big.shape == (2, 64, 64, 3)
  mono = augment.augment_batch(rng, jnp.asarray(_images(2, 8, 8, 1)))
  assert mono.shape == (2, 8, 8, 1)


def test_errors():
  rng = jax.random.key(0)
  with pytest.raises(ValueError, match='floating'):
    augment.augment_batch(rng, jnp.zeros((1, 4, 4, 3), jnp.uint8))
  with pytest.raises(ValueError, match='dimensions'):
    augment.augment_batch(rng, jnp.zeros((4, 4, 3)))
  with pytest.raises(ValueError, match='crop_padding'):
    augment.augment_batch(rng, jnp.zeros((1, 4, 4, 3)), crop_padding=5)
  with pytest.raises(ValueError, match='channels'):
    augment.augment_batch(rng, jnp.zeros((1, 4, 4, 2)))
  with pytest.raises(ValueError, match='max_rotation_degrees'):
    augment.augment_batch(rng, jnp.zeros((1, 4, 4, 3)),
                          max_rotation_degrees=-1.0)


def test_an_examples_augmentation_does_not_depend_on_the_batch_size():
  # The training loop pads batches with masked rows for the device count;
  # the real examples must be augmented exactly as without the padding.
  x = jnp.asarray(_images(6, 16, 16, 3))
  rng = jax.random.key(7)
  padded = jnp.concatenate([x, jnp.zeros((2, 16, 16, 3), x.dtype)])
  np.testing.assert_array_equal(augment.augment_batch(rng, padded)[:6],
                                augment.augment_batch(rng, x))
