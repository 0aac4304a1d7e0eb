r"""Certifies images with a trained run: class, certified radius, CRA.

  python -m experiments.certify --workdir=/tmp/cifar10_4c3f --images=cat.png
  python -m experiments.certify --workdir=/tmp/cifar10_4c3f \
      --images=/data/my_images            # a folder; class subfolders = labels
  python -m experiments.certify --workdir=/tmp/cifar10_4c3f --images=x.npz
  python -m experiments.certify --workdir=/tmp/cifar10_4c3f --images=test

`--images` takes an image file, a folder of images (subfolders named as the
run's classes give labels), an `.npy` batch or an `.npz` with `images` and
optional `labels`, or `test` (the run's own test split). Images are
preprocessed as in training (uint8 -> [0, 1]); other sizes are refused.
Certified radii use the run's evaluation bound (`eval.bound`, by default
sound: guaranteed from the weights). Results are printed and written to
`--output` (default `<workdir>/certify/<name>.csv` and `.json`).
"""

from __future__ import annotations

import csv
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

_WORKDIR = flags.DEFINE_string('workdir', None, 'The training run folder.',
                               required=True)
_IMAGES = flags.DEFINE_string(
    'images', 'test', 'Image file, folder, .npy/.npz batch, or "test".')
_OUTPUT = flags.DEFINE_string(
    'output', None, 'Output path without extension (default: '
    '<workdir>/certify/<name of --images>); .csv and .json are written.')
_BOUND = flags.DEFINE_enum(
    'bound', None, ['sound', 'power'],
    'Certification bound (default: the run\'s eval.bound).')
_SHOW = flags.DEFINE_integer('show', 20, 'Rows to print (0: none).')


def run(workdir: str, images: str, output: str | None = None,
        bound: str | None = None, show: int = 20) -> dict:
  """Certifies `images` with `workdir`'s model; writes CSV and JSON.

  Returns:
    The JSON summary (also written to `<output>.json`).
  """
  from cll_jax import certifier as certifier_lib  # pylint: disable=g-import-not-at-top
  certifier = certifier_lib.Certifier.from_workdir(workdir, bound=bound)
  inputs, labels, names = certifier_lib.load_inputs(images, certifier)
  result = certifier.certify(inputs, labels)
  rows = certifier_lib.result_rows(result, names)
  if output is None:
    stem = os.path.splitext(os.path.basename(os.path.normpath(images)))[0]
    output = os.path.join(workdir, 'certify', stem or 'inputs')
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  with open(output + '.csv', 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  summary = {
      'workdir': workdir, 'images': images, 'count': len(rows),
      'bound': certifier.bound, 'lipschitz_global': certifier.lipschitz,
      'radii': list(result.radii),
      'certified_fraction': {f'{r:.4f}': float(c.mean())
                             for r, c in zip(result.radii, result.certified)},
  }
  if result.cra is not None:
    summary['accuracy'] = result.accuracy
    summary['cra'] = {f'{r:.4f}': v for r, v in result.cra.items()}
  with open(output + '.json', 'w') as f:
    json.dump(summary, f, indent=1)
  for row in rows[:show]:
    label = f'  label {certifier.class_names[row["label"]]}' if (
        'label' in row) else ''
    print(f'{row["input"]}: {row["class_name"]}  radius '
          f'{row["certified_radius"]:.4f}{label}')
  if len(rows) > show > 0:
    print(f'... {len(rows) - show} more in {output}.csv')
  print(json.dumps({k: v for k, v in summary.items() if k != 'workdir'}))
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    run(_WORKDIR.value, _IMAGES.value, _OUTPUT.value, _BOUND.value,
        _SHOW.value)
  except (ValueError, FileNotFoundError) as e:
    sys.exit(f'error: {e}')


if __name__ == '__main__':
  app.run(main)
