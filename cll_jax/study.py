"""Named studies: sets of training runs, gathered into figures and tables.

A study (e.g. the CLL paper's analysis sweeps, sec. 4.3 and supplement D; the
definitions live in `experiments/studies/`) is a list of members. A member is
one `train.train_and_evaluate` run of a base experiment config with a few
fields overridden, in its own folder:

  <workdir>/<member>/   config.json, metrics.jsonl, final_metrics.json,
                        checkpoints/, tightness.json

so a killed study resumes where it stopped (each member resumes from its
checkpoint), a finished member is skipped, and members can run in parallel
on many machines (`members=...` selects some), with one `collect_only` pass
gathering them afterwards.

A member's config is built in this order (later steps win):

  1. `get_config(options.config_arg)` of the base experiment config of the
     member's role (`Study.bases`, or `options.bases`);
  2. the member's own overrides (the swept values);
  3. `options.tiny`: smoke-test sizes (`TINY_OVERRIDES`, 1 epoch);
  4. `options.epochs`: the schedule shortened (`configs.shorten_schedule`);
  5. the study's `adjust` hook (e.g. evaluation every epoch);
  6. `options.overrides`, the caller's `field=value` settings.

Each finished member is then measured: clean accuracy, CRA at every
evaluation radius, K^(f), K^(h o f) (from `final_metrics.json`), the
evaluation history (`metrics.jsonl`) and its tightness K_lobo / K^(f)
(`cll_jax.tightness`, budget `options.tightness_pairs` x
`options.tightness_steps`, cached in the member's `tightness.json`). The
study's `report` turns these records into figures, a markdown table and a
summary; `run_study` writes them with a JSON of every number, the commit and
the schedule used.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import importlib.util
import os
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import jax
import ml_collections

from cll_jax import configs
from cll_jax import metrics_log
from cll_jax import run_records
from cll_jax import tightness as tightness_lib
from cll_jax import train
from cll_jax.config_validation import validate_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIGHTNESS_FILE = 'tightness.json'

# Step 3 of a member's config: a smoke run of seconds per member (data as
# configured; point `data.*` at a small folder to avoid decoding a big set).
TINY_OVERRIDES = {
    'model.name': 'tiny_cnn',
    'data.num_train_examples': 256,
    'data.num_test_examples': 96,
    'data.augment.enabled': False,
    'train.batch_size': 32,
    'eval.batch_size': 48,
    'train.progress_bar': False,
    'train.log_every_steps': 4,
    # No decays: with a constant rate the compiled step is the same for any
    # number of epochs (shared through JAX's compilation cache).
    'optimizer.decay_epochs': (),
}
TINY_EPOCHS = 1
TINY_TIGHTNESS = (4, 2)  # At most (pairs, steps) in tiny mode.


@dataclasses.dataclass(frozen=True)
class Member:
  """One run of a study.

  Attributes:
    name: its folder name, unique in the study (e.g. 'p_code0.4').
    role: the key of its base config in `Study.bases` (e.g. 'cll').
    overrides: `{dotted.config.field: value}`, the swept values.
    params: what the study reports about it (e.g. `{'p_code': 0.4}`).
  """
  name: str
  role: str
  overrides: Mapping[str, Any]
  params: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class Report:
  """What a study's `report` returns: markdown, summary numbers, figures."""
  markdown: str
  summary: Mapping[str, Any]
  figures: Sequence[str]


@dataclasses.dataclass(frozen=True)
class Study:
  """A named set of members and the report drawn from them.

  Attributes:
    name: the study's name (`--study=NAME`).
    title: one line: what it shows, with the paper reference.
    bases: `{role: experiment config file}` (relative to the repository or
      absolute), e.g. `{'cll': 'experiments/cifar10_4c3f.py'}`.
    members: the runs, in the order of the report.
    report: `report(results, output_dir) -> Report`; `results['members']`
      holds the finished members' records (`member_record`); it writes its
      figures into `output_dir` and returns their file names.
    adjust: optional `adjust(config)` applied after the schedule is set
      (step 5 of the module docstring).
  """
  name: str
  title: str
  bases: Mapping[str, str]
  members: tuple[Member, ...]
  report: Callable[[dict[str, Any], str], Report]
  adjust: Callable[[ml_collections.ConfigDict], None] | None = None

  def member(self, name: str) -> Member:
    for m in self.members:
      if m.name == name:
        return m
    raise ValueError(f'study {self.name!r} has no member {name!r}; members: '
                     f'{[m.name for m in self.members]}')


@dataclasses.dataclass(frozen=True)
class StudyOptions:
  """How a study's members are configured and measured (recorded).

  Attributes:
    epochs: training epochs of every member, the schedule scaled to it
      (None: the base configs' own, the paper's).
    tiny: smoke-test sizes (`TINY_OVERRIDES`, `TINY_EPOCHS` unless `epochs`).
    config_arg: the argument of every base config's `get_config` (e.g.
      'data=offline').
    overrides: `((dotted.field, value), ...)` applied to every member last.
    bases: `{role: config file}` replacing the study's own bases.
    tightness_pairs: training pairs of the tightness estimate (0: none).
    tightness_steps: its Adam steps.
    tightness_seed: draws its pairs.
  """
  epochs: int | None = None
  tiny: bool = False
  config_arg: str = ''
  overrides: tuple[tuple[str, Any], ...] = ()
  bases: Mapping[str, str] = dataclasses.field(default_factory=dict)
  tightness_pairs: int = tightness_lib.PAPER_PAIRS
  tightness_steps: int = tightness_lib.PAPER_STEPS
  tightness_seed: int = 0

  def tightness_budget(self) -> tuple[int, int]:
    if self.tiny:
      return (min(self.tightness_pairs, TINY_TIGHTNESS[0]),
              min(self.tightness_steps, TINY_TIGHTNESS[1]))
    return self.tightness_pairs, self.tightness_steps


# --------------------------------------------------------------------------
# Configs


def parse_override(text: str) -> tuple[str, Any]:
  """'train.batch_size=64' -> ('train.batch_size', 64).

  The value is a Python literal (numbers, tuples, None, True) or else the
  string itself.

  Raises:
    ValueError: no '=' or an empty field name.
  """
  field, sep, value = text.partition('=')
  field = field.strip()
  if not sep or not field:
    raise ValueError(f'an override must read field=value, got {text!r}')
  try:
    parsed = ast.literal_eval(value.strip())
  except (ValueError, SyntaxError):
    parsed = value.strip()
  return field, parsed


def parse_bases(study: Study, entries: Sequence[str]) -> dict[str, str]:
  """`--base` entries -> {role: path}; a bare path needs a one-role study."""
  bases = {}
  for entry in entries:
    role, sep, path = entry.partition('=')
    if not sep:
      if len(study.bases) != 1:
        raise ValueError(
            f'--base={entry}: study {study.name!r} has roles '
            f'{sorted(study.bases)}; write ROLE=PATH')
      role, path = next(iter(study.bases)), entry
    if role not in study.bases:
      raise ValueError(f'--base={entry}: unknown role {role!r}; roles of '
                       f'{study.name!r}: {sorted(study.bases)}')
    bases[role] = path
  return bases


def apply_overrides(config: ml_collections.ConfigDict,
                    overrides: Mapping[str, Any] | Sequence[tuple[str, Any]]
                    ) -> None:
  """Sets dotted fields of `config` in place.

  Fields must exist, except keys under `data.kwargs` (the loader's keyword
  arguments, free-form); a dict value replaces a whole section (e.g.
  `data.kwargs`). Values keep the field's type (ml_collections' checks).

  Raises:
    ValueError: an unknown field or a value of the wrong type, naming it.
  """
  items = overrides.items() if isinstance(overrides, Mapping) else overrides
  for field, value in items:
    *path, key = field.split('.')
    node = config
    for i, part in enumerate(path):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ValueError(f'unknown config field {".".join(path[:i + 1])!r} '
                         f'(in override {field}={value!r})')
      node = node[part]
    free = field.startswith('data.kwargs.')
    if not isinstance(node, ml_collections.ConfigDict) or (
        key not in node and not free):
      raise ValueError(f'unknown config field {field!r} (in override '
                       f'{field}={value!r})')
    if isinstance(value, Mapping):
      value = ml_collections.ConfigDict(dict(value))
    try:
      node[key] = value
    except TypeError as e:
      raise ValueError(f'config field {field!r} cannot take {value!r}: {e}'
                       ) from e


def _config_path(path: str) -> str:
  for candidate in (path, os.path.join(REPO, path)):
    if os.path.exists(candidate):
      return os.path.abspath(candidate)
  raise ValueError(f'base config file {path!r} not found (looked in the '
                   f'current folder and in {REPO})')


def load_base_config(path: str, arg: str = '') -> ml_collections.ConfigDict:
  """`get_config(arg)` of the experiment config file `path`."""
  path = _config_path(path)
  name = '_study_base_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg or None)


def member_config(study: Study, member: Member,
                  options: StudyOptions) -> ml_collections.ConfigDict:
  """The member's full config (steps 1-6 of the module docstring)."""
  bases = {**study.bases, **options.bases}
  if member.role not in bases:
    raise ValueError(f'member {member.name!r} has role {member.role!r}, '
                     f'which has no base config; bases: {sorted(bases)}')
  config = load_base_config(bases[member.role], options.config_arg)
  apply_overrides(config, member.overrides)
  if options.tiny:
    apply_overrides(config, TINY_OVERRIDES)
  epochs = options.epochs or (TINY_EPOCHS if options.tiny else None)
  if epochs is not None:
    configs.shorten_schedule(config, epochs)
  if study.adjust is not None:
    study.adjust(config)
  apply_overrides(config, options.overrides)
  return config


def schedule_of(config: Mapping[str, Any]) -> dict[str, Any]:
  """The training schedule of a stored config (`config.json`)."""
  flat = run_records.flatten(config)
  keys = ('model.name', 'data.name', 'data.num_train_examples',
          'data.num_test_examples', 'data.augment.enabled', 'train.num_epochs',
          'train.batch_size', 'optimizer.learning_rate',
          'optimizer.decay_epochs', 'eval.bound', 'train.eval_every_epochs')
  return {k: flat.get(k) for k in keys}


# --------------------------------------------------------------------------
# Members: run, measure, collect


def _finished_unchanged(member_dir: str, config) -> bool:
  stored = run_records.read_json(member_dir, run_records.CONFIG_FILE)
  done = run_records.read_json(member_dir, train.FINAL_METRICS_FILE)
  return (stored is not None and done is not None and not
          run_records.config_changes(stored,
                                     run_records.config_to_dict(config)))


def _last_step(member_dir: str) -> int | None:
  records = metrics_log.read_records(member_dir)
  return int(records[-1]['step']) if records else None


def ensure_tightness(member_dir: str, pairs: int, steps: int, seed: int,
                     log: Callable[[str], None] = print) -> dict | None:
  """The member's tightness record, measured unless cached for this budget.

  Returns None for a member that has not finished.
  """
  final = run_records.read_json(member_dir, train.FINAL_METRICS_FILE)
  if final is None:
    return None
  cached = run_records.read_json(member_dir, TIGHTNESS_FILE)
  step = _last_step(member_dir)
  if cached is not None and (
      cached.get('tightness_pairs'), cached.get('tightness_steps'),
      cached.get('tightness_seed'), cached.get('step')) == (
          pairs, steps, seed, step):
    return cached
  config = run_records.load_config(member_dir)
  log(f'  tightness of {os.path.basename(member_dir)}: {pairs} pairs x '
      f'{steps} Adam steps')
  row = tightness_lib.measure_tightness(
      config, member_dir, final['lipschitz_f'], pairs=pairs, steps=steps,
      seed=seed)
  if jax.process_index() == 0:
    run_records.write_json(member_dir, TIGHTNESS_FILE, row)
  return row


def _radius_key(radius: float) -> str:
  return f'{radius:.4f}'


def _cra_of(record: Mapping[str, Any]) -> dict[str, float]:
  prefix = 'test_cra_'
  return {k[len(prefix):]: float(v) for k, v in record.items()
          if k.startswith(prefix)}


def member_record(member: Member, member_dir: str) -> dict[str, Any] | None:
  """The numbers of a finished member, None if it has not finished.

  Keys: name, role, params, loss, epsilon (eps_train), epsilon_schedule
  ([kind, epochs]), num_classes (None where the run recorded no data set),
  clean_accuracy,
  cra (`{'%.4f' % radius: CRA}`, eps_train included), cra_train_eps,
  lipschitz_f (max_ij K_ij), lipschitz_hf (K^(h o f)), lipschitz_global,
  train_seconds, schedule, tightness (None or `cll_jax.tightness`'s record
  plus tightness_percent) and history (per epoch: train accuracy and CRA at
  eps_train, and the test metrics where evaluated).
  """
  final = run_records.read_json(member_dir, train.FINAL_METRICS_FILE)
  if final is None:
    return None
  config = run_records.read_json(member_dir, run_records.CONFIG_FILE)
  epsilon = float(config['loss']['epsilon'])
  cra = _cra_of(final)
  history = []
  for r in metrics_log.read_records(member_dir):
    entry = {'epoch': r.get('epoch'), 'step': r.get('step'),
             'train_accuracy': r.get('train_accuracy'),
             'train_cra_train_eps': r.get('train_certified_accuracy_train_eps'),
             'epoch_seconds': r.get('epoch_seconds')}
    if 'test_accuracy' in r:
      entry.update(test_accuracy=r['test_accuracy'], test_cra=_cra_of(r),
                   lipschitz_f=r.get('lipschitz_f'),
                   lipschitz_hf=r.get('lipschitz_hf'))
    history.append(entry)
  dataset = run_records.read_json(member_dir, run_records.DATASET_FILE) or {}
  tight = run_records.read_json(member_dir, TIGHTNESS_FILE)
  if tight is not None:
    tight = dict(tight, tightness=tight['lipschitz_lower']
                 / final['lipschitz_f'])
    tight['tightness_percent'] = 100.0 * tight['tightness']
  return {
      'name': member.name, 'role': member.role, 'params': dict(member.params),
      'loss': config['loss']['name'], 'epsilon': epsilon,
      'epsilon_schedule': [config['loss']['epsilon_schedule'],
                           config['loss']['epsilon_schedule_epochs']],
      'num_classes': dataset.get('num_classes'),
      'clean_accuracy': float(final['test_accuracy']),
      'cra': cra, 'cra_train_eps': cra.get(_radius_key(epsilon)),
      'lipschitz_f': float(final['lipschitz_f']),
      'lipschitz_hf': float(final['lipschitz_hf']),
      'lipschitz_global': float(final['lipschitz_global']),
      'certification_bound': final.get('certification_bound'),
      'train_seconds': sum(h['epoch_seconds'] or 0.0 for h in history),
      'schedule': schedule_of(config),
      'tightness': tight,
      'history': history,
  }


def cra_at(record: Mapping[str, Any], radius: float) -> float | None:
  """A record's CRA at `radius` (None where it was not evaluated)."""
  return record['cra'].get(_radius_key(radius))


def tightness_percent(record: Mapping[str, Any]) -> float | None:
  tight = record.get('tightness')
  return None if tight is None else tight['tightness_percent']


# --------------------------------------------------------------------------
# Provenance and output


def git_commit() -> tuple[str | None, bool | None]:
  """(HEAD commit of the repository, whether tracked files differ)."""
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=REPO,
                            capture_output=True, text=True, check=True,
                            timeout=30).stdout.strip()
    status = subprocess.run(
        ['git', 'status', '--porcelain', '--untracked-files=no'], cwd=REPO,
        capture_output=True, text=True, check=True, timeout=30).stdout
  except (OSError, subprocess.SubprocessError):
    return None, None
  return commit, bool(status.strip())


def _fmt_schedule(s: Mapping[str, Any]) -> str:
  train_n = s['data.num_train_examples'] or 'all'
  test_n = s['data.num_test_examples'] or 'all'
  decays = tuple(s['optimizer.decay_epochs'] or ())
  return (f"{s['model.name']} on {s['data.name']}, {train_n} training / "
          f"{test_n} test examples, {s['train.num_epochs']} epochs of batch "
          f"{s['train.batch_size']}, Adam {s['optimizer.learning_rate']:g}"
          + (f' x0.1 at epochs {decays}' if decays else ', no decay')
          + f", augmentation {'on' if s['data.augment.enabled'] else 'off'}, "
          f"{s['eval.bound']} certification bounds")


def _common_schedule(records) -> dict[str, Any] | None:
  schedules = [r['schedule'] for r in records]
  if schedules and all(s == schedules[0] for s in schedules):
    return schedules[0]
  return None


def header_markdown(results: Mapping[str, Any]) -> str:
  """The provenance lines of a study's markdown file."""
  lines = [f"# Study `{results['study']}`: {results['title']}", '']
  commit = results['commit'] or 'unknown'
  if results['dirty']:
    commit += ' (with uncommitted changes)'
  lines.append(f'* commit: {commit}; written {results["created"]}')
  if results.get('command'):
    lines.append(f"* command: `{results['command']}`")
  schedule = results['schedule']
  if schedule is not None:
    lines.append(f'* schedule (every member): {_fmt_schedule(schedule)}')
  else:
    lines.append('* schedule: differs between members (see the JSON)')
  pairs, steps = results['tightness_budget']
  lines.append(f'* tightness: K_lobo over {pairs} training pairs x {steps} '
               f'Adam steps (paper: {tightness_lib.PAPER_PAIRS} x '
               f'{tightness_lib.PAPER_STEPS}); K_lobo / K^(f) in percent')
  n, total = len(results['members']), len(results['member_names'])
  missing = results['missing']
  lines.append(f'* finished members: {n} of {total}'
               + (f"; not finished: {', '.join(missing)}" if missing else ''))
  if results.get('failed'):
    lines.append('* failed: ' + '; '.join(
        f'{k}: {v}' for k, v in results['failed'].items()))
  return '\n'.join(lines)


def _jsonable(value):
  """Nested dicts/lists/tuples with numpy values -> plain Python."""
  if isinstance(value, Mapping):
    return {str(k): _jsonable(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_jsonable(v) for v in value]
  return metrics_log.to_python(value)


def write_outputs(study: Study, results: dict[str, Any],
                  output_dir: str) -> dict[str, Any]:
  """Draws the report and writes `<name>.json` and `<name>.md`."""
  os.makedirs(output_dir, exist_ok=True)
  body, summary, figures = 'No member has finished yet.', {}, []
  if results['members']:
    report = study.report(results, output_dir)
    body, summary, figures = report.markdown, dict(report.summary), list(
        report.figures)
  results = dict(results, summary=summary, figures=figures)
  text = header_markdown(results) + '\n\n' + body + '\n'
  for figure in figures:
    text += f'\n![{figure}]({figure})\n'
  if jax.process_index() == 0:
    run_records.write_json(output_dir, f'{study.name}.json',
                           _jsonable(results))
    path = os.path.join(output_dir, f'{study.name}.md')
    with open(path + '.tmp', 'w') as f:
      f.write(text)
    os.replace(path + '.tmp', path)
  return results


def run_study(study: Study, workdir: str, options: StudyOptions, *,
              members: Sequence[str] | None = None,
              collect_only: bool = False, output_dir: str | None = None,
              command: str | None = None, devices=None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
  """Trains the selected members, then gathers every finished one.

  Args:
    study: the study.
    workdir: its folder; member m trains in `<workdir>/<m.name>`.
    options: configuration and measurement options (recorded).
    members: names of the members to train (default: all).
    collect_only: train nothing; gather the finished members (and measure
      the tightness of those that lack it at this budget).
    output_dir: where the figures, `<name>.md` and `<name>.json` go
      (default: `workdir`).
    command: the command line, for the record.
    devices: the devices of every member's run (default: all).
    log: status lines.

  Returns:
    The results written to `<name>.json`: provenance, options, schedule,
    the finished members' records (`member_record`), the missing and failed
    ones, the report's summary and figure names.

  Raises:
    ValueError: an unknown member name, or an invalid member config.
    run_records.ConfigChangeError: a member folder holds a run of another
      config (use another workdir).
  """
  start = time.time()
  selected = [study.member(n) for n in members] if members else list(
      study.members)
  pairs, steps = options.tightness_budget()
  failed: dict[str, str] = {}
  trained: list[str] = []  # by this call; finished members are kept
  if not collect_only:
    # Every config is built and checked before anything trains.
    member_configs = {m.name: member_config(study, m, options)
                      for m in selected}
    for config in member_configs.values():
      validate_config(config)
    for i, m in enumerate(selected, 1):
      member_dir = os.path.join(workdir, m.name)
      config = member_configs[m.name]
      if _finished_unchanged(member_dir, config):
        log(f'[{study.name}] {i}/{len(selected)} {m.name}: finished, kept')
      else:
        log(f'[{study.name}] {i}/{len(selected)} {m.name}: training in '
            f'{member_dir}')
        trained.append(m.name)
        try:
          train.train_and_evaluate(config, member_dir, devices=devices)
        except train.NonFiniteError as e:
          failed[m.name] = str(e)
          log(f'[{study.name}] {m.name} failed: {e}')
          continue
      if pairs > 0:
        ensure_tightness(member_dir, pairs, steps, options.tightness_seed, log)
  elif pairs > 0:
    for m in study.members:
      ensure_tightness(os.path.join(workdir, m.name), pairs, steps,
                       options.tightness_seed, log)
  records, missing = [], []
  for m in study.members:
    record = member_record(m, os.path.join(workdir, m.name))
    if record is None:
      missing.append(m.name)
    else:
      records.append(record)
  commit, dirty = git_commit()
  results = {
      'study': study.name, 'title': study.title,
      'created': datetime.datetime.now(datetime.timezone.utc).strftime(
          '%Y-%m-%d %H:%M UTC'),
      'commit': commit, 'dirty': dirty, 'command': command,
      'options': {**dataclasses.asdict(options),
                  'overrides': [list(o) for o in options.overrides],
                  'bases': {**study.bases, **options.bases}},
      'tightness_budget': [pairs, steps],
      'schedule': _common_schedule(records),
      'member_names': [m.name for m in study.members],
      'members': records, 'missing': missing, 'failed': failed,
      # Members trained (or failed) in this call, and its wall time; each
      # member's own training time is its record's train_seconds.
      'trained_now': trained,
      'wall_seconds': time.time() - start,
      'jax': f'{jax.__version__}, {jax.default_backend()} x '
             f'{jax.device_count()}',
      'python': sys.version.split()[0],
  }
  log(f'[{study.name}] {len(records)} of {len(study.members)} members '
      f'finished; writing {output_dir or workdir}')
  return write_outputs(study, results, output_dir or workdir)
