"""Training objectives: from `config.loss` to per-example loss values.

The train step asks `per_example_loss` for the configured loss and never
names a loss itself, so a new loss joins by registering one function:

  @objectives.register('my_loss')
  def _my_loss(cfg, sched, out, labels, step, epoch):
    k = objectives.training_pairwise(cfg, sched, out, step)
    return my_losses.my_loss(out.logits, labels, k, cfg.epsilon), {}

Each entry receives the loss config section, the `LossSchedules`, the
network's `NetworkOutput`, the labels and the (traced) step and epoch, and
returns `(values, used)`: the `(B,)` per-example losses (means over the
batch are taken by the step, with padding rows masked out) and a dict of the
scheduled values it used (logged as metrics).
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from cll_jax import losses
from cll_jax import schedules

Objective = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
_OBJECTIVES: dict[str, Objective] = {}


def register(name: str) -> Callable[[Objective], Objective]:
  """Decorator: makes `fn` the objective of `config.loss.name == name`."""
  def add(fn: Objective) -> Objective:
    if name in _OBJECTIVES:
      raise ValueError(f'objective {name!r} is already registered')
    _OBJECTIVES[name] = fn
    return fn
  return add


def names() -> tuple[str, ...]:
  return tuple(_OBJECTIVES)


@flax.struct.dataclass
class LossSchedules:
  """Step -> value functions for the loss hyperparameters that anneal."""
  slack: Any = flax.struct.field(pytree_node=False)
  lipschitz_scale: Any = flax.struct.field(pytree_node=False)
  epsilon: Any = flax.struct.field(pytree_node=False)
  trades_beta: Any = flax.struct.field(pytree_node=False)
  # Constants that sweeps may vary between runs (`cll_jax.sweep`).
  soc_gamma: Any = flax.struct.field(pytree_node=False)


# `config.loss.p_convention`: the factor from the configured p to the p of
# CLL eq. 5. 'paper': p itself, in (0, 0.5); 'code': the official code's
# p_code = 2 p, the mass outside the margin on both sides, in (0, 1) (see
# `losses.calibrated_scale`).
P_CONVENTIONS = {'paper': 1.0, 'code': 0.5}


def paper_p(loss_config, p: float) -> float:
  """The configured slack `p` as the p of CLL eq. 5 (`P_CONVENTIONS`)."""
  return p * P_CONVENTIONS[loss_config.get('p_convention', 'paper')]


def loss_schedules(config, steps_per_epoch: int) -> LossSchedules:
  """The step schedules of `config.loss`; the slack is the p of CLL eq. 5."""
  loss = config.loss
  total = config.train.num_epochs * steps_per_epoch
  return LossSchedules(
      slack=schedules.polynomial_anneal(
          paper_p(loss, loss.p_start), paper_p(loss, loss.p_end), loss.p_gamma,
          loss.get('p_anneal_epochs', config.train.num_epochs)
          * steps_per_epoch),
      lipschitz_scale=schedules.polynomial_anneal(
          loss.lipschitz_scale_start, 1.0, loss.lipschitz_scale_gamma,
          total),
      epsilon=schedules.gloro_epsilon(
          loss.epsilon, loss.epsilon_schedule,
          loss.get('epsilon_schedule_epochs', config.train.num_epochs)
          * steps_per_epoch),
      trades_beta=schedules.linear(
          loss.trades_beta_start, loss.trades_beta_end,
          loss.trades_beta_epochs * steps_per_epoch),
      soc_gamma=optax.constant_schedule(loss.get('soc_gamma', 0.0)))


def training_pairwise(cfg, sched: LossSchedules, out, step,
                      detach: bool = False) -> jax.Array:
  """The K_ij the loss sees: the network's, times the K-scale warm-up."""
  pairwise = out.pairwise_lipschitz
  if detach:
    pairwise = jax.lax.stop_gradient(pairwise)
  return pairwise * sched.lipschitz_scale(step)


def per_example_loss(config, sched: LossSchedules, out, labels: jax.Array,
                     step: jax.Array, epoch: jax.Array):
  """The configured loss for every example, and the values it used."""
  name = config.loss.name
  if name not in _OBJECTIVES:
    raise ValueError(f'unknown loss {name!r}; registered: {names()}')
  return _OBJECTIVES[name](config.loss, sched, out, labels, step, epoch)


@register('cll')
def _cll(cfg, sched, out, labels, step, epoch):
  del epoch
  # CLL normalises by K but does not optimise it through the loss; K is
  # pushed down only by the lambda K^2 term (CLL sec. 3.3). GloRo and CRM
  # lower K through the loss itself, so their K keeps its gradient.
  pairwise = training_pairwise(cfg, sched, out, step,
                               detach=cfg.detach_lipschitz)
  epsilon = sched.epsilon(step)
  p = sched.slack(step)
  delta = epsilon if cfg.get('delta') is None else cfg.delta
  if cfg.offset == 'one_sided':
    # Offset delta on the other logits only (g_y = 0), as the official
    # two-moons config (`add_epsilon_one_sided`); by the softmax's shift
    # invariance that is the two-sided eq. 2 with delta / 2, and for N = 2
    # it is exactly binary CLL (eq. 4): probability 1/2 at distance delta.
    delta = delta / 2
  values = losses.multiclass_cll_loss(out.logits, labels, pairwise, epsilon,
                                      p, delta=delta)
  return values, {'epsilon': epsilon, 'p': p}


def gloro_head_lipschitz(loss_config, out) -> jax.Array | None:
  """The head factor h of `losses.gloro_loss`'s official variant, or None.

  None unless `loss_config.gloro_variant == 'official'` (`loss_config` is
  the config's `loss` section). The official code's
  h is max_ij ||w_i - w_j|| over the head's class vectors, with gradient.
  With the naive bound `K_ij = s P ||w_i - w_j||` (s the input scale, P the
  product of the body's norms), `max K / P` is `s h`: the constant s cancels
  in `h / stop_gradient(h)`, and the gradient into P cancels too.
  """
  if loss_config.get('gloro_variant', 'faithful') != 'official':
    return None
  return jnp.max(out.pairwise_lipschitz) / jnp.prod(out.layer_norms[:-1])


@register('gloro')
def _gloro(cfg, sched, out, labels, step, epoch):
  del epoch
  epsilon = sched.epsilon(step)
  pairwise = training_pairwise(cfg, sched, out, step)
  return (losses.gloro_loss(out.logits, labels, pairwise, epsilon,
                            gloro_head_lipschitz(cfg, out),
                            logit_scale=cfg.get('gloro_logit_scale', 1.0)),
          {'epsilon': epsilon})


@register('gloro_trades')
def _gloro_trades(cfg, sched, out, labels, step, epoch):
  del epoch
  epsilon = sched.epsilon(step)
  beta = sched.trades_beta(step)
  pairwise = training_pairwise(cfg, sched, out, step)
  values = losses.gloro_trades_loss(out.logits, labels, pairwise, epsilon,
                                    beta, gloro_head_lipschitz(cfg, out))
  return values, {'epsilon': epsilon, 'trades_beta': beta}


@register('crm')
def _crm(cfg, sched, out, labels, step, epoch):
  pairwise = training_pairwise(cfg, sched, out, step)
  robust = losses.crm_loss(out.logits, labels, pairwise, cfg.crm_lambda,
                           cfg.crm_temperature, cfg.crm_radius_threshold)
  plain = optax.softmax_cross_entropy_with_integer_labels(out.logits, labels)
  # Plain cross-entropy for the first epochs (arXiv 2310.00116).
  values = jnp.where(epoch < cfg.crm_warmup_epochs, plain, robust)
  return values, {'epsilon': sched.epsilon(step)}


@register('soc')
def _soc(cfg, sched, out, labels, step, epoch):
  # SOC's loss: cross-entropy minus gamma times the certified radius of
  # correct examples (Singla et al. 2022), with the network's K.
  del epoch
  pairwise = training_pairwise(cfg, sched, out, step)
  gamma = sched.soc_gamma(step)
  return (losses.certificate_regularized_loss(out.logits, labels, pairwise,
                                              gamma),
          {'epsilon': sched.epsilon(step), 'soc_gamma': gamma})


@register('ce')
def _ce(cfg, sched, out, labels, step, epoch):
  del cfg, epoch
  return (optax.softmax_cross_entropy_with_integer_labels(out.logits, labels),
          {'epsilon': sched.epsilon(step)})


@register('multi_margin')
def _multi_margin(cfg, sched, out, labels, step, epoch):
  # CPL's loss (Meunier et al. 2022): the hinge on raw logit differences;
  # the network's K is 1 by construction, so the loss does not read it.
  del epoch
  return (losses.multi_margin_loss(out.logits, labels, cfg.margin),
          {'epsilon': sched.epsilon(step)})


@register('offset_ce')
def _offset_ce(cfg, sched, out, labels, step, epoch):
  # AOL / SLL / LBDN's offset cross-entropy (CLL supp. A.1).
  del epoch
  return (losses.offset_cross_entropy(out.logits, labels, cfg.offset_ce_offset,
                                      cfg.temperature),
          {'epsilon': sched.epsilon(step)})
