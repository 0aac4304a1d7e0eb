"""The linear maps of Lipschitz layers, described as data.

Every bound in this library (power iteration, the sound Gram-iteration bounds,
LipLT) needs the *true* linear operator of a layer: for a convolution that is
the map on the layer's real input shape, with its stride and explicit zero
padding, not the reshaped kernel matrix. `LinearOperator` carries exactly what
defines that map, applies it to single examples or batches, and gives its exact
adjoint through `jax.linear_transpose`.
"""

from __future__ import annotations

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
  """
  kernel: jax.Array
  kind: Literal['dense', 'conv'] = flax.struct.field(pytree_node=False)
  input_shape: tuple[int, ...] = flax.struct.field(pytree_node=False)
  strides: tuple[int, int] = flax.struct.field(
      pytree_node=False, default=(1, 1))
  padding: Padding = flax.struct.field(
      pytree_node=False, default=((0, 0), (0, 0)))

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
    """Applies the map to `x` of shape `(*batch, *input_shape)`."""
    n = len(self.input_shape)
    if tuple(x.shape[x.ndim - n:]) != tuple(self.input_shape):
      raise ValueError(
          f'operator expects trailing shape {self.input_shape}, got {x.shape}')
    batch = x.shape[:x.ndim - n]
    if self.kind == 'dense':
      return x @ self.kernel
    y = jax.lax.conv_general_dilated(
        x.reshape((-1, *self.input_shape)),
        self.kernel,
        window_strides=self.strides,
        padding=self.padding,
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y.reshape((*batch, *y.shape[1:]))

  def transpose(self, y: jax.Array) -> jax.Array:
    """The exact adjoint A^T applied to one example `y` of `output_shape`."""
    x0 = jax.ShapeDtypeStruct(self.input_shape, self.kernel.dtype)
    (x,) = jax.linear_transpose(self.__call__, x0)(y)
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
