"""A PyTorch eager reference of the CLL step and epoch loop (benchmarks only).

The same computation as `cll_jax.train.train_step` with the CLL loss on an
unconstrained network (`Conv`/`Dense` layers, MinMax, dense head), written
the way a PyTorch user would: NCHW, `torch.nn.functional.conv2d`, Adam.

  * power iteration per layer, warm-started: `num_power_iterations` steps of
    u <- A^T A u / ||A^T A u|| on the layer's true operator (the conv on its
    input shape, stride and zero padding; the adjoint is
    `conv_transpose2d` with the output padding that restores the input
    shape), iterate without gradient, sigma = ||A u|| with gradient;
  * K_ij = ||w_i - w_j|| prod_{l<L} sigma_l (CLL supp. eq. 2, the pairwise
    head bound), detached in the loss (`loss.detach_lipschitz`), and the
    penalty lambda K^2 with K = prod_l sigma_l;
  * the calibrated softmax cross-entropy of multiclass CLL (supp. eqs. 1-2),
    `softplus(logsumexp_{i != y}(g_i - g_y))` as `cll_jax.losses`;
  * Adam (torch defaults, as optax.adam's).

`Reference.from_jax(model, variables)` copies a JAX network's weights and
power-iteration vectors (HWIO -> OIHW kernels; the first dense kernel's rows
permuted from the NHWC to the NCHW flattening), so that both compute the
same function and the same step; `tests/test_torch_reference.py` checks it.

`epoch` is the PyTorch twin of one epoch of `train_and_evaluate`: shuffled
batches of in-memory uint8 images, the paper's augmentations on the batch
(crop by zero-padded translation, flip, colour jitter, rotation), the steps,
power iteration run to convergence, then the certified evaluation of the test
set at the given radii.

torch is an optional extra (`pip install .[bench]`); without it `AVAILABLE`
is False and the benchmarks skip their PyTorch rows with `SKIP_MESSAGE`.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Sequence

import numpy as np

# OpenMP threads that spin while waiting steal the cores from each other when
# the machine is shared: a 4C3F step measured 2.8 s with the default policy
# and 0.40 s with PASSIVE at a load of 3.4 on 2 cores. Set before torch loads
# its OpenMP runtime; a value already in the environment wins.
os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')

try:
  import torch
  import torch.nn.functional as F
except ImportError:  # pragma: no cover - depends on the environment
  torch = None
  F = None

AVAILABLE = torch is not None
SKIP_MESSAGE = ('PyTorch rows skipped: torch is not installed (`pip install '
                '.[bench]` installs the CPU torch 2.13.0)')
# Below this norm a vector is treated as zero when normalising (as JAX).
_TINY = 1e-30


def _require_torch() -> None:
  if torch is None:
    raise ImportError(SKIP_MESSAGE)


def _normalize(u):
  return u / torch.clamp(torch.linalg.vector_norm(u), min=_TINY)


class _Layer:
  """One conv or dense layer: weight, bias, its operator and adjoint."""

  def __init__(self, kind: str, weight, bias, input_shape, stride=1,
               padding=0):
    self.kind = kind
    self.weight = weight
    self.bias = bias
    self.input_shape = tuple(input_shape)  # (C, H, W) or (d,)
    self.stride, self.padding = stride, padding
    if kind == 'conv':
      c, h, w = self.input_shape
      k = weight.shape[-1]
      out = (h + 2 * padding - k) // stride + 1
      # conv_transpose2d gives (out - 1) s - 2 p + k; the rest is the rows a
      # strided conv never reads, which the adjoint must give back as zeros.
      self.output_padding = h - ((out - 1) * stride - 2 * padding + k)

  def apply(self, x, weight=None):
    weight = self.weight if weight is None else weight
    if self.kind == 'conv':
      return F.conv2d(x, weight, stride=self.stride, padding=self.padding)
    return x @ weight

  def adjoint(self, g, weight):
    if self.kind == 'conv':
      return F.conv_transpose2d(g, weight, stride=self.stride,
                                padding=self.padding,
                                output_padding=self.output_padding)
    return g @ weight.T


class Reference:
  """A CLL-trained Lipschitz network in PyTorch eager.

  Attributes:
    layers: the hidden layers and the head (last), `_Layer`s.
    u: the power-iteration vectors, one per layer, shaped `(1, *input)`.
    optimizer: `torch.optim.Adam` over every weight and bias.
  """

  def __init__(self, layers: Sequence[_Layer], u: Sequence[Any], *,
               epsilon: float, p: float, lam: float,
               num_power_iterations: int = 5, learning_rate: float = 1e-3):
    _require_torch()
    self.layers = list(layers)
    self.u = list(u)
    self.epsilon, self.p, self.lam = float(epsilon), float(p), float(lam)
    self.num_power_iterations = int(num_power_iterations)
    self.parameters = [t for layer in self.layers
                       for t in (layer.weight, layer.bias)]
    self.optimizer = torch.optim.Adam(self.parameters, lr=learning_rate)

  @classmethod
  def from_jax(cls, model, variables, input_shape: Sequence[int], *,
               epsilon: float, p: float, lam: float,
               learning_rate: float = 1e-3) -> 'Reference':
    """Copies a JAX `LipschitzNetwork`'s weights and iterates (see module)."""
    _require_torch()
    from cll_jax import models  # pylint: disable=g-import-not-at-top
    if model.activation != 'minmax' or not models.is_unconstrained(
        model.architecture, model.head):
      raise ValueError('the reference covers MinMax networks of Conv/Dense '
                       f'layers with a dense head, got {model.activation!r} '
                       f'/ {model.head!r}')
    if model.input_mean is not None or model.input_std is not None:
      raise ValueError('the reference has no input normalisation')
    params = variables['params']
    state = variables['power_iteration']
    shapes = models.layer_input_shapes(model, input_shape)
    specs = list(model.architecture) + [None]
    layers, us = [], []
    previous = None
    for name, spec, shape in zip(models.layer_names(model), specs, shapes):
      kernel = np.asarray(params[name]['kernel'], np.float32)
      bias = np.asarray(params[name]['bias'], np.float32)
      u = np.asarray(state[name]['u'], np.float32)
      if kernel.ndim == 4:
        weight = kernel.transpose(3, 2, 0, 1)  # HWIO -> OIHW
        u = u.transpose(2, 0, 1)  # HWC -> CHW
        layer_shape = (shape[2], shape[0], shape[1])
        kind = 'conv'
      else:
        weight = kernel
        if previous is not None and len(previous) == 3:
          # NHWC flattening -> NCHW flattening of the conv body's output.
          h, w, c = previous
          weight = kernel.reshape(h, w, c, -1).transpose(2, 0, 1, 3).reshape(
              h * w * c, -1)
          u = u.reshape(h, w, c).transpose(2, 0, 1).reshape(-1)
        layer_shape = shape
        kind = 'dense'
      layers.append(_Layer(
          kind, torch.tensor(np.ascontiguousarray(weight), requires_grad=True),
          torch.tensor(bias, requires_grad=True), layer_shape,
          getattr(spec, 'stride', 1), getattr(spec, 'padding', 0)))
      us.append(torch.tensor(np.ascontiguousarray(u))[None])
      previous = spec.output_shape(shape) if spec is not None else None
    return cls(layers, us, epsilon=epsilon, p=p, lam=lam,
               num_power_iterations=model.num_power_iterations,
               learning_rate=learning_rate)

  # -- the bound -------------------------------------------------------------

  def _sigmas(self, steps: int):
    """Advances every layer's iterate `steps` times; sigma_l with gradient."""
    sigmas = []
    for i, layer in enumerate(self.layers):
      if steps:
        with torch.no_grad():
          u = self.u[i]
          frozen = layer.weight.detach()
          for _ in range(steps):
            u = _normalize(layer.adjoint(layer.apply(u, frozen), frozen))
          self.u[i] = u
      sigmas.append(torch.linalg.vector_norm(layer.apply(self.u[i])))
    return torch.stack(sigmas)

  def bounds(self, sigmas):
    """(K_ij (N, N), K): pairwise head bound and the global product bound."""
    prefix = torch.prod(sigmas[:-1])
    head = self.layers[-1].weight  # (d, N)
    diff = head[:, :, None] - head[:, None, :]
    distances = torch.sqrt(torch.sum(diff * diff, dim=0).clamp(min=0.0))
    return distances * prefix, prefix * sigmas[-1]

  # -- the network -----------------------------------------------------------

  def logits(self, images):
    """images: float (B, C, H, W) in [0, 1] -> (B, N) logits."""
    x = images
    last = len(self.layers) - 1
    for i, layer in enumerate(self.layers):
      if layer.kind == 'dense':
        x = x.reshape(x.shape[0], -1)
      x = layer.apply(x) + (layer.bias[:, None, None] if layer.kind == 'conv'
                            else layer.bias)
      if i < last:
        x = minmax(x)
    return x

  def loss(self, images, labels, steps: int | None = None):
    """(total, per-example CLL values, logits, K) of one training batch."""
    sigmas = self._sigmas(self.num_power_iterations if steps is None
                          else steps)
    pairwise, lipschitz = self.bounds(sigmas)
    logits = self.logits(images)
    values = cll_loss(logits, labels, pairwise.detach(), self.epsilon,
                      self.p)
    total = values.mean() + self.lam * lipschitz**2
    return total, values, logits, lipschitz

  def step(self, images, labels) -> dict[str, float]:
    """One training step (power iteration, loss, backward, Adam)."""
    self.optimizer.zero_grad(set_to_none=True)
    total, values, logits, _ = self.loss(images, labels)
    total.backward()
    self.optimizer.step()
    return {'loss': values.detach(), 'logits': logits.detach()}

  def converge(self, tol: float = 1e-6, max_iterations: int = 500,
               check_every: int = 10) -> None:
    """Power iteration to a relative change <= tol over blocks of 10 steps.

    As `cll_jax.lipschitz.converge_power_iteration`, layer by layer.
    """
    with torch.no_grad():
      for i, layer in enumerate(self.layers):
        w = layer.weight
        u = self.u[i]
        sigma, previous, done = torch.linalg.vector_norm(
            layer.apply(u)), math.inf, 0
        while done < max_iterations and abs(
            float(sigma) - previous) > tol * abs(float(sigma)):
          previous = float(sigma)
          for _ in range(min(check_every, max_iterations - done)):
            u = _normalize(layer.adjoint(layer.apply(u, w), w))
          done += min(check_every, max_iterations - done)
          sigma = torch.linalg.vector_norm(layer.apply(u, w))
        self.u[i] = u

  def certified_counts(self, images, labels, radii: Sequence[float],
                       batch_size: int = 500) -> dict[str, float]:
    """Counts of correct ('accuracy') and certified-correct ('cra_r') test
    images (uint8 NHWC), with K_ij from the current (frozen) iterates."""
    with torch.no_grad():
      pairwise, _ = self.bounds(self._sigmas(0))
      counts = {'accuracy': 0.0, **{f'cra_{r:.4f}': 0.0 for r in radii}}
      for start in range(0, len(labels), batch_size):
        x = to_nchw_float(images[start:start + batch_size])
        y = torch.from_numpy(np.array(labels[start:start + batch_size])).long()
        logits = self.logits(x)
        correct = logits.argmax(-1) == y
        counts['accuracy'] += float(correct.sum())
        # Certified at r: correct and f_y - f_i > r K_yi for every i != y.
        gap = logits.gather(1, y[:, None]) - logits
        k_row = pairwise[y]
        is_label = torch.arange(logits.shape[1])[None, :] == y[:, None]
        for r in radii:
          ok = torch.where(is_label, True, gap > r * k_row).all(dim=1)
          counts[f'cra_{r:.4f}'] += float((ok & correct).sum())
    return counts


def minmax(x):
  """MinMax on the channel axis (dim 1): [max(a, b), min(a, b)] of halves."""
  a, b = torch.chunk(x, 2, dim=1)
  a_wins = a >= b
  return torch.cat([torch.where(a_wins, a, b), torch.where(a_wins, b, a)],
                   dim=1)


def cll_loss(logits, labels, pairwise, epsilon: float, p: float,
             delta: float | None = None):
  """Per-example multiclass CLL (CLL supp. eqs. 1-2), as `cll_jax.losses`."""
  delta = epsilon if delta is None else delta
  sigma = epsilon / (math.log1p(-p) - math.log(p))
  num_classes = logits.shape[1]
  is_label = torch.arange(num_classes)[None, :] == labels[:, None]
  gap = logits.gather(1, labels[:, None]) - logits
  k_row = torch.where(is_label, torch.ones_like(gap), pairwise[labels])
  g = torch.where(is_label, torch.full_like(gap, -delta / sigma),
                  (delta - gap / k_row) / sigma)
  g_label = g.gather(1, labels[:, None])
  others = torch.where(is_label, torch.full_like(g, -math.inf), g - g_label)
  return F.softplus(torch.logsumexp(others, dim=1))


def to_nchw_float(images: np.ndarray):
  """uint8 (B, H, W, C) -> float (B, C, H, W) in [0, 1]."""
  x = torch.from_numpy(np.array(images, copy=True))
  return x.permute(0, 3, 1, 2).float().div_(255.0)


def augment(x, generator=None, crop_padding: int = 4, flip: bool = True,
            color_jitter: float = 0.25, max_rotation_degrees: float = 2.0):
  """The paper's augmentations on a float NCHW batch, per example.

  As `cll_jax.data.augment`: translation by (dy, dx) in {-p..p}^2 with zero
  fill (RandomCrop with padding), horizontal flip, brightness / contrast /
  saturation jitter with clipping after each, rotation (bilinear, zero fill),
  final clip.
  """
  b, c, h, w = x.shape
  p = crop_padding
  if p:
    padded = F.pad(x, (p, p, p, p))
    dy = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (b,), generator=generator)
    rows = (dy[:, None] + torch.arange(h)[None])  # (B, H)
    cols = (dx[:, None] + torch.arange(w)[None])  # (B, W)
    index = torch.arange(b)[:, None, None]
    x = padded.permute(0, 2, 3, 1)[index, rows[:, :, None],
                                   cols[:, None, :]].permute(0, 3, 1, 2)
  if flip:
    flips = torch.rand(b, generator=generator) < 0.5
    x = torch.where(flips[:, None, None, None], x.flip(3), x)
  if color_jitter:
    lo, hi = max(0.0, 1.0 - color_jitter), 1.0 + color_jitter
    f = lo + (hi - lo) * torch.rand(b, 3, 1, 1, 1, generator=generator)
    luma = torch.tensor([0.299, 0.587, 0.114])[None, :, None, None]
    x = torch.clamp(f[:, 0] * x, 0, 1)
    gray_mean = (x * luma).sum(1, keepdim=True).mean((2, 3), keepdim=True)
    x = torch.clamp(f[:, 1] * x + (1 - f[:, 1]) * gray_mean, 0, 1)
    gray = (x * luma).sum(1, keepdim=True)
    x = torch.clamp(f[:, 2] * x + (1 - f[:, 2]) * gray, 0, 1)
  if max_rotation_degrees:
    angle = torch.deg2rad((2 * torch.rand(b, generator=generator) - 1)
                          * max_rotation_degrees)
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(cos)
    # Output (x, y) samples the input at R(angle) (x, y) about the centre.
    theta = torch.stack([torch.stack([cos, -sin, zero], 1),
                         torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode='bilinear', padding_mode='zeros',
                      align_corners=False)
  return torch.clamp(x, 0, 1)


def epoch(reference: Reference, train_images: np.ndarray,
          train_labels: np.ndarray, test_images: np.ndarray,
          test_labels: np.ndarray, *, batch_size: int, radii, seed: int,
          num_steps: int | None = None, augment_config=None,
          converge_tol: float = 1e-6, converge_max_iterations: int = 500,
          eval_batch_size: int = 500) -> dict[str, Any]:
  """One epoch: train on shuffled batches, converge, certify the test set.

  Returns the wall seconds of the training part (`train_s`, `num_steps`
  steps), of convergence plus evaluation (`eval_s`) and the test metrics.
  """
  generator = torch.Generator().manual_seed(seed)
  aug = dict(augment_config or {})
  order = np.random.default_rng(seed).permutation(len(train_labels))
  total_steps = len(order) // batch_size
  num_steps = total_steps if num_steps is None else min(num_steps,
                                                        total_steps)
  start = time.perf_counter()
  for i in range(num_steps):
    index = order[i * batch_size:(i + 1) * batch_size]
    x = to_nchw_float(train_images[index])
    if aug.get('enabled', True):
      x = augment(x, generator, aug.get('crop_padding', 4),
                  aug.get('flip', True), aug.get('color_jitter', 0.25),
                  aug.get('max_rotation_degrees', 2.0))
    reference.step(x, torch.from_numpy(np.array(train_labels[index])).long())
  train_s = time.perf_counter() - start
  start = time.perf_counter()
  reference.converge(converge_tol, converge_max_iterations)
  counts = reference.certified_counts(test_images, test_labels, radii,
                                      eval_batch_size)
  eval_s = time.perf_counter() - start
  n = float(len(test_labels))
  return {'train_s': train_s, 'num_steps': num_steps,
          'steps_per_epoch': total_steps, 'eval_s': eval_s,
          **{f'test_{k}': v / n for k, v in counts.items()}}
