"""What a workdir remembers about its run: the config and the data it saw.

A run writes `config.json` (the whole experiment config) and `dataset.json`
(data set name, class names, example shape and dtype) into its workdir before
training. They make a workdir self-describing, so that

* a rerun can tell a resume from a mistake: `check_resume` compares the new
  config with the stored one and refuses changes to what was trained (model,
  data, loss, optimizer, ...) before anything runs, naming every changed
  field, unless the caller allows them deliberately;
* a trained checkpoint can be certified later from the workdir alone
  (`cll_jax.certifier`), with the class names and input domain of training.

Changes that do not alter what has been trained are always allowed (see
`FREE_FIELDS`): more epochs, other evaluation radii or batch sizes, logging
and checkpoint periods. Every change that a resume accepts is appended to
`config_changes.jsonl` with the step it took effect at.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any, Mapping

import ml_collections

CONFIG_FILE = 'config.json'
DATASET_FILE = 'dataset.json'
CHANGES_FILE = 'config_changes.jsonl'

# Fields (dotted paths; a trailing '.' covers a whole section) that a resume
# may change without permission: they select how long to train, what to
# report and how often, never what the trained parameters have seen.
FREE_FIELDS = (
    'eval.',
    'train.num_epochs',
    'train.log_every_steps',
    'train.eval_every_epochs',
    'train.checkpoint_every_epochs',
    'train.checkpoints_to_keep',
    'train.progress_bar',
    'train.on_nonfinite',
    'distributed',
    'data.kwargs.cache_dir',
    'data.kwargs.num_workers',
    'data.kwargs.download',
)


class ConfigChangeError(ValueError):
  """A resume whose config changes what the stored run was trained with."""


def _is_free(field: str) -> bool:
  return any(field == f or (f.endswith('.') and field.startswith(f))
             for f in FREE_FIELDS)


def _plain(value: Any) -> Any:
  """JSON-normal form: tuples become lists, ConfigDicts dicts."""
  return json.loads(json.dumps(value, default=str))


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return _plain(config.to_dict())


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}; lists stay values."""
  flat = {}
  for key, value in tree.items():
    path = f'{prefix}{key}'
    if isinstance(value, Mapping):
      flat.update(flatten(value, path + '.'))
    else:
      flat[path] = value
  return flat


def config_changes(stored: Mapping[str, Any], current: Mapping[str, Any]
                   ) -> dict[str, tuple[Any, Any]]:
  """Changed fields, `{dotted.path: (stored value, current value)}`.

  A field present on one side only counts as changed (its missing value is
  reported as the string '<absent>').
  """
  old, new = flatten(_plain(stored)), flatten(_plain(current))
  changes = {}
  for field in sorted(set(old) | set(new)):
    a, b = old.get(field, '<absent>'), new.get(field, '<absent>')
    if a != b:
      changes[field] = (a, b)
  return changes


def read_json(workdir: str, name: str) -> Any | None:
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json(workdir: str, name: str, value: Any) -> None:
  """Writes `value` as JSON atomically (temp file, then os.replace)."""
  os.makedirs(workdir, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=workdir, prefix=f'.{name}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w') as f:
      json.dump(value, f, indent=1)
    os.replace(tmp, os.path.join(workdir, name))
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config stored in `workdir`.

  Raises:
    FileNotFoundError: the workdir has no `config.json` (not a run folder, or
      written by a version before run records existed).
  """
  stored = read_json(workdir, CONFIG_FILE)
  if stored is None:
    raise FileNotFoundError(
        f'{os.path.join(workdir, CONFIG_FILE)} does not exist: {workdir!r} is '
        'not the workdir of a training run')
  return ml_collections.ConfigDict(stored)


def _describe(changes: Mapping[str, tuple[Any, Any]]) -> str:
  return '; '.join(f'{field}: {a!r} -> {b!r}'
                   for field, (a, b) in changes.items())


def _without_new_defaults(changes: dict[str, tuple[Any, Any]]
                          ) -> dict[str, tuple[Any, Any]]:
  """Drops fields the stored run predates that are at their default now.

  A config field added to the library after a run was trained (absent from
  its `config.json`) changes nothing when it holds the default, which is the
  behaviour the run was trained with.
  """
  from cll_jax import configs  # pylint: disable=g-import-not-at-top
  defaults = flatten(config_to_dict(configs.default_config()))
  return {f: (a, b) for f, (a, b) in changes.items()
          if not (a == '<absent>' and f in defaults and b == defaults[f])}


def check_resume(workdir: str, config: ml_collections.ConfigDict, *,
                 allow_changes: bool = False) -> dict[str, tuple[Any, Any]]:
  """Compares `config` with the config stored in `workdir`.

  Call it only when the workdir holds a checkpoint to resume from.

  Args:
    workdir: the run folder.
    config: the config of the new invocation.
    allow_changes: accept changes outside `FREE_FIELDS` (a deliberate change
      of schedule, loss weights, ...); they are still reported.

  Returns:
    Every changed field (free or allowed), `{field: (stored, current)}`; empty
    for an unchanged config or a workdir without `config.json`. A field the
    stored config lacks (added to the library later) counts only when it
    differs from its default.

  Raises:
    ConfigChangeError: a field outside `FREE_FIELDS` changed and
      `allow_changes` is False. The message names every such field with both
      values.
  """
  stored = read_json(workdir, CONFIG_FILE)
  if stored is None:
    return {}
  changes = _without_new_defaults(config_changes(stored,
                                                 config_to_dict(config)))
  guarded = {f: v for f, v in changes.items() if not _is_free(f)}
  if guarded and not allow_changes:
    raise ConfigChangeError(
        f'{workdir!r} holds a run trained with another config; changed: '
        f'{_describe(guarded)}. Use a new --workdir for a new run, or pass '
        '--allow_config_changes to continue this run with the new values.')
  return changes


def check_dataset(workdir: str, info: Mapping[str, Any]) -> None:
  """Refuses to resume on data whose classes or example shape differ."""
  stored = read_json(workdir, DATASET_FILE)
  if stored is None:
    return
  changes = config_changes(
      {k: stored.get(k) for k in ('class_names', 'image_shape')},
      {k: info.get(k) for k in ('class_names', 'image_shape')})
  if changes:
    raise ConfigChangeError(
        f'{workdir!r} was trained on other data: {_describe(changes)}')


def record_run(workdir: str, config: ml_collections.ConfigDict,
               dataset_info: Mapping[str, Any],
               changes: Mapping[str, tuple[Any, Any]], step: int) -> None:
  """Stores the config and data description; logs accepted changes."""
  write_json(workdir, CONFIG_FILE, config_to_dict(config))
  write_json(workdir, DATASET_FILE, _plain(dict(dataset_info)))
  if changes:
    with open(os.path.join(workdir, CHANGES_FILE), 'a') as f:
      f.write(json.dumps({
          'step': int(step), 'time': time.strftime('%Y-%m-%dT%H:%M:%S'),
          'changes': {k: list(v) for k, v in changes.items()}}) + '\n')
