"""The linear maps of Lipschitz layers, described as data.

Every bound in this library (power iteration, the sound Gram-iteration bounds,
LipLT) needs the *true* linear operator of a layer: for a convolution that is
the map on the layer's real input shape, with its stride and explicit zero
padding, not the reshaped kernel matrix. `LinearOperator` carries exactly what
defines that map, applies it to single examples or batches, and gives its exact
adjoint through `jax.linear_transpose`.
"""

from __future__ import annotations

import functools
from typing import Literal

import flax.struct
import jax
import jax.numpy as jnp

Padding = tuple[tuple[int, int], tuple[int, int]]


def conv_output_spatial(size: int, kernel: int, stride: int,
                        pad: tuple[int, int]) -> int:
  """Output length of a 'VALID' conv after explicit padding (floor rule)."""
  out = (size + pad[0] + pad[1] - kernel) // stride + 1
  if out <= 0:
    raise ValueError(
        f'conv with kernel {kernel}, stride {stride}, padding {pad} has no '
        f'output on an input of size {size}')
  return out


@flax.struct.dataclass
class LinearOperator:
  """The bias-free linear part of a dense or 2-D convolutional layer.

  Attributes:
    kernel: dense `(d_in, d_out)`; conv `(kh, kw, c_in, c_out)` (HWIO).
    kind: 'dense' or 'conv'.
    input_shape: shape of one example, `(d_in,)` or `(H, W, c_in)` (NHWC).
    strides: conv strides (ignored for dense).
    padding: explicit conv zero padding `((top, bottom), (left, right))`.
    precision: `jax.lax.Precision` of the matmul/conv (None: the backend's
      default, TF32/bf16 on GPU/TPU; certification uses HIGHEST, since the
      default's ~1e-3 relative errors can break a certificate).
  """
  kernel: jax.Array
  kind: Literal['dense', 'conv'] = flax.struct.field(pytree_node=False)
  input_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  strides: tuple[int, int] = flax.struct.field(
      pytree_node=False, default=(1, 1))
  padding: Padding = flax.struct.field(
      pytree_node=False, default=((0, 0), (0, 0)))
  precision: jax.lax.Precision | None = flax.struct.field(
      pytree_node=False, default=None)

  def __post_init__(self):
    if self.kind == 'dense':
      if self.kernel.ndim != 2 or self.input_shape != (self.kernel.shape[0],):
        raise ValueError(
            f'dense operator needs kernel (d_in, d_out) and input_shape '
            f'(d_in,); got kernel {self.kernel.shape}, input_shape '
            f'{self.input_shape}')
    elif self.kind == 'conv':
      if (self.kernel.ndim != 4 or len(self.input_shape) != 3
          or self.input_shape[-1] != self.kernel.shape[2]):
        raise ValueError(
            f'conv operator needs kernel (kh, kw, c_in, c_out) and '
            f'input_shape (H, W, c_in); got kernel {self.kernel.shape}, '
            f'input_shape {self.input_shape}')
    else:
      raise ValueError(f"kind must be 'dense' or 'conv', got {self.kind!r}")

  @property
  def output_shape(self) -> tuple[int, ...]:
    if self.kind == 'dense':
      return (self.kernel.shape[1],)
    kh, kw, _, c_out = self.kernel.shape
    h, w, _ = self.input_shape
    return (conv_output_spatial(h, kh, self.strides[0], self.padding[0]),
            conv_output_spatial(w, kw, self.strides[1], self.padding[1]),
            c_out)

  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the map to `x` of shape `(*batch, *input_shape)`.

    On the CPU backend convs take a faster but equal formulation
    (`_conv_cpu`: im2col for few input channels, a space-to-depth input
    gradient for strided convs). The strided one is a `jax.custom_vjp`, so on
    CPU it supports reverse-mode differentiation only (no `jax.jvp` /
    `jacfwd`); `transpose` uses the plain conv.
    """
    n = len(self.input_shape)
    if tuple(x.shape[x.ndim - n:]) != tuple(self.input_shape):
      raise ValueError(
          f'operator expects trailing shape {self.input_shape}, got {x.shape}')
    return self._apply(x, cpu_fast_path=True)

  def _apply(self, x: jax.Array, cpu_fast_path: bool) -> jax.Array:
    """`__call__`; `cpu_fast_path=False` forces the plain, transposable conv."""
    n = len(self.input_shape)
    batch = x.shape[:x.ndim - n]
    if self.kind == 'dense':
      return jnp.matmul(x, self.kernel, precision=self.precision)
    x = x.reshape((-1, *self.input_shape))
    if cpu_fast_path and jax.default_backend() == 'cpu':
      y = _conv_cpu(x, self.kernel, self.strides, self.padding,
                    self.precision)
    else:
      y = _conv(x, self.kernel, self.strides, self.padding, self.precision)
    return y.reshape((*batch, *y.shape[1:]))

  def transpose(self, y: jax.Array) -> jax.Array:
    """The exact adjoint A^T applied to one example `y` of `output_shape`."""
    return self.transpose_batch(y[None])[0]

  def transpose_batch(self, y: jax.Array) -> jax.Array:
    """A^T on a batch `(n, *output_shape)` -> `(n, *input_shape)`.

    On CPU convs take the same fast forms as `__call__`: the transpose of
    the im2col matmul for few input channels, and for strided convs the
    space-to-depth form (`_strided_conv_input_grad` with matmuls), plain JAX
    ops with cheap kernel gradients. XLA's transpose of a strided conv is an
    lhs-dilated conv, whose kernel gradient took 77-92 ms for just 10
    vectors on 4C3F's strided layers (LipLT's class chains).
    """
    n = len(self.output_shape)
    if tuple(y.shape[1:]) != tuple(self.output_shape) or y.ndim != n + 1:
      raise ValueError(f'transpose_batch expects (n, *{self.output_shape}), '
                       f'got {y.shape}')
    x0 = jax.ShapeDtypeStruct((y.shape[0], *self.input_shape), y.dtype)
    if self.kind == 'conv' and jax.default_backend() == 'cpu':
      padding = tuple(tuple(p) for p in self.padding)
      if self.kernel.shape[2] <= _IM2COL_MAX_CHANNELS:
        forward = functools.partial(
            _im2col_conv, kernel=self.kernel, strides=self.strides,
            padding=padding, precision=self.precision)
      elif tuple(self.strides) != (1, 1):
        return _strided_conv_input_grad(self.kernel, y, x0.shape,
                                        tuple(self.strides), padding,
                                        self.precision, matmul_form=True)
      else:
        forward = functools.partial(self._apply, cpu_fast_path=False)
    else:
      # The plain conv: a custom_vjp function cannot be linearly transposed.
      forward = functools.partial(self._apply, cpu_fast_path=False)
    (x,) = jax.linear_transpose(forward, x0)(y)
    return x

  def gram(self, x: jax.Array) -> jax.Array:
    """A^T A x for one example `x` of `input_shape`."""
    return self.transpose(self(x))

  def dense_matrix(self) -> jax.Array:
    """The explicit `(prod(output_shape), prod(input_shape))` matrix.

    Only for small operators: it is what tests compare every bound against.
    """
    size = 1
    for d in self.input_shape:
      size *= d
    basis = jnp.eye(size, dtype=self.kernel.dtype).reshape(
        (size, *self.input_shape))
    return self(basis).reshape(size, -1).T


# --------------------------------------------------------------------------
# Convolution kernels. All compute the same map (NHWC input, HWIO kernel,
# explicit zero padding); the CPU forms only change how XLA's CPU backend is
# asked to compute it, because its generic convolution is slow for the shapes
# of the paper's networks (measured on a 2-core AMD EPYC, jax 0.10.2, 4C3F
# at batch 128): the input gradient of a strided conv (an lhs-dilated conv)
# took 60-70 ms for c(32, 4, 2, 1) on 32x32x32, and a conv with very few
# input channels (the RGB first layer) ran far below the matmul rate.

# At most this many input channels: the conv is computed as im2col + matmul.
_IM2COL_MAX_CHANNELS = 4


def _conv(x: jax.Array, kernel: jax.Array, strides, padding,
          precision=None) -> jax.Array:
  return jax.lax.conv_general_dilated(
      x, kernel, window_strides=strides, padding=padding,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=precision)


def _im2col_conv(x: jax.Array, kernel: jax.Array, strides,
                 padding, precision=None) -> jax.Array:
  """The conv as one matmul of the (B, OH, OW, kh*kw*c_in) patch tensor.

  The patches are strided slices of the padded input, concatenated in the
  (i, j, c) order of the HWIO kernel's reshape, so
  y[b, o, p] = sum_{i,j,c} x_pad[b, s o + i, s p + j, c] w[i, j, c].
  Plain jnp ops: differentiable and linearly transposable.
  """
  kh, kw, c_in, c_out = kernel.shape
  b, h, w, _ = x.shape
  (sh, sw), (ph, pw) = strides, padding
  oh = conv_output_spatial(h, kh, sh, ph)
  ow = conv_output_spatial(w, kw, sw, pw)
  xp = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  cols = [jax.lax.slice(xp, (0, i, j, 0),
                        (b, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1,
                         c_in), (1, sh, sw, 1))
          for i in range(kh) for j in range(kw)]
  patches = jnp.concatenate(cols, axis=-1)
  return jnp.einsum('bhwk,ko->bhwo', patches,
                    kernel.reshape(kh * kw * c_in, c_out), precision=precision)


def _strided_conv_input_grad(kernel: jax.Array, dy: jax.Array,
                             x_shape: tuple[int, ...], strides,
                             padding, precision=None,
                             matmul_form: bool = False) -> jax.Array:
  """A^T dy of a strided conv, via its space-to-depth (stride-1) form.

  With s = strides, the padded input rearranged as
  x_s2d[b, a, c, (r, q, ch)] = x_pad[b, s_h a + r, s_w c + q, ch] and the
  kernel (zero-padded to multiples of s) as
  w_s2d[a, c, (r, q, ch), o] = w[s_h a + r, s_w c + q, ch, o], the strided
  conv is the 'VALID' stride-1 conv of x_s2d with w_s2d. Its adjoint is a
  plain stride-1 transposed conv, rearranged back (depth-to-space) and
  cropped to the unpadded input; rows/columns of x_pad that no output reads
  get zero. Exact (the same sums), only ordered differently.

  `matmul_form` computes the stride-1 transposed conv as im2col + matmul
  instead of XLA's conv: for when this function is itself differentiated
  with respect to the kernel (`LinearOperator.transpose_batch` inside a
  loss), where XLA's CPU kernel gradient of that conv (a 2x2 kernel with
  many output channels) is pathological: 85 ms against 2.5 ms for 10
  vectors on 4C3F's c(32, 4, 2, 1).
  """
  b, h, w, c_in = x_shape
  kh, kw, _, c_out = kernel.shape
  (sh, sw), (ph, pw) = strides, padding
  _, oh, ow, _ = dy.shape
  ka, kb = -(-kh // sh), -(-kw // sw)
  wk = jnp.pad(kernel, ((0, ka * sh - kh), (0, kb * sw - kw), (0, 0), (0, 0)))
  wk = wk.reshape(ka, sh, kb, sw, c_in, c_out).transpose(0, 2, 1, 3, 4, 5)
  wk = wk.reshape(ka, kb, sh * sw * c_in, c_out)
  hs, ws = oh + ka - 1, ow + kb - 1
  # The adjoint of the 'VALID' stride-1 conv, written as a forward conv of
  # the fully padded dy with the flipped kernel (input and output channels
  # swapped): the same map as its linear transpose, but differentiable with
  # respect to the kernel as an ordinary conv (XLA's CPU kernel gradient of
  # the transposed form took ~100 ms for 10 vectors on 4C3F's layers).
  flipped = jnp.swapaxes(wk[::-1, ::-1], 2, 3)
  conv = _im2col_conv if matmul_form else _conv
  dxs = conv(dy, flipped, (1, 1), ((ka - 1, ka - 1), (kb - 1, kb - 1)),
             precision)
  dxp = dxs.reshape(b, hs, ws, sh, sw, c_in).transpose(0, 1, 3, 2, 4, 5)
  dxp = dxp.reshape(b, hs * sh, ws * sw, c_in)
  # x_pad has h + ph[0] + ph[1] rows; hs * sh may be fewer (unread rows,
  # zero gradient) or more (rows past x_pad, read only by zero kernel taps).
  rows, cols = h + sum(ph), w + sum(pw)
  dxp = jnp.pad(dxp, ((0, 0), (0, max(0, rows - hs * sh)),
                      (0, max(0, cols - ws * sw)), (0, 0)))
  return dxp[:, ph[0]:ph[0] + h, pw[0]:pw[0] + w, :]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _strided_conv(x, kernel, strides, padding, precision):
  return _conv(x, kernel, strides, padding, precision)


def _strided_conv_fwd(x, kernel, strides, padding, precision):
  return _conv(x, kernel, strides, padding, precision), (x, kernel)


def _strided_conv_bwd(strides, padding, precision, res, dy):
  x, kernel = res
  _, kernel_vjp = jax.vjp(
      lambda k: _conv(x, k, strides, padding, precision), kernel)
  (dk,) = kernel_vjp(dy)
  dx = _strided_conv_input_grad(kernel, dy, x.shape, strides, padding,
                                precision)
  return dx, dk


_strided_conv.defvjp(_strided_conv_fwd, _strided_conv_bwd)


def _conv_cpu(x: jax.Array, kernel: jax.Array, strides,
              padding, precision=None) -> jax.Array:
  """The conv in the form that XLA's CPU backend runs fastest."""
  if kernel.shape[2] <= _IM2COL_MAX_CHANNELS:
    return _im2col_conv(x, kernel, strides, padding, precision)
  if tuple(strides) != (1, 1):
    return _strided_conv(x, kernel, tuple(strides),
                         tuple(tuple(p) for p in padding), precision)
  return _conv(x, kernel, strides, padding, precision)
