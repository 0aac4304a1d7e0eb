"""cll_jax beside the PyTorch eager reference, measured alternately.

Two comparisons, each timed A B A B ... in this process
(`benchmarks.time_alternating`), so both sides see the same load:

  * `step`: one 4C3F CLL training step at batch 128, the jitted
    `train.train_step` (state donated, as `train_and_evaluate` runs it)
    against `torch_reference.Reference.step` on the same weights and batch,
    without and with the paper's augmentations (each side augments on its
    own: `cll_jax.data.augment` in the step, `torch_reference.augment` on the
    batch);
  * `epoch`: `train.train_and_evaluate` on the offline CIFAR-10 copy (two
    epochs; the second, warm one is timed from `metrics.jsonl`:
    `epoch_seconds` for the steps, `eval_seconds` for the power-iteration
    convergence and the certified evaluation of the 10,000 test images)
    against `torch_reference.epoch` on the same images. Both train on
    `steps` batches of 128 (a full epoch is 390) and the epoch is
    extrapolated as train_s * 390 / steps + eval_s; the rounds alternate.

Without torch the PyTorch rows are skipped with `torch_reference.SKIP_MESSAGE`
(the JAX side is still measured).

Run: `python -m benchmarks.side_by_side [--tiny] [--repeats N]
[--epoch-steps S] [--skip-epoch]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile

import jax
import numpy as np

from benchmarks import fake_batch, load_average, time_alternating, time_calls
from benchmarks import torch_reference
from benchmarks import train_step
from cll_jax import train
from experiments import cifar10_4c3f

# Targets of issue 16 (benchmarks, not tests): JAX / PyTorch wall time.
STEP_TARGET = 0.8
EPOCH_TARGET = 0.7
FULL_EPOCH_STEPS = 390


def _reference(model, state, config, input_shape):
  return torch_reference.Reference.from_jax(
      model, jax.device_get(state.variables), input_shape,
      epsilon=config.loss.epsilon, p=config.loss.p_start, lam=config.loss.lam,
      learning_rate=config.optimizer.learning_rate)


def step_rows(tiny: bool = False, repeats: int = 10, seed: int = 0,
              verbose: bool = True) -> list[dict]:
  """The training step, JAX vs PyTorch, without and with augmentation."""
  input_shape = (8, 8, 3) if tiny else (32, 32, 3)
  rows = []
  for augment in (False, True):
    config = train_step.make_config(tiny, augment, 5)
    model = train.create_model(config, 10)
    state = train.create_train_state(config, model, jax.random.PRNGKey(seed),
                                     input_shape, FULL_EPOCH_STEPS)
    batch = fake_batch(jax.random.PRNGKey(seed + 1),
                       config.train.batch_size, input_shape, 10)
    step = train_step.train_step_fn(config)
    holder = {'state': state}

    def jax_call(step=step, batch=batch, holder=holder):
      holder['state'], metrics = step(holder['state'], batch)
      return metrics

    row = dict(benchmark='side_by_side', what='step', model=config.model.name,
               batch=config.train.batch_size, augment=augment,
               load=load_average())
    if not torch_reference.AVAILABLE:
      row.update(jax=time_calls(jax_call, repeats, warmup=2),
                 pytorch=None, skipped=torch_reference.SKIP_MESSAGE)
      rows.append(row)
      continue
    import torch  # pylint: disable=g-import-not-at-top
    reference = _reference(model, state, config, input_shape)
    images = np.asarray(batch['image'])
    labels = torch.from_numpy(np.array(batch['label'])).long()
    generator = torch.Generator().manual_seed(seed)
    aug = config.data.augment

    def torch_call(reference=reference, augment=augment):
      x = torch_reference.to_nchw_float(images)
      if augment:
        x = torch_reference.augment(
            x, generator, aug.crop_padding, aug.flip, aug.color_jitter,
            aug.max_rotation_degrees)
      return reference.step(x, labels)['loss']

    timing = time_alternating((('jax', jax_call), ('pytorch', torch_call)),
                              repeats)
    row.update(jax=timing['jax'], pytorch=timing['pytorch'],
               ratio=timing['ratio'])
    rows.append(row)
    if verbose:
      print(f"step augment={augment}: jax {timing['jax']['median_ms']:.1f} ms"
            f", pytorch {timing['pytorch']['median_ms']:.1f} ms, ratio "
            f"{_ratio_text(timing['ratio'])}", flush=True)
  return rows


def _epoch_config(tiny: bool, steps: int):
  config = cifar10_4c3f.get_config('data=offline')
  if tiny:
    config.model.name = 'tiny_cnn'
    config.train.batch_size = 16
    config.data.num_test_examples = 500
  config.data.num_train_examples = steps * config.train.batch_size
  config.train.num_epochs = 2
  config.train.eval_every_epochs = 1
  config.train.converge_every_epochs = 1
  config.train.checkpoint_every_epochs = 2
  config.train.log_every_steps = 10**6
  config.train.progress_bar = False
  return config


def _matched_eval_config(config):
  """`config` evaluated as the reference does: power-iteration K, float32."""
  matched = config.copy_and_resolve_references()
  matched.eval.bound = 'power'
  matched.eval.precision = 'float32'
  return matched


def _jax_epoch(config) -> dict:
  """One `train_and_evaluate` call; the second epoch's seconds."""
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      records = [json.loads(line) for line in f if line.strip()]
  last = [r for r in records if r.get('epoch') == config.train.num_epochs][-1]
  return {'train_s': last['epoch_seconds'], 'eval_s': last['eval_seconds'],
          'test_accuracy': last['test_accuracy']}


def _torch_epoch(config, dataset, model, seed: int) -> dict:
  state = train.create_train_state(
      config, model, jax.random.PRNGKey(config.seed),
      tuple(dataset.train_images.shape[1:]), FULL_EPOCH_STEPS)
  reference = _reference(model, state, config,
                         tuple(dataset.train_images.shape[1:]))
  steps = config.data.num_train_examples // config.train.batch_size
  radii = tuple(config.eval.radii) + (config.loss.epsilon,)
  kwargs = dict(batch_size=config.train.batch_size, radii=radii,
                num_steps=steps, augment_config=config.data.augment.to_dict(),
                converge_tol=config.train.converge_tol,
                converge_max_iterations=config.train.converge_max_iterations,
                eval_batch_size=config.eval.batch_size)
  # Two epochs as on the JAX side; the second is timed.
  for epoch in range(2):
    result = torch_reference.epoch(
        reference, dataset.train_images, dataset.train_labels,
        dataset.test_images, dataset.test_labels, seed=seed + epoch, **kwargs)
  return result


def _extrapolate(result: dict, steps: int) -> float:
  return result['train_s'] * FULL_EPOCH_STEPS / steps + result['eval_s']


def epoch_rows(tiny: bool = False, steps: int = 40, rounds: int = 2,
               verbose: bool = True) -> list[dict]:
  """One epoch of training + certified evaluation, JAX vs PyTorch."""
  if tiny:
    steps, rounds = min(steps, 2), 1
  config = _epoch_config(tiny, steps)
  row = dict(benchmark='side_by_side', what='epoch', model=config.model.name,
             batch=config.train.batch_size, steps=steps,
             full_steps=FULL_EPOCH_STEPS, load=load_average())
  jax_runs, torch_runs = [], []
  dataset = model = None
  if not os.path.exists(config.data.kwargs.root):
    row.update(jax=None, pytorch=None,
               skipped=f'offline CIFAR-10 not found at '
               f'{config.data.kwargs.root}')
    return [row]
  if torch_reference.AVAILABLE:
    # The same images as `train_and_evaluate` (the same subset).
    dataset = train.load_dataset(config)
    model = train.create_model(config, dataset.num_classes)
  # The reference certifies with power-iteration K in plain float32; the
  # default JAX run with sound bounds in float64. The matched run does the
  # reference's work, so the cost of the guarantee is measured, not guessed.
  matched = _matched_eval_config(config)
  matched_runs = []
  for r in range(rounds):
    jax_runs.append(_jax_epoch(config))
    matched_runs.append(_jax_epoch(matched))
    if verbose:
      print(f"epoch round {r}: jax train {jax_runs[-1]['train_s']:.1f} s, "
            f"eval {jax_runs[-1]['eval_s']:.1f} s (eval with power-iteration "
            f"K in float32: {matched_runs[-1]['eval_s']:.1f} s)", flush=True)
    if dataset is not None:
      torch_runs.append(_torch_epoch(config, dataset, model, seed=r))
      if verbose:
        print(f"epoch round {r}: pytorch train "
              f"{torch_runs[-1]['train_s']:.1f} s, eval "
              f"{torch_runs[-1]['eval_s']:.1f} s", flush=True)
  row['jax'] = _epoch_summary(jax_runs, steps)
  row['jax_matched_eval'] = _epoch_summary(matched_runs, steps)
  if not torch_runs:
    row.update(pytorch=None, skipped=torch_reference.SKIP_MESSAGE)
    return [row]
  row['pytorch'] = _epoch_summary(torch_runs, steps)
  ratios = [_extrapolate(a, steps) / _extrapolate(b, steps)
            for a, b in zip(jax_runs, torch_runs)]
  row['ratio'] = {'min': min(ratios), 'median': statistics.median(ratios),
                  'max': max(ratios)}
  row['train_ratio'] = statistics.median(
      a['train_s'] / b['train_s'] for a, b in zip(jax_runs, torch_runs))
  row['eval_ratio'] = statistics.median(
      a['eval_s'] / b['eval_s'] for a, b in zip(jax_runs, torch_runs))
  row['matched_eval_ratio'] = statistics.median(
      a['eval_s'] / b['eval_s'] for a, b in zip(matched_runs, torch_runs))
  row['matched_epoch_ratio'] = statistics.median(
      _extrapolate(a, steps) / _extrapolate(b, steps)
      for a, b in zip(matched_runs, torch_runs))
  row['load_end'] = load_average()
  return [row]


def _epoch_summary(runs: list[dict], steps: int) -> dict:
  return {'train_s': statistics.median(r['train_s'] for r in runs),
          'eval_s': statistics.median(r['eval_s'] for r in runs),
          'epoch_s': statistics.median(_extrapolate(r, steps) for r in runs),
          'test_accuracy': runs[-1]['test_accuracy'], 'rounds': len(runs)}


def _ratio_text(ratio: dict) -> str:
  return (f"{ratio['median']:.2f} (min {ratio['min']:.2f}, max "
          f"{ratio['max']:.2f})")


def run(tiny: bool = False, repeats: int = 10, epoch_steps: int = 40,
        epoch_rounds: int = 2, verbose: bool = True) -> list[dict]:
  if not torch_reference.AVAILABLE and verbose:
    print(torch_reference.SKIP_MESSAGE, flush=True)
  return (step_rows(tiny, repeats, verbose=verbose)
          + epoch_rows(tiny, epoch_steps, epoch_rounds, verbose=verbose))


def format_markdown(rows: list[dict]) -> str:
  """Section 1c of RESULTS.md."""
  out = ['## 1c. Side by side with the PyTorch eager reference '
         '(`benchmarks.side_by_side`)', '',
         '`benchmarks/torch_reference.py`: the same CLL step in PyTorch eager '
         '(MinMax, 5 warm-started power iterations per layer with exact '
         'adjoints, pairwise head bound, calibrated softmax CE, lambda K^2, '
         'Adam), checked against `train.train_step` on the same weights and '
         'batch (`tests/test_torch_reference.py`). The two are timed '
         'alternately (A B A B ...) in one process; `ratio` is JAX / '
         'PyTorch per round, median (min, max). torch runs with '
         '`OMP_WAIT_POLICY=PASSIVE` (spinning OpenMP threads made it 7x '
         'slower on the shared cores).', '']
  skipped = [r for r in rows if r.get('pytorch') is None]
  if skipped:
    out += [f"* {skipped[0]['skipped']}.", '']
  steps = [r for r in rows if r['what'] == 'step']
  if steps:
    out += ['| step | batch | JAX ms | PyTorch ms | ratio | target | '
            'load |', '|---|---|---|---|---|---|---|']
    for r in steps:
      name = f"{r['model']} CLL" + (' + augmentation' if r['augment'] else '')
      if r.get('pytorch') is None:
        out.append(f"| {name} | {r['batch']} | "
                   f"{r['jax']['median_ms']:.1f} | skipped | - | - | "
                   f"{r['load']} |")
        continue
      met = r['ratio']['median'] <= STEP_TARGET
      out.append(f"| {name} | {r['batch']} | {r['jax']['median_ms']:.1f} | "
                 f"{r['pytorch']['median_ms']:.1f} | "
                 f"{_ratio_text(r['ratio'])} | <= {STEP_TARGET} "
                 f"{'**met**' if met else '**missed**'} | {r['load']} |")
    out.append('')
  for r in (r for r in rows if r['what'] == 'epoch'):
    j = r['jax']
    if j is None:
      out += [f"* Epoch: skipped, {r['skipped']}.", '']
      continue
    text = (f"Epoch ({r['model']}, offline CIFAR-10, batch {r['batch']}, "
            f"augmentation, then power-iteration convergence and certified "
            f"evaluation of the test set): both sides train {r['steps']} of "
            f"the {r['full_steps']} batches of an epoch, extrapolated as "
            f"train_s * {r['full_steps']} / {r['steps']} + eval_s (a full "
            'epoch per round would take minutes on the 2 shared cores). '
            f"JAX (`train_and_evaluate`, second epoch): train "
            f"{j['train_s']:.1f} s, eval {j['eval_s']:.1f} s, epoch "
            f"{j['epoch_s']:.0f} s")
    if r.get('pytorch') is None:
      out += [text + '; PyTorch skipped.', '']
      continue
    t = r['pytorch']
    met = r['ratio']['median'] <= EPOCH_TARGET
    out += [text + f"; PyTorch: train {t['train_s']:.1f} s, eval "
            f"{t['eval_s']:.1f} s, epoch {t['epoch_s']:.0f} s. Ratio "
            f"{_ratio_text(r['ratio'])} over {j['rounds']} alternating "
            f"rounds (train part {r['train_ratio']:.2f}, eval part "
            f"{r['eval_ratio']:.2f}); target <= {EPOCH_TARGET}: "
            + ('**met**' if met else '**missed**')
            + f". Load {r['load']} at the start, {r['load_end']} at the end.",
            '']
    m = r.get('jax_matched_eval')
    if m is not None and 'matched_eval_ratio' in r:
      out += [
          'The reference certifies with the power-iteration K in plain '
          'float32, the JAX run with sound bounds (Gram iteration) and '
          'float64 logits (`eval.bound`, `eval.precision`). The same JAX '
          "run evaluated as the reference (`eval.bound='power'`, "
          "`eval.precision='float32'`, which still subtracts its rounding "
          f"allowance): eval {m['eval_s']:.1f} s (ratio "
          f"{r['matched_eval_ratio']:.2f}), epoch {m['epoch_s']:.0f} s "
          f"(ratio {r['matched_epoch_ratio']:.2f}); the difference, "
          f"{j['eval_s'] - m['eval_s']:.1f} s per epoch, is the cost of "
          'the guarantee.', '']
  return '\n'.join(out)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--epoch-steps', type=int, default=40)
  parser.add_argument('--epoch-rounds', type=int, default=2)
  parser.add_argument('--skip-epoch', action='store_true')
  args = parser.parse_args()
  if args.skip_epoch:
    rows = step_rows(args.tiny, args.repeats)
  else:
    rows = run(args.tiny, args.repeats, args.epoch_steps, args.epoch_rounds)
  print(format_markdown(rows))


if __name__ == '__main__':
  main()
