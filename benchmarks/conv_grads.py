"""Kernel gradient of 4C3F's convs on CPU: XLA's conv against matmul forms.

What is left of the 4C3F training step on CPU (benchmark 1) is mostly the
kernel gradients of the convs, dW[i, j, c, o] = sum_{b, h, w}
x_pad[b, s h + i, s w + j, c] dy[b, h, w, o]. This times three ways of
computing it for each conv of 4C3F at batch 128:

  * `xla`: the VJP of `lax.conv_general_dilated` (XLA's backward-filter conv,
    what the library uses for convs with more than 4 input channels);
  * `im2col`: one matmul of the (B OH OW, kh kw c_in) patch matrix with dy
    (what `operators` uses for the RGB layer, through autodiff);
  * `taps`: one (c_in, B OH OW) x (B OH OW, c_out) matmul per kernel tap,
    without materialising the patch matrix.

`rel_err` is max |dW - dW_xla| / max |dW_xla|: all three compute the same sums.

Run: `python -m benchmarks.conv_grads [--tiny] [--repeats N]`.
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks import time_calls
from cll_jax import operators

# 4C3F's convs (table B2): input (H, W, C_in), kernel (k, k, C_in, C_out),
# stride, padding.
CONVS_4C3F = (((32, 32, 3), (3, 3, 3, 32), 1, 1),
              ((32, 32, 32), (4, 4, 32, 32), 2, 1),
              ((16, 16, 32), (3, 3, 32, 64), 1, 1),
              ((16, 16, 64), (4, 4, 64, 64), 2, 1))
TINY_CONVS = (((8, 8, 3), (3, 3, 3, 4), 1, 1),
              ((8, 8, 4), (4, 4, 4, 4), 2, 1))


def _tap_slices(x, kernel_shape, strides, padding, out_hw):
  """The strided slice of the padded input that each kernel tap reads."""
  kh, kw, c_in, _ = kernel_shape
  b = x.shape[0]
  (sh, sw), (ph, pw) = strides, padding
  oh, ow = out_hw
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  return [jax.lax.slice(xp, (0, i, j, 0),
                        (b, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1,
                         c_in), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]


def kernel_grad_xla(x, dy, kernel_shape, strides, padding):
  zero = jnp.zeros(kernel_shape, x.dtype)
  _, vjp = jax.vjp(lambda k: operators._conv(x, k, strides, padding), zero)  # pylint: disable=protected-access
  return vjp(dy)[0]


def kernel_grad_im2col(x, dy, kernel_shape, strides, padding):
  patches = jnp.concatenate(
      _tap_slices(x, kernel_shape, strides, padding, dy.shape[1:3]), axis=-1)
  return jnp.einsum('bhwk,bhwo->ko', patches, dy).reshape(kernel_shape)


def kernel_grad_taps(x, dy, kernel_shape, strides, padding):
  c_in, c_out = kernel_shape[2], kernel_shape[3]
  dy_flat = dy.reshape(-1, c_out)
  taps = [s.reshape(-1, c_in).T @ dy_flat for s in
          _tap_slices(x, kernel_shape, strides, padding, dy.shape[1:3])]
  return jnp.stack(taps).reshape(kernel_shape)


FORMS = {'xla': kernel_grad_xla, 'im2col': kernel_grad_im2col,
         'taps': kernel_grad_taps}


def run(tiny: bool = False, repeats: int = 10, batch: int = 128) -> list[dict]:
  """One row per (conv, form): median ms and relative error against `xla`."""
  convs = TINY_CONVS if tiny else CONVS_4C3F
  batch = 4 if tiny else batch
  rows = []
  key_x, key_dy = jax.random.split(jax.random.PRNGKey(0))
  for in_shape, kernel_shape, s, p in convs:
    strides, padding = (s, s), ((p, p), (p, p))
    oh = operators.conv_output_spatial(in_shape[0], kernel_shape[0], s, (p, p))
    ow = operators.conv_output_spatial(in_shape[1], kernel_shape[1], s, (p, p))
    x = jax.random.normal(key_x, (batch, *in_shape))
    dy = jax.random.normal(key_dy, (batch, oh, ow, kernel_shape[3]))
    reference = None
    for name, form in FORMS.items():
      fn = jax.jit(functools.partial(form, kernel_shape=kernel_shape,
                                     strides=strides, padding=padding))
      grad = fn(x, dy)
      if reference is None:
        reference = grad
      err = float(jnp.max(jnp.abs(grad - reference)) /
                  jnp.max(jnp.abs(reference)))
      timing = time_calls(functools.partial(fn, x, dy), repeats)
      rows.append({
          'benchmark': 'conv_grads',
          'conv': (f'c({kernel_shape[3]},{kernel_shape[0]},{s},{p}) on '
                   f'{"x".join(map(str, in_shape))}'),
          'form': name, 'batch': batch, 'median_ms': timing['median_ms'],
          'cpu_ms': timing['cpu_ms'], 'rel_err': err})
  return rows


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--repeats', type=int, default=10)
  args = parser.parse_args()
  for r in run(args.tiny, args.repeats):
    print(f"{r['conv']:>26} {r['form']:>7}: {r['median_ms']:7.1f} ms "
          f"(cpu {r['cpu_ms']:.1f} ms), rel err {r['rel_err']:.1e}")


if __name__ == '__main__':
  main()
