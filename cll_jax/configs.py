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
  # 'minmax' (paper), 'householder' (SOC's HH, learned; MinMax at init) or
  # 'relu' (LipLT paper).
  c.model.activation = 'minmax'
  c.model.num_power_iterations = 5  # Power-iteration steps per train step.
  # Training bound: 'naive' (product of layer norms, CLL) or 'liplt'
  # (arXiv 2310.00116; needs an elementwise activation such as relu).
  c.model.bound = 'naive'
  # Optional per-channel normalisation inside the model; its Lipschitz factor
  # 1/min(std) enters every bound. None: inputs stay in [0, 1] (paper).
  c.model.input_mean = ml_collections.FieldReference(None, field_type=tuple)
  c.model.input_std = ml_collections.FieldReference(None, field_type=tuple)
  # The head: 'dense' (unconstrained; what CLL uses, also on constrained
  # bodies) or 'lln' (last-layer normalisation, unit class vectors).
  c.model.head = 'dense'
  # SOC layers (lipconv*, soc_mlp*; cll_jax.layers.soc).
  c.model.soc = ml_collections.ConfigDict()
  c.model.soc.max_norm = 1.5  # ||A|| after scaling by the norm estimate.
  c.model.soc.terms_train = 6  # Series terms of exp(A) in training.
  c.model.soc.terms_eval = 15  # ... in evaluation / certification.

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
  # 'cll', 'gloro', 'gloro_trades', 'crm', 'soc', 'multi_margin' (CPL),
  # 'offset_ce' (AOL, SLL, LBDN) or 'ce' (cll_jax.objectives).
  c.loss.name = 'cll'
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
  # What p_start / p_end mean: 'paper', the p of CLL eq. 5 in (0, 0.5); or
  # 'code', the official code's p_code = 2 p in (0, 1) (its width
  # logit(1 - p/2) - logit(p/2); fig. 5's p up to 0.8, table D5, Tiny-ImageNet).
  c.loss.p_convention = 'paper'
  c.loss.p_gamma = 1.0  # Annealing power gamma of supp. eq. 17.
  c.loss.lam = 1e-4  # lambda of the lambda * K^2 regulariser (eq. 3).
  c.loss.detach_lipschitz = True  # CLL: no loss gradient through K.
  # Lipschitz-scale warm-up beta: the loss sees K * beta(t), beta annealed
  # from lipschitz_scale_start to 1 with power lipschitz_scale_gamma (B4).
  c.loss.lipschitz_scale_start = 1.0
  c.loss.lipschitz_scale_gamma = 1.0
  # GloRo / GloRo-TRADES gradient of K: 'faithful' (the loss as GloRo
  # defines it) or 'official' (the official CLL code's GloroLoss, whose
  # body factor P h / stop_gradient(h) also carries the head's gradient;
  # only to reproduce CLL fig. 4 with that code, see `losses.gloro_loss`).
  c.loss.gloro_variant = 'faithful'
  # GloRo's fixed temperature scaling s = 1 / T of CLL supp. D.1 (fig. D4c):
  # the loss is L_GloRo(y; h(s f(x))). 1 is GloRo's own loss.
  c.loss.gloro_logit_scale = 1.0
  c.loss.trades_beta_start = 0.5  # GloRo-TRADES factor, linear ramp start.
  c.loss.trades_beta_end = 20.0  # ... and end (reached after the epochs:)
  c.loss.trades_beta_epochs = 400
  c.loss.crm_lambda = 15.0  # CRM robust-term weight (arXiv 2310.00116).
  c.loss.crm_temperature = 5.0  # CRM soft-min temperature t.
  c.loss.crm_radius_threshold = 0.2  # CRM R0: the dynamic set's radius.
  c.loss.crm_warmup_epochs = 10  # Plain cross-entropy for these epochs.
  # SOC's certificate regulariser gamma (loss 'soc', Singla et al. 2022).
  c.loss.soc_gamma = 0.0
  # CPL's multi-class hinge margin m (loss 'multi_margin').
  c.loss.margin = 0.7
  # The offset cross-entropy of AOL / SLL / LBDN (loss 'offset_ce'):
  # t * CE((f - u onehot(y)) / t) with offset u and temperature t.
  c.loss.offset_ce_offset = 1.5
  c.loss.temperature = 0.25

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'  # 'adam' (CLL) or 'sgd' (SOC's recipe).
  c.optimizer.momentum = 0.9  # SGD momentum (sgd only).
  c.optimizer.nesterov = False  # Nesterov momentum (sgd only).
  c.optimizer.learning_rate = 1e-3  # Base (triangular: peak) learning rate.
  # 'step' (x decay_factor at decay_epochs: CLL, SOC) or 'triangular' (0 ->
  # learning_rate at peak_fraction of the run -> 0: CPL, SLL, LBDN).
  c.optimizer.schedule = 'step'
  c.optimizer.peak_fraction = 0.4
  c.optimizer.decay_epochs = (400, 600, 780)  # x decay_factor at these.
  c.optimizer.decay_factor = 0.1
  # Decoupled (adam: AdamW) or L2 (sgd) weight decay on kernels; the CLL
  # paper uses none, SOC 5e-4.
  c.optimizer.weight_decay = 0.0

  c.train = ml_collections.ConfigDict()
  c.train.num_epochs = 800
  # Global batch, split over all devices; padded with masked rows (weight 0)
  # to a multiple of the device count when it does not divide.
  c.train.batch_size = 128
  c.train.log_every_steps = 50  # Progress-bar refresh of loss/accuracy.
  c.train.eval_every_epochs = 10  # Test-set evaluation period.
  c.train.converge_every_epochs = 1  # Converge power iteration (paper: 1).
  c.train.converge_tol = 1e-6  # Relative change that ends convergence.
  c.train.converge_max_iterations = 500
  c.train.checkpoint_every_epochs = 1  # Orbax checkpoint period.
  c.train.checkpoints_to_keep = 2
  c.train.progress_bar = True  # Progress bar and status lines (process 0).
  # A step with a non-finite loss or gradient is never applied. 'stop': the
  # run stops there with an error (exit code 1), keeping the last good
  # checkpoint; 'skip': such steps are dropped and counted
  # (train_nonfinite_steps), and only an epoch of nothing but bad steps stops.
  c.train.on_nonfinite = 'stop'

  c.eval = ml_collections.ConfigDict()
  # Global eval batch; padded to a multiple of the device count, and the
  # last batch is padded (masked), so every test example counts once.
  c.eval.batch_size = 500
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


# Where the offline data sets (`cifar10_jpeg.tar.gz`, ...) are looked for, in
# order: $CLL_JAX_SHARED_DATASETS, then `shared/datasets` in or beside the
# current directory, then beside the package's repository (an editable
# install next to `shared/`).
SHARED_DATASETS_ENV = 'CLL_JAX_SHARED_DATASETS'


def shared_dataset_candidates(name: str) -> list[str]:
  """The places `shared_dataset(name)` looks, in order."""
  folders = []
  if os.environ.get(SHARED_DATASETS_ENV):
    folders.append(os.environ[SHARED_DATASETS_ENV])
  folders += [os.path.join('shared', 'datasets'),
              os.path.join('..', 'shared', 'datasets'),
              os.path.join(os.path.dirname(__file__), '..', '..', 'shared',
                           'datasets')]
  return [os.path.abspath(os.path.join(f, name)) for f in folders]


def shared_dataset(name: str) -> str:
  """The first existing candidate path of an offline data set file.

  When none exists the first candidate is returned, so that config
  validation reports a missing path (and `shared_dataset_candidates` lists
  where else it looked).
  """
  candidates = shared_dataset_candidates(name)
  return next((c for c in candidates if os.path.exists(c)), candidates[0])


SHARED_CIFAR10 = shared_dataset('cifar10_jpeg.tar.gz')


def set_cifar10_source(c: ml_collections.ConfigDict, source: str) -> None:
  """'tfds' (tensorflow_datasets 'cifar10') or 'offline' (the JPEG copy)."""
  if source == 'tfds':
    c.data.name = 'cifar10'
  elif source == 'offline':
    c.data.name = 'image_folder'
    c.data.kwargs.root = shared_dataset('cifar10_jpeg.tar.gz')
  else:
    raise ValueError(f"data must be 'tfds' or 'offline', got {source!r}")


def shorten_schedule(c: ml_collections.ConfigDict, epochs: int) -> None:
  """Trains `epochs` epochs, every epoch-based schedule scaled to match.

  The learning-rate decays, GloRo's eps ramp, the slack annealing (when it
  has its own length) and the TRADES ramp (of loss 'gloro_trades') are
  scaled by `epochs / c.train.num_epochs` (at least 1 epoch each), so a run
  follows the paper's schedule in miniature; evaluation stays at its
  period and always runs after the last epoch.

  Raises:
    ValueError: `epochs` < 1.
  """
  if not isinstance(epochs, int) or epochs < 1:
    raise ValueError(f'epochs must be an integer >= 1, got {epochs!r}')
  scale = epochs / c.train.num_epochs

  def scaled(e):
    return max(1, round(e * scale))

  c.optimizer.decay_epochs = tuple(scaled(e) for e in c.optimizer.decay_epochs)
  if c.loss.epsilon_schedule_epochs:
    c.loss.epsilon_schedule_epochs = scaled(c.loss.epsilon_schedule_epochs)
  if c.loss.get('p_anneal_epochs'):
    c.loss.p_anneal_epochs = scaled(c.loss.p_anneal_epochs)
  if c.loss.name == 'gloro_trades':
    c.loss.trades_beta_epochs = scaled(c.loss.trades_beta_epochs)
  c.train.num_epochs = epochs


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


# The SOC code's input normalisation (CIFAR mean, one std for all channels).
SOC_INPUT_MEAN = (0.4914, 0.4822, 0.4465)
SOC_INPUT_STD = (0.2507, 0.2507, 0.2507)


def use_lipconv(c: ml_collections.ConfigDict, *, depth: int, loss: str,
                epochs: int = 200, batch_size: int = 128,
                gamma: float = 0.0, tiny: bool = False) -> None:
  """LipConv-depth (SOC convs, Householder activations) with either loss.

  'cll': the CLL paper's recipe on the SOC code base (its
  `soc/train_cll_on_*.sh`): AdamW 1e-3 with weight decay 5e-4 on kernels,
  x0.1 at 50% and 75% of the epochs, an unconstrained dense head, K
  detached, the two-sided offset delta = eps. The caller sets eps, p, lambda.
  'soc': SOC's own recipe (Singla & Feizi 2021; Singla et al. 2022): SGD
  0.1 with momentum 0.9 and weight decay 5e-4, the same decays,
  cross-entropy with the certificate regulariser gamma, and an LLN head
  (SOC's CIFAR head is an orthogonal 1x1 SOC conv, which this library does
  not have; its Tiny-ImageNet runs use LLN).
  Both: crop (padding 4) and flip only, the SOC code's normalisation.
  """
  c.model.name = 'lipconv_tiny' if tiny else f'lipconv{depth}'
  c.model.activation = 'householder'  # SOC's HH1 (`--activation hh1`)
  c.model.input_mean = SOC_INPUT_MEAN
  c.model.input_std = SOC_INPUT_STD
  c.model.num_power_iterations = 1  # SOC: one update per step
  c.data.augment.color_jitter = 0.0
  c.data.augment.max_rotation_degrees = 0.0
  c.train.num_epochs = epochs
  c.train.batch_size = batch_size
  c.optimizer.decay_epochs = (epochs // 2, 3 * epochs // 4)
  c.optimizer.decay_factor = 0.1
  c.optimizer.weight_decay = 5e-4
  if loss == 'cll':
    c.model.head = 'dense'
    c.loss.name = 'cll'
    c.optimizer.name = 'adam'
    c.optimizer.learning_rate = 1e-3
  elif loss == 'soc':
    c.model.head = 'lln'
    c.loss.name = 'soc'
    c.loss.soc_gamma = gamma
    c.loss.lam = 0.0
    c.optimizer.name = 'sgd'
    c.optimizer.momentum = 0.9
    c.optimizer.learning_rate = 0.1
  else:
    raise ValueError(f"loss must be 'cll' or 'soc', got {loss!r}")


CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
# The 1-Lipschitz families' own losses (cll_jax.objectives).
FAMILY_LOSSES = {'cpl': 'multi_margin', 'sll': 'offset_ce',
                 'sandwich': 'offset_ce', 'aol': 'offset_ce'}


def use_constrained(c: ml_collections.ConfigDict, *, family: str, size: str,
                    loss: str, epochs: int, learning_rate: float,
                    input_mean=CIFAR10_MEAN, batch_size: int = 256,
                    tiny: bool = False) -> None:
  """A 1-Lipschitz network of `family` ('cpl', 'sll', 'sandwich', 'aol').

  The recipe of the CPL, SLL and LBDN code bases (CLL table B4 for the CLL
  rows): Adam at `learning_rate` with the triangular schedule, batch 256,
  crop (padding 4) and flip only, the mean subtracted (no std division, so
  the input scale stays 1). `loss`: 'cll' (CLL with an unconstrained dense
  head, K detached, the official code's p convention; the caller sets eps,
  p, lambda) or the family's own ('cpl': CPL's multi-class hinge, margin
  0.7; 'sll', 'sandwich', 'aol': the offset cross-entropy, offset 1.5,
  temperature 0.25), both of those with an LLN head and no K^2 term.
  `tiny`: the family's tiny network, for local runs and tests.
  """
  if family not in FAMILY_LOSSES:
    raise ValueError(f'family must be one of {sorted(FAMILY_LOSSES)}, got '
                     f'{family!r}')
  c.model.name = f'{family}_{"tiny" if tiny else size}'
  # MaxMin acts only after AOL layers; CPL, SLL and Sandwich layers carry
  # their ReLU inside.
  c.model.activation = 'minmax'
  c.model.input_mean = tuple(input_mean)
  c.model.num_power_iterations = 1  # CPL: one update per step
  c.data.augment.color_jitter = 0.0
  c.data.augment.max_rotation_degrees = 0.0
  c.train.num_epochs = epochs
  c.train.batch_size = batch_size
  c.optimizer.name = 'adam'
  c.optimizer.learning_rate = learning_rate
  c.optimizer.schedule = 'triangular'
  c.optimizer.decay_epochs = ()
  if loss == 'cll':
    c.model.head = 'dense'
    c.loss.name = 'cll'
    c.loss.p_convention = 'code'
  elif loss == family or (loss == 'own'):
    c.model.head = 'lln'
    c.loss.name = FAMILY_LOSSES[family]
    c.loss.lam = 0.0
    c.loss.margin = 0.7
    c.loss.offset_ce_offset = 1.5
    c.loss.temperature = 0.25
  else:
    raise ValueError(f"loss must be 'cll' or {family!r}, got {loss!r}")
