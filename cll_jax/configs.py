"""The default experiment configuration; experiment files override it.

Every field is commented here once. `experiments/*.py` start from
`default_config()` and set what their paper experiment changes.
"""

from __future__ import annotations

import os

import ml_collections

DEFAULT_RADII = (36 / 255, 72 / 255, 108 / 255)


def default_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0  # PRNG seed: init, data order, augmentation.
  c.distributed = False  # Call jax.distributed.initialize() (multi-host).

  c.model = ml_collections.ConfigDict()
  c.model.name = '4c3f'  # A name in cll_jax.models.ARCHITECTURES.
  c.model.activation = 'minmax'  # 'minmax' (paper) or 'relu' (LipLT paper).
  c.model.num_power_iterations = 5  # Power-iteration steps per train step.
  # Training bound: 'naive' (product of layer norms, CLL) or 'liplt'
  # (arXiv 2310.00116; needs an elementwise activation such as relu).
  c.model.bound = 'naive'
  # Optional per-channel normalisation inside the model; its Lipschitz factor
  # 1/min(std) enters every bound. None: inputs stay in [0, 1] (paper).
  c.model.input_mean = ml_collections.FieldReference(None, field_type=tuple)
  c.model.input_std = ml_collections.FieldReference(None, field_type=tuple)

  c.data = ml_collections.ConfigDict()
  c.data.name = 'cifar10'  # A name in cll_jax.data.DATASETS.
  # Use only the first n examples (None: all); for tiny local runs.
  c.data.num_train_examples = ml_collections.FieldReference(None, field_type=int)
  c.data.num_test_examples = ml_collections.FieldReference(None, field_type=int)
  # Keyword arguments of the dataset loader (root, data_dir, download, ...).
  c.data.kwargs = ml_collections.ConfigDict()
  c.data.augment = ml_collections.ConfigDict()
  c.data.augment.enabled = True  # CLL supplement B augmentations.
  c.data.augment.crop_padding = 4  # Random crop padding (8 for 64x64).
  c.data.augment.flip = True  # Random horizontal flip.
  c.data.augment.color_jitter = 0.25  # Brightness/contrast/saturation.
  c.data.augment.max_rotation_degrees = 2.0  # Uniform in [-2, 2] degrees.

  c.loss = ml_collections.ConfigDict()
  c.loss.name = 'cll'  # 'cll', 'gloro', 'gloro_trades', 'crm' or 'ce'.
  c.loss.epsilon = 0.15  # Training margin radius eps (CLL table B4).
  c.loss.epsilon_schedule = 'fixed'  # 'fixed' or GloRo's 'logarithmic'.
  c.loss.epsilon_schedule_epochs = 0  # Length of the eps ramp (0: all).
  c.loss.delta = ml_collections.FieldReference(None, field_type=float)
  # ^ CLL margin offset delta (supplement D.1); None means delta = eps.
  # 'two_sided': +delta on the other logits and -delta on the label's
  # (supplement eq. 2), so p(y) = 1/2 at distance 2 delta; 'one_sided': only
  # +delta on the others (binary eq. 4 for two classes; the official
  # two-moons set-up), p(y) = 1/2 at distance delta.
  c.loss.offset = 'two_sided'
  c.loss.p_start = 0.15  # Slack p at step 0 (CLL eq. 5 / supp. eq. 17).
  c.loss.p_end = 0.15  # Slack p after annealing.
  c.loss.p_gamma = 1.0  # Annealing power gamma of supp. eq. 17.
  c.loss.lam = 1e-4  # lambda of the lambda * K^2 regulariser (eq. 3).
  c.loss.detach_lipschitz = True  # CLL: no loss gradient through K.
  # Lipschitz-scale warm-up beta: the loss sees K * beta(t), beta annealed
  # from lipschitz_scale_start to 1 with power lipschitz_scale_gamma (B4).
  c.loss.lipschitz_scale_start = 1.0
  c.loss.lipschitz_scale_gamma = 1.0
  c.loss.trades_beta_start = 0.5  # GloRo-TRADES factor, linear ramp start.
  c.loss.trades_beta_end = 20.0  # ... and end (reached after the epochs:)
  c.loss.trades_beta_epochs = 400
  c.loss.crm_lambda = 15.0  # CRM robust-term weight (arXiv 2310.00116).
  c.loss.crm_temperature = 5.0  # CRM soft-min temperature t.
  c.loss.crm_radius_threshold = 0.2  # CRM R0: the dynamic set's radius.
  c.loss.crm_warmup_epochs = 10  # Plain cross-entropy for these epochs.

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3  # Adam base learning rate.
  c.optimizer.decay_epochs = (400, 600, 780)  # x decay_factor at these.
  c.optimizer.decay_factor = 0.1
  c.optimizer.weight_decay = 0.0  # The paper uses none.

  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 800
  c.train.batch_size = 128  # Global batch, split over all devices.
  c.train.log_every_steps = 50  # Progress-bar refresh of loss/accuracy.
  c.train.eval_every_epochs = 10  # Test-set evaluation period.
  c.train.converge_every_epochs = 1  # Converge power iteration (paper: 1).
  c.train.converge_tol = 1e-6  # Relative change that ends convergence.
  c.train.converge_max_iterations = 500
  c.train.checkpoint_every_epochs = 1  # Orbax checkpoint period.
  c.train.checkpoints_to_keep = 2
  c.train.progress_bar = True

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 500  # Global eval batch; the last one is padded.
  c.eval.radii = DEFAULT_RADII  # CRA radii (eps_train is added).
  # 'sound': guaranteed layer bounds (Gram iteration), naive product;
  # 'power': the model's training bound (naive or LipLT) from converged
  # power iteration, as in the papers (estimates, not guaranteed).
  c.eval.bound = 'sound'
  # Arithmetic of the certificate (cll_jax.forward_error): 'float64' (CPU,
  # GPU) computes logits and bounds in float64; 'float32' keeps float32
  # logits and subtracts a (larger) worst-case rounding allowance from each
  # margin. Both are sound; the metrics record which was used.
  c.eval.precision = 'float64'
  return c


def parse_arg(arg: str | None, **defaults):
  """Parses a config-file argument 'tiny,eps=0.5' into a ConfigDict.

  Bare words become True; `key=value` values take the type of the default.
  Unknown keys raise ValueError naming them (big_vision style).
  """
  result = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or '').split(',')):
    key, sep, value = part.partition('=')
    key = key.strip()
    if key not in defaults:
      raise ValueError(f'unknown config argument {key!r}; known: '
                       f'{sorted(defaults)}')
    if not sep:
      result[key] = True
    elif isinstance(defaults[key], bool):
      result[key] = value.lower() in ('1', 'true', 'yes')
    elif defaults[key] is None:
      result[key] = value
    else:
      result[key] = type(defaults[key])(value)
  return result


# The offline CIFAR-10 copy (JPEG image folders) beside the repository.
SHARED_CIFAR10 = os.path.abspath(os.path.join(
    os.path.dirname(__file__), '..', '..', 'shared', 'datasets',
    'cifar10_jpeg.tar.gz'))


def set_cifar10_source(c: ml_collections.ConfigDict, source: str) -> None:
  """'tfds' (tensorflow_datasets 'cifar10') or 'offline' (the JPEG copy)."""
  if source == 'tfds':
    c.data.name = 'cifar10'
  elif source == 'offline':
    c.data.name = 'image_folder'
    c.data.kwargs.root = SHARED_CIFAR10
  else:
    raise ValueError(f"data must be 'tfds' or 'offline', got {source!r}")


def make_tiny(c: ml_collections.ConfigDict, epochs: int = 2) -> None:
  """Shrinks a config to a local smoke run of a minute or two on CPU."""
  c.train.num_epochs = epochs
  c.data.num_train_examples = 1024
  c.data.num_test_examples = 500
  c.train.batch_size = 64
  c.eval.batch_size = 250
  c.optimizer.decay_epochs = ()
  c.train.eval_every_epochs = epochs
  c.train.checkpoint_every_epochs = 1
  c.train.log_every_steps = 4
  c.loss.trades_beta_epochs = epochs
  c.loss.crm_warmup_epochs = min(c.loss.crm_warmup_epochs, 1)


def use_crm(c: ml_collections.ConfigDict, *, crm_lambda: float,
            temperature: float, radius_threshold: float, epochs: int,
            batch_size: int, bound: str = 'liplt') -> None:
  """The CRM/LipLT set-up of arXiv 2310.00116 on a ReLU network.

  CRM loss (soft-min of the radii of the dynamic set below R0, plain
  cross-entropy for the first 10 epochs), no K^2 term, Adam at 1e-3 (not
  given in the paper summary) without decay.
  """
  c.model.activation = 'relu'  # LipLT needs an elementwise activation.
  c.model.bound = bound
  c.loss.name = 'crm'
  c.loss.crm_lambda = crm_lambda
  c.loss.crm_temperature = temperature
  c.loss.crm_radius_threshold = radius_threshold
  c.loss.crm_warmup_epochs = 10
  c.loss.lam = 0.0
  c.optimizer.learning_rate = 1e-3
  c.optimizer.decay_epochs = ()
  c.train.num_epochs = epochs
  c.train.batch_size = batch_size
