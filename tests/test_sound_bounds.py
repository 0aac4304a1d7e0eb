"""Tests of cll_jax.sound_bounds against explicit matrices and numpy SVD."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cll_jax import sound_bounds as sb
from cll_jax.operators import LinearOperator

ALLOW = sb.DEFAULT_RELATIVE_FLOAT_ALLOWANCE
# Agreement with closed forms of the exact-arithmetic bound.
ROUNDING = 2e-6


def _sigma1(matrix) -> float:
  return float(np.linalg.svd(np.asarray(matrix, np.float64),
                             compute_uv=False)[0])


def _circular_matrix(kernel: np.ndarray, n1: int, n2: int) -> np.ndarray:
  """Explicit matrix of z[i,j,o] = sum k[a,b,c,o] x[(i+a)%n1, (j+b)%n2, c]."""
  kh, kw, c_in, c_out = kernel.shape
  mat = np.zeros((n1, n2, c_out, n1, n2, c_in))
  for i, j, a, b in itertools.product(range(n1), range(n2), range(kh),
                                      range(kw)):
    mat[i, j, :, (i + a) % n1, (j + b) % n2, :] += kernel[a, b].T
  return mat.reshape(n1 * n2 * c_out, n1 * n2 * c_in)


def _circular_apply(kernel: np.ndarray, x: np.ndarray) -> np.ndarray:
  """The same circular cross-correlation by np.roll (x: (n1, n2, c_in))."""
  kh, kw, _, c_out = kernel.shape
  z = np.zeros(x.shape[:2] + (c_out,))
  for a, b in itertools.product(range(kh), range(kw)):
    z += np.roll(x, (-a, -b), axis=(0, 1)) @ kernel[a, b]
  return z


@pytest.mark.parametrize('shape', [(64, 32), (32, 64), (128, 128), (200, 10),
                                   (1, 5), (5, 1), (3, 3)])
def test_dense_bound_above_svd_and_within_1e4(shape):
  w = np.random.default_rng(sum(shape)).normal(size=shape).astype(np.float32)
  exact = _sigma1(w)
  bound = float(sb.dense_norm_upper_bound(jnp.asarray(w)))
  assert exact <= bound <= exact * (1 + 1e-4)


def test_dense_bound_equal_singular_values_worst_case():
  # All singular values equal: the slowest case of Gram iteration.
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(96, 96)))
  w = (2.5 * q[:, :80]).astype(np.float32)
  exact = _sigma1(w)
  bound = float(sb.dense_norm_upper_bound(jnp.asarray(w)))
  assert exact <= bound <= exact * (1 + 1e-4)


@pytest.mark.parametrize('t', [0, 1, 2, 3, 5])
def test_dense_fixed_iterations_match_closed_form(t):
  # After t Gram steps the bound is (sum_i sigma_i^(2^(t+1)))^(2^-(t+1)).
  w = np.random.default_rng(t).normal(size=(40, 24)).astype(np.float32)
  s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
  p = 2.0 ** (t + 1)
  closed = s[0] * np.sum((s / s[0]) ** p) ** (1 / p)
  bound = float(sb.dense_norm_upper_bound(jnp.asarray(w), num_iterations=t))
  np.testing.assert_allclose(bound, closed, rtol=ROUNDING)


def test_worst_case_iterations_closed_form():
  for rank, rtol in [(2, 1e-4), (512, 1e-4), (4096, 1e-3), (64, 1e-2)]:
    t = sb.worst_case_iterations(rank, rtol)
    assert rank ** (2.0 ** -(t + 1)) <= 1 + rtol
    assert t == 0 or rank ** (2.0 ** -t) > 1 + rtol
  assert sb.worst_case_iterations(1) == 0


@pytest.mark.parametrize('scale', [1e-30, 1e30])
def test_dense_bound_no_overflow(scale):
  w = np.random.default_rng(3).normal(size=(30, 20))
  w32 = jnp.asarray(w * scale, jnp.float32)
  exact = _sigma1(w32)
  for bound in (float(sb.dense_norm_upper_bound(w32)),
                float(jax.jit(sb.dense_norm_upper_bound)(w32))):
    assert np.isfinite(bound)
    assert exact <= bound <= exact * (1 + 1e-4)


def test_zero_kernels_give_zero():
  assert float(sb.dense_norm_upper_bound(jnp.zeros((4, 3)))) == 0.0
  assert float(sb.circular_conv_norm_upper_bound(
      jnp.zeros((3, 3, 2, 2)), (4, 4))) == 0.0


def test_circular_matrix_builder_is_the_circular_conv():
  # Two independent constructions of the same operator agree.
  rng = np.random.default_rng(4)
  k = rng.normal(size=(3, 2, 2, 3))
  x = rng.normal(size=(5, 4, 2))
  np.testing.assert_allclose(
      _circular_matrix(k, 5, 4) @ x.ravel(), _circular_apply(k, x).ravel(),
      rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('kernel_shape,grid', [
    ((3, 3, 2, 3), (5, 5)),
    ((3, 3, 3, 2), (6, 7)),    # odd n2: the half spectrum must cover it.
    ((4, 2, 2, 2), (4, 6)),
    ((5, 3, 1, 4), (3, 4)),    # kernel taller than the grid: aliasing.
    ((2, 2, 4, 4), (1, 3)),
])
def test_circular_bound_matches_explicit_matrix(kernel_shape, grid):
  k = np.random.default_rng(sum(kernel_shape)).normal(
      size=kernel_shape).astype(np.float32)
  exact = _sigma1(_circular_matrix(k.astype(np.float64), *grid))
  bound = float(sb.circular_conv_norm_upper_bound(jnp.asarray(k), grid))
  assert exact <= bound <= exact * (1 + 1e-3)


CONV_CASES = [
    # (H, W, c_in, c_out, k, strides, padding)
    (6, 6, 2, 3, 3, (1, 1), ((0, 0), (0, 0))),
    (7, 6, 3, 2, 3, (1, 1), ((1, 1), (1, 1))),
    (8, 8, 2, 2, 4, (2, 2), ((1, 1), (1, 1))),
    (8, 7, 3, 4, 4, (2, 2), ((0, 0), (0, 0))),
    (7, 7, 2, 3, 3, (2, 2), ((1, 1), (1, 1))),
    (6, 8, 2, 2, 3, (2, 1), ((0, 1), (1, 2))),
    (9, 6, 1, 3, 4, (1, 2), ((2, 0), (0, 1))),
    (5, 5, 4, 4, 4, (1, 1), ((1, 2), (2, 1))),
]


def _conv_op(h, w, c_in, c_out, k, strides, padding, seed):
  kernel = np.random.default_rng(seed).normal(size=(k, k, c_in, c_out))
  return LinearOperator(jnp.asarray(kernel, jnp.float32), 'conv',
                        (h, w, c_in), strides, padding)


@pytest.mark.parametrize('case', CONV_CASES)
def test_conv_bound_above_exact_norm(case):
  op = _conv_op(*case, seed=len(str(case)))
  exact = _sigma1(op.dense_matrix())
  bound = float(sb.conv_norm_upper_bound(op))
  assert bound >= exact
  # Tightness on these tiny grids (boundary effects are largest here): the
  # observed ratios are 1.0-1.2; this only catches a grossly loose bound.
  assert bound <= 1.5 * exact, bound / exact


@pytest.mark.parametrize('case', CONV_CASES)
def test_conv_embedding_reproduces_the_layer(case):
  # The proof's claim, checked numerically: restrict(circ(embed(x))) = op(x).
  h, w, c_in, _, _, (s1, s2), ((pt, pb), (pl, pr)) = case
  op = _conv_op(*case, seed=7)
  kernel, (m1, m2) = sb.conv_embedding(op)
  x = np.random.default_rng(8).normal(size=(h, w, c_in))
  p = np.zeros((s1 * m1, s2 * m2, c_in))
  assert s1 * m1 >= h + pt + pb and s2 * m2 >= w + pl + pr
  p[pt:pt + h, pl:pl + w] = x
  grid_x = p.reshape(m1, s1, m2, s2, c_in).transpose(0, 2, 1, 3, 4).reshape(
      m1, m2, s1 * s2 * c_in)
  z = _circular_apply(np.asarray(kernel, np.float64), grid_x)
  ho, wo, _ = op.output_shape
  expected = np.asarray(op(jnp.asarray(x, jnp.float32)), np.float64)
  np.testing.assert_allclose(z[:ho, :wo], expected, rtol=1e-4, atol=1e-4)


def test_network_bound_covers_composition():
  rng = np.random.default_rng(9)
  conv = LinearOperator(jnp.asarray(rng.normal(size=(3, 3, 2, 3)), jnp.float32),
                        'conv', (6, 6, 2), (2, 2), ((1, 1), (1, 1)))
  d_in = int(np.prod(conv.output_shape))
  dense = LinearOperator(jnp.asarray(rng.normal(size=(d_in, 5)), jnp.float32),
                         'dense', (d_in,))
  ops = [conv, dense]
  composite = np.asarray(dense.kernel, np.float64).T @ np.asarray(
      conv.dense_matrix(), np.float64)
  scale = 0.5
  bound = float(sb.network_upper_bound(ops, input_scale=scale))
  assert bound >= scale * _sigma1(composite)
  layer_exact = [_sigma1(op.dense_matrix()) for op in ops]
  assert bound >= scale * np.prod(layer_exact)
  per_layer = [float(sb.operator_norm_upper_bound(op)) for op in ops]
  np.testing.assert_allclose(
      bound, scale * np.prod(per_layer) * (1 + ALLOW) ** 2, rtol=1e-6)


def test_jittable():
  # Under jit without x64 the bounds are computed in float32, with float32's
  # rounding terms; eager calls compute in float64. Both bound the norm.
  rng = np.random.default_rng(10)
  w = jnp.asarray(rng.normal(size=(12, 7)), jnp.float32)
  exact = _sigma1(w)
  for bound in (sb.dense_norm_upper_bound(w),
                jax.jit(sb.dense_norm_upper_bound)(w)):
    assert bound.dtype == jnp.float32
    assert exact <= float(bound) <= exact * (1 + 1e-4)
  op = _conv_op(*CONV_CASES[2], seed=11)
  exact = _sigma1(op.dense_matrix())
  eager = float(sb.conv_norm_upper_bound(op))
  jitted = float(jax.jit(sb.conv_norm_upper_bound)(op))
  assert exact <= jitted <= eager * (1 + 1e-4)
  network = float(jax.jit(sb.network_upper_bound)([op]))
  assert exact <= network <= jitted * (1 + ALLOW) * (1 + 1e-6)


def _dense_cases(rng, shape, count):
  """Gaussian, near-orthogonal (flat spectrum) and nearly rank-2 matrices."""
  for i in range(count):
    kind = i % 3
    if kind == 0:
      w = rng.normal(size=shape)
    elif kind == 1:
      q, _ = np.linalg.qr(rng.normal(size=(max(shape), max(shape))))
      w = q[:shape[0], :shape[1]] * rng.uniform(0.999, 1.0, size=shape[1])
    else:
      w = (rng.normal(size=(shape[0], 2)) @ rng.normal(size=(2, shape[1]))
           + 1e-3 * rng.normal(size=shape))
    yield w * 10.0 ** rng.uniform(-30, 30)


def test_bounds_hold_at_every_scale_against_float64_svd():
  # 250 random kernels with entries from 1e-30 to 1e30: none of the bounds
  # (float32 under jit, float64 eagerly) is below the exact norm.
  rng = np.random.default_rng(12)
  dense = {'float32': jax.jit(sb.dense_norm_upper_bound),
           'float64': sb.dense_norm_upper_bound}
  worst = {}
  for shape, count, precision in (((192, 128), 30, 'float32'),
                                  ((300, 5), 60, 'float32'),
                                  ((40, 64), 40, 'float64')):
    for i, w in enumerate(_dense_cases(rng, shape, count)):
      w32 = jnp.asarray(w, jnp.float32)
      exact = _sigma1(w32)
      bound = float(dense[precision](w32))
      assert exact <= bound, (shape, i, precision, bound / exact - 1)
      worst[precision] = max(worst.get(precision, 0.0), bound / exact - 1)
  # Circular convs against the exact norm of their DFT blocks (numpy FFT).
  circular = {'float32': jax.jit(sb.circular_conv_norm_upper_bound,
                                 static_argnums=1),
              'float64': sb.circular_conv_norm_upper_bound}
  for kernel_shape, grid, count, precision in (
      ((3, 3, 16, 24), (8, 8), 60, 'float32'),
      ((4, 4, 2, 3), (5, 6), 60, 'float64')):
    for i in range(count):
      k = rng.normal(size=kernel_shape) * 10.0 ** rng.uniform(-30, 30)
      k32 = np.asarray(k, np.float32)
      k_hat = np.fft.fft2(k32.astype(np.float64), s=grid, axes=(0, 1))
      exact = float(np.linalg.svd(k_hat.reshape(-1, *kernel_shape[2:]),
                                  compute_uv=False)[:, 0].max())
      bound = float(circular[precision](jnp.asarray(k32), grid))
      assert exact <= bound, (kernel_shape, i, precision, bound / exact - 1)
      worst[precision] = max(worst.get(precision, 0.0), bound / exact - 1)
  # Not vacuous: the rounding terms stay small.
  assert worst['float64'] < 1e-4 and worst['float32'] < 1e-2, worst


def test_subnormal_entries_are_bounded():
  # XLA flushes subnormal float32 inputs to zero; the bound must still hold.
  w = np.random.default_rng(13).normal(size=(6, 4)) * 1e-39
  w32 = jnp.asarray(w, jnp.float32)
  exact = _sigma1(np.asarray(w32, np.float64))
  assert exact > 0
  for bound in (sb.dense_norm_upper_bound(w32),
                jax.jit(sb.dense_norm_upper_bound)(w32)):
    assert exact <= float(bound) < 1e-36


def test_invalid_inputs_raise():
  with pytest.raises(ValueError, match='kernel'):
    sb.dense_norm_upper_bound(jnp.zeros((2, 2, 2)))
  with pytest.raises(ValueError, match='floating'):
    sb.dense_norm_upper_bound(jnp.zeros((2, 2), jnp.int32))
  with pytest.raises(ValueError, match='finite'):
    sb.dense_norm_upper_bound(jnp.array([[1.0, jnp.nan]]))
  with pytest.raises(ValueError, match='num_iterations'):
    sb.dense_norm_upper_bound(jnp.ones((2, 2)), num_iterations=-1)
  with pytest.raises(ValueError, match='grid_shape'):
    sb.circular_conv_norm_upper_bound(jnp.ones((3, 3, 1, 1)), (0, 4))
  with pytest.raises(ValueError, match='rtol'):
    sb.dense_norm_upper_bound(jnp.ones((2, 3)), rtol=0.0)
  dense = LinearOperator(jnp.ones((3, 2)), 'dense', (3,))
  with pytest.raises(ValueError, match='conv'):
    sb.conv_norm_upper_bound(dense)
  with pytest.raises(ValueError, match='relative_float_allowance'):
    sb.network_upper_bound([dense], relative_float_allowance=-1.0)
  with pytest.raises(ValueError, match='ops'):
    sb.network_upper_bound([])
  for scale in (-2.0, float('nan'), float('inf')):
    with pytest.raises(ValueError, match=r'input_scale must be finite and >= 0'):
      sb.network_upper_bound([dense], input_scale=scale)
  # Under jit a traced bad scale cannot raise: the bound is NaN.
  bound_fn = jax.jit(lambda s: sb.network_upper_bound([dense], input_scale=s))
  assert np.isnan(bound_fn(jnp.float32(np.nan)))
  assert np.isnan(bound_fn(jnp.float32(-1.0)))
  assert np.isfinite(bound_fn(jnp.float32(2.0)))
