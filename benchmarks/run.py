"""Runs every benchmark and writes benchmarks/RESULTS.md.

  python -m benchmarks.run            # full sizes (minutes on 2 CPU cores)
  python -m benchmarks.run --tiny     # smoke sizes (writes RESULTS_tiny.md)

Sections: the 4C3F training step (and the share of the Lipschitz bound),
the step and an epoch side by side with the PyTorch reference
(`benchmarks.side_by_side`, skipped without torch), a profile of the step,
certification throughput, tightness-estimation time, data parallelism on
1 vs 8 fake devices, the sound-bound benchmark (`benchmarks.sound_bounds`),
constrained networks' training steps beside 4C3F (`benchmarks.constrained`),
the two-moons study's wall time (`results/moons/moons_results.json`) and
certified quality on offline CIFAR-10 (`results/quality/quality_results.json`,
written by `python -m benchmarks.quality`, which is not run here because it
trains for hours). Every timing is a median after compilation; the machine's
load average is recorded next to each section because the numbers move with
it.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import traceback

from benchmarks import REPO, git_commit, load_average, machine_info
from benchmarks import certification
from benchmarks import constrained
from benchmarks import conv_grads
from benchmarks import data_parallel
from benchmarks import liplt as liplt_benchmark
from benchmarks import profile_step
from benchmarks import quality
from benchmarks import side_by_side
from benchmarks import tightness
from benchmarks import train_step

MOONS_JSON = os.path.join(REPO, 'results', 'moons', 'moons_results.json')
# `python -m experiments.study --output_dir=results/studies/<name>` outputs,
# each with an optional hand-written `comparison.md` (against the paper).
STUDIES_DIR = os.path.join(REPO, 'results', 'studies')
# Load averages above this (on `os.cpu_count()` cores) mark numbers
# provisional.
BUSY_LOAD_PER_CORE = 1.25


def _fmt(x, digits=1):
  if x is None:
    return 'n/a'
  if isinstance(x, float):
    return f'{x:.{digits}f}'
  return str(x)


def _section_train_step(rows) -> list[str]:
  by = {r['variant']: r for r in rows}
  out = ['## 1. Training step (4C3F, CIFAR-10 32x32x3, batch 128, CLL)', '',
         '`cll_jax.train.train_step` jitted with the state donated (as in '
         '`train_and_evaluate`), random uint8 batch. Median of the timed '
         'steps after two warm-up steps; compile = first call. `cpu ms` is '
         'the process CPU time per step (both cores), less distorted by '
         'other load than wall time.', '',
         '| variant | augment | power it./step | median ms | min ms | '
         'cpu ms | compile s |', '|---|---|---|---|---|---|---|']
  for r in rows:
    out.append(f"| {r['variant']} | {r['augment']} | "
               f"{r['power_iterations']} | {_fmt(r['median_ms'])} | "
               f"{_fmt(r['min_ms'])} | {_fmt(r['cpu_ms'])} | "
               f"{_fmt(r['compile_s'])} |")
  if {'cll', 'cll_no_aug', 'cll_pi0', 'no_bound'} <= set(by):
    full, noaug = by['cll']['median_ms'], by['cll_no_aug']['median_ms']
    nob = by['no_bound']['median_ms']
    cpu_noaug = by['cll_no_aug']['cpu_ms']
    cpu_nob, cpu_pi0 = by['no_bound']['cpu_ms'], by['cll_pi0']['cpu_ms']
    out += ['',
            f'* Share of the Lipschitz bound (no augmentation), from CPU '
            f'time: {_fmt(100 * (cpu_noaug - cpu_nob) / cpu_noaug)} % '
            f'({_fmt(cpu_noaug - cpu_nob)} ms = `cll_no_aug` - `no_bound`), '
            f'of which the 5 power iterations '
            f'{_fmt(cpu_noaug - cpu_pi0)} ms (`cll_no_aug` - `cll_pi0`); '
            f'from wall time: {_fmt(100 * (noaug - nob) / noaug)} % '
            '(a negative or erratic value means the difference is below the '
            'noise of the load).',
            f'* Augmentation costs {_fmt(full - noaug)} ms per step.',
            '* The comparison with PyTorch is measured side by side in '
            'section 1c (no typed-in figure).']
  out += ['', '* What moved it (measured by the session that added them): on '
          'CPU, `LinearOperator` computes convs with at most 4 input channels '
          'by im2col + one einsum (RGB layer fwd+grad 69 -> 23 ms) and the '
          'input gradient of strided convs as a stride-1 conv on a '
          'space-to-depth input (c(32,4,2,1): 61-71 -> 16 ms); power '
          'iteration is unrolled. Together about 347 -> 187 ms per step. '
          'GPU/TPU keep the plain `lax.conv_general_dilated`. Tried without '
          'gain: XLA oneDNN / library-fusion flags, patches + matmul convs, '
          'matmul kernel gradients, a full space-to-depth form. The rest is '
          "XLA's CPU conv kernel gradients (25-45 ms per conv layer).",
          '* The kernel gradients, formulation by formulation: section 1b.']
  return out


def _section_certification(rows) -> list[str]:
  by = {r['variant']: r for r in rows}
  out = ['## 2. Certification throughput (4C3F)', '',
         '`plain`: the network alone (no norms, no K_ij), argmax. '
         '`certified`: `train.eval_step` (accuracy + certified-correct at '
         '4 radii) with K_ij precomputed. One-off: '
         '`train.certification_bounds` jitted (`sound`: Gram-iteration '
         'guaranteed bounds; `power`: converged power-iteration state).', '',
         '| variant | batch | median ms | cpu ms | images/s | compile s |',
         '|---|---|---|---|---|---|']
  for r in rows:
    out.append(f"| {r['variant']} | {_fmt(r.get('batch'))} | "
               f"{_fmt(r['median_ms'])} | {_fmt(r['cpu_ms'])} | "
               f"{_fmt(r.get('images_per_s'), 0)} | {_fmt(r['compile_s'])} |")
  if {'plain', 'certified'} <= set(by):
    ratio = by['certified']['images_per_s'] / by['plain']['images_per_s']
    cpu_ratio = (by['certified']['images_per_cpu_s']
                 / by['plain']['images_per_cpu_s'])
    target = certification.TARGET_RATIO
    out += ['', f'* Certified / plain throughput: {ratio:.2f} (wall), '
            f'{cpu_ratio:.2f} (CPU time). Target >= {target}: '
            + ('**met**' if ratio >= target else
               f'**missed** by {target - ratio:.2f}') + '.',
            f"* The sound bound is paid once per evaluation: "
            f"{by['bound_sound']['median_ms']:.0f} ms (+ "
            f"{by['bound_sound']['compile_s']:.0f} s compile), i.e. "
            f"{by['bound_sound']['median_ms'] / by['certified']['median_ms']:.1f} "
            'certified batches.']
  return out


def _section_tightness(rows, profile=None) -> list[str]:
  r = rows[0]
  out = ['## 3. Tightness estimation time (4C3F)', '',
         f"`attacks.empirical_lipschitz_lower_bound`, jitted (one compile, no "
         f"Python loop): {r['pairs']} pairs x {r['steps']} Adam steps, median "
         f"of {r['repeats']}, the pair-chunk sizes timed alternately. Each "
         'step is one forward and backward pass over the 2P points (one '
         'batch), so the cost is linear in pairs x steps; extrapolated to '
         f"the paper's {r['full_pairs']} x {r['full_steps']}. Load "
         f"{r.get('load', 'n/a')}.", '',
         '| pair_chunk_size | median ms | ms per pair-step | compile s | '
         f"{r['full_pairs']} x {r['full_steps']} |", '|---|---|---|---|---|']
  for row in rows:
    out.append(f"| {row.get('pair_chunk_size') or 'all pairs'} | "
               f"{row['median_ms']:.0f} | {row['per_pair_step_ms']:.3f} | "
               f"{row['compile_s']:.1f} | {60 * row['full_estimate_h']:.0f} "
               'min |')
  target = tightness.TARGET_MINUTES
  best = min(60 * row['full_estimate_h'] for row in rows)
  out += ['', f'* Target <= {target} min: '
          + ('**met**' if best <= target else
             f'**missed** ({best:.0f} min, {best / target:.1f}x)') + '. '
          'Before this change (two forward passes of P points per step, all '
          'pairs in one batch): 4.57 ms per pair-step, 5.1 h (2026-11-24, '
          'load 1.4). What is left is the network itself: every pair-step '
          'is a forward and input-gradient pass of two points (section 1d, '
          '`forward + input grads`, for 128 points), about 66 MFLOP per '
          'point, which the CPU\'s peak fp32 rate would do in ~0.3 ms.']
  passes = next((p for p in profile or ()
                 if p.get('framework') == 'jax'
                 and p.get('part') == 'forward + input grads'), None)
  if passes is not None and passes.get('model', '4c3f') == r['model']:
    # Profiles measured before rows named their model and batch were of
    # the 4C3F step at batch 128.
    points = passes.get('batch', 128)
    per_pair = 2 * passes['median_ms'] / points
    fastest = min(row['per_pair_step_ms'] for row in rows)
    out.append(
        f"* Measured: the network's forward + input-gradient pass costs "
        f"{per_pair:.2f} ms per pair (section 1d, 2 x "
        f"{passes['median_ms']:.1f} ms / {points} points) of the "
        f"{fastest:.2f} ms per pair-step, i.e. "
        f"{100 * per_pair / fastest:.0f}%; Adam, clipping and the argmax "
        'are the rest. Meeting the target needs a network pass about '
        f"{60 * min(row['full_estimate_h'] for row in rows) / target:.1f}x "
        "faster: XLA's CPU convolutions again (sections 1b, 1d).")
  return out


def _section_data_parallel(rows) -> list[str]:
  r = rows[0]
  n = data_parallel.NUM_DEVICES
  return ['## 4. Data parallelism: 1 vs 8 fake CPU devices', '',
          f"Same global batch ({r['batch']}), same initial state, "
          f"`train_step` with a 'data' mesh. After {r['steps_compared']} "
          f"steps: max |param diff| = {r['max_abs_param_diff']:.2e} "
          f"(largest |param| {r['max_abs_param']:.2f}), max |power-iteration "
          f"vector diff| = {r['max_abs_power_iteration_diff']:.2e}: equal up "
          'to float32 reduction order.', '',
          f"Step time: 1 device {r['1dev_median_ms']:.1f} ms, {n} devices "
          f"{r[f'{n}dev_median_ms']:.1f} ms ({r['time_ratio']:.2f}x). The "
          f'{n} fake devices share the same 2 cores, so this is the cost of '
          'partitioning and the all-reduce, not a speed-up; on real devices '
          'each holds 1/8 of the batch.']


def _section_sound_bounds(rows) -> list[str]:
  if rows is None:
    return ['## 5. Sound bounds', '',
            '`benchmarks/sound_bounds.py` was not available when this file '
            'was written; rerun `python -m benchmarks.run` once it exists.']
  if isinstance(rows, str):
    return ['## 5. Sound bounds', '', f'Failed: `{rows}`']
  keys = [k for k in rows[0] if k != 'benchmark']
  out = ['## 5. Sound bounds vs converged power iteration '
         '(`benchmarks.sound_bounds`)', '',
         '| ' + ' | '.join(keys) + ' |', '|' + '---|' * len(keys)]
  for r in rows:
    out.append('| ' + ' | '.join(
        f'{r[k]:.4g}' if isinstance(r[k], float) else str(r[k])
        for k in keys) + ' |')
  return out


def _section_conv_grads(rows) -> list[str]:
  out = ["## 1b. Conv kernel gradients on CPU: XLA's conv vs matmul forms "
         '(`benchmarks.conv_grads`)', '',
         'dW of each 4C3F conv at batch '
         f"{rows[0]['batch']}, jitted alone; median ms. `xla`: VJP of "
         '`lax.conv_general_dilated`; `im2col`: one matmul of the patch '
         'matrix; `taps`: one matmul per kernel tap. `rel err` against '
         '`xla`.', '',
         '| conv | xla ms | im2col ms | taps ms | max rel err | fastest |',
         '|---|---|---|---|---|---|']
  convs = list(dict.fromkeys(r['conv'] for r in rows))
  for conv in convs:
    by = {r['form']: r for r in rows if r['conv'] == conv}
    fastest = min(by, key=lambda f: by[f]['median_ms'])
    out.append(f"| {conv} | {_fmt(by['xla']['median_ms'])} | "
               f"{_fmt(by['im2col']['median_ms'])} | "
               f"{_fmt(by['taps']['median_ms'])} | "
               f"{max(r['rel_err'] for r in by.values()):.1e} | {fastest} |")
  out += ['', '* In use (`operators._conv_cpu`): im2col for convs with at '
          'most 4 input channels (the RGB layer), XLA\'s conv otherwise. '
          'Where `fastest` names another form, the gap is the possible gain '
          'per step from this conv\'s kernel gradient.']
  return out


def _section_moons() -> list[str]:
  out = ['## 6. Two-moons study', '']
  if not os.path.exists(MOONS_JSON):
    return out + [f'`{os.path.relpath(MOONS_JSON, REPO)}` not found: run '
                  '`python -m experiments.moons_study '
                  '--output_dir=results/moons`, then this script.']
  with open(MOONS_JSON) as f:
    data = json.load(f)
  walls = {k: v for k, v in _walk(data) if 'wall' in k or 'seconds' in k}
  out.append(f'From `{os.path.relpath(MOONS_JSON, REPO)}`:')
  out.append('')
  for k, v in walls.items():
    out.append(f'* {k}: {v:.1f} s' if isinstance(v, (int, float))
               else f'* {k}: {v}')
  if not walls:
    out.append('(no wall-time field found in the file)')
  comparison = data.get('seed_comparison')
  if comparison:
    s = comparison['summary']
    # 'gloro' is GloRo's loss as defined, 'gloro_official' the official
    # code's gradient (older files hold 'gloro' only).
    methods = [m for m in ('gloro', 'gloro_official')
               if f'{m}_mean_train_cra' in s]
    out += ['', f'CLL vs GloRo at eps = {comparison["epsilon"]:g} over seeds '
            f'{comparison["seeds"]}: mean training CRA CLL '
            f'{100 * s["cll_mean_train_cra"]:.3f}%, ' + ', '.join(
                f'{m} {100 * s[f"{m}_mean_train_cra"]:.3f}% (below CLL on '
                f'{s[f"{m}_train_cra_below_cll"]} of {s["num_seeds"]} seeds)'
                for m in methods) + '.']
  return out


def _walk(obj, prefix=''):
  if isinstance(obj, dict):
    for k, v in obj.items():
      yield from _walk(v, f'{prefix}.{k}' if prefix else str(k))
  elif not isinstance(obj, list):
    yield prefix, obj


def _section_constrained(rows) -> list[str]:
  out = ['## 5b. Constrained networks: training step beside 4C3F', '',
         '`cll_jax.train.train_step` (CLL loss, no augmentation) on CIFAR-10 '
         'shapes, batch 128, jitted with the state donated; peak memory is '
         'XLA\'s accounting of the compiled step (arguments + outputs + '
         'temporaries). LipConv-n: SOC convs with 6 series terms in '
         'training (each conv layer applies its 3x3 conv 5 times forward), '
         'Householder activations, dense head. `family_*`: one network per '
         f'layer family at matched depth and width ({constrained.FAMILY_DEPTH}'
         f' 3x3 convs at {constrained.FAMILY_WIDTH} channels on 32x32, a '
         'scaled sum-pool by 4, a dense head; `benchmarks/constrained.py`).',
         '',
         '| network | layers | parameters | median ms | min ms | cpu ms | '
         'x 4C3F | peak MiB | compile s |', '|---|---|---|---|---|---|---|---|---|']
  base = next((r['median_ms'] for r in rows if r['network'] == '4c3f'), None)
  for r in rows:
    ratio = r['median_ms'] / base if base else None
    peak = r.get('memory_peak_bytes')
    out.append(
        f"| {r['network']} | {r['layers']} | {r['parameters']:,} | "
        f"{_fmt(r['median_ms'])} | {_fmt(r['min_ms'])} | {_fmt(r['cpu_ms'])} "
        f"| {_fmt(ratio, 2)} | {_fmt(peak / 2**20 if peak else None)} | "
        f"{_fmt(r['compile_s'])} |")
  return out


def _quality_rows(comparison: str):
  path = os.path.join(quality.RESULTS_DIR, quality.results_name(comparison))
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _quality_command(comparison: str, r0: dict) -> str:
  """The `benchmarks.quality` command that reproduces a saved comparison."""
  command = (f"python -m benchmarks.quality --comparison {comparison} "
             f"--epochs {r0['epochs']} --model {r0['model']}")
  if r0['train_examples'] != 50000:
    command += f" --train-examples {r0['train_examples']}"
  if 'tightness_pairs' in r0:
    command += (f" --tightness-pairs {r0['tightness_pairs']} "
                f"--tightness-steps {r0['tightness_steps']}")
  return command


def _section_quality_lipconv() -> list[str]:
  out = ['## 7b. Certified quality, offline CIFAR-10, LipConv-20: CLL vs SOC',
         '']
  rows = _quality_rows('lipconv20')
  if rows is None:
    return out + ['Not run yet. `python -m benchmarks.quality --comparison '
                  'lipconv20 --epochs E` trains both on the offline copy '
                  '(decays scaled by E/200).']
  by = {r['method']: r for r in rows}
  if 'cll' in by and 'soc' in by:
    gain = 100 * (by['cll']['cra_36'] - by['soc']['cra_36'])
    out += [f"CLL - SOC at 36/255: {gain:+.1f} points after "
            f"{by['cll']['epochs']} epochs (paper, 200 epochs on the original "
            'CIFAR-10: +1.6).', '']
  r0 = rows[0]
  command = _quality_command('lipconv20', r0)
  return out + [f'Command: `{command}`; {r0["train_examples"]} training '
                'images, bound `' + r0['bound'] + '` (SOC layers: proven).',
                '', quality.markdown_table(rows)]


# The 1-Lipschitz families' side-by-side runs: CLL vs the family's loss,
# and what the CLL paper reports for the XL networks (table 2, CIFAR-10,
# CRA at 36/255, 200 / 1000 epochs).
FAMILY_QUALITY = {'cpl': "CPL's hinge", 'sll': 'offset CE (SLL)',
                  'aol': 'offset CE (AOL)', 'sandwich': 'offset CE (LBDN)'}
PAPER_FAMILY_GAINS = {'cpl': '+1.5 (CPL-XL)', 'sll': 'about 0 (SLL-XL)'}


def _section_quality_families() -> list[str]:
  out = ['## 7c. Certified quality, offline CIFAR-10: CLL vs each 1-Lipschitz '
         "family's own loss", '']
  found = False
  for family, own in FAMILY_QUALITY.items():
    rows = _quality_rows(family)
    if rows is None:
      continue
    found = True
    by = {r['method']: r for r in rows}
    r0 = rows[0]
    line = (f"**{family}** ({r0['model']}, {r0['epochs']} epochs, "
            f"{r0['train_examples']} training images), CLL vs {own}")
    if 'cll' in by and family in by:
      gain = 100 * (by['cll']['cra_36'] - by[family]['cra_36'])
      line += f': CLL - own at 36/255 {gain:+.1f} points'
    if family in PAPER_FAMILY_GAINS:
      line += f' (paper: {PAPER_FAMILY_GAINS[family]})'
    command = _quality_command(family, r0)
    out += [line + '.', '', f'Command: `{command}`.', '',
            quality.markdown_table(rows), '']
  if not found:
    out.append('Not run yet: `python -m benchmarks.quality --comparison '
               '{cpl,sll,aol,sandwich} --epochs E [--model NAME]`.')
  return out


def _section_quality() -> list[str]:
  out = ['## 7. Certified quality, offline CIFAR-10, 4C3F: CLL vs GloRo', '']
  if not os.path.exists(quality.REPO_RESULTS):
    return out + ['Not run yet (hours on CPU). Run e.g. `python -m '
                  'benchmarks.quality --epochs 20 --tightness-pairs 256 '
                  '--tightness-steps 100` (short schedule; decays and eps '
                  'ramp scaled by epochs/800) or `python -m benchmarks.quality`'
                  ' (the paper schedule, for a GPU), then this script.']
  with open(quality.REPO_RESULTS) as f:
    rows = json.load(f)
  by = {r['method']: r for r in rows}
  if 'cll' in by and 'gloro' in by:
    gain = 100 * (by['cll']['cra_36'] - by['gloro']['cra_36'])
    out += [f"CLL - GloRo at 36/255: {gain:+.1f} points after "
            f"{by['cll']['epochs']} epochs (paper, 800 epochs on the original "
            'CIFAR-10: +1.8). A short schedule scales the learning-rate decays '
            "and GloRo's eps ramp by epochs/800, and CLL converges faster "
            '(paper fig. D1), so this gap is not the paper\'s: run the full '
            'schedule (`python -m benchmarks.quality`, a GPU) to compare. '
            'Tightness here uses few pairs and steps (columns) on briefly '
            'trained models, so it is far below the paper\'s 71-80%.', '']
  r0 = rows[0]
  command = f"python -m benchmarks.quality --epochs {r0['epochs']}"
  if 'tightness_pairs' in r0:
    command += (f" --tightness-pairs {r0['tightness_pairs']} "
                f"--tightness-steps {r0['tightness_steps']}")
  return out + [
      f'Command: `{command}` (the methods run one after the other; '
      '`train+eval s` is the wall time of training and evaluation, without '
      'the tightness estimate).', '',
      f"eps = {rows[0]['epsilon']}, CLL p = "
      f"{next((r['p'] for r in rows if r['p'] is not None), 'n/a')}, bound "
      f"`{rows[0]['bound']}`, {rows[0]['train_examples']} training images. "
      'CRA at L2 radius r/255. Tightness = K_lobo / K^(f).', '',
      quality.markdown_table(rows)]


def _study_body(lines: list[str], folder: str) -> list[str]:
  """A study's markdown lines with figure links made report-relative.

  The report lives in benchmarks/, the study's files in `folder`.
  """
  rel = os.path.relpath(folder, os.path.join(REPO, 'benchmarks'))
  out = []
  for line in lines:
    if line.startswith('![') and line.endswith(')') and '](' in line:
      alt, target = line[2:-1].split('](', 1)
      line = f'![{alt}]({rel}/{target})'
    out.append(line)
  return out


def _section_studies() -> list[str]:
  out = ['## 8. Analysis studies of the CLL paper (`experiments.study`)', '']
  names = sorted(n for n in os.listdir(STUDIES_DIR)
                 if os.path.exists(os.path.join(STUDIES_DIR, n, f'{n}.md'))
                 ) if os.path.isdir(STUDIES_DIR) else []
  if not names:
    return out + ['No study results yet: run e.g. `python -m '
                  'experiments.study --study=slack --output_dir='
                  'results/studies/slack`, then this script.']
  for name in names:
    folder = os.path.join(STUDIES_DIR, name)
    with open(os.path.join(folder, f'{name}.md')) as f:
      lines = f.read().splitlines()
    title = lines[0].lstrip('# ').strip()  # the title becomes a subsection
    out += [f'### {title}'] + _study_body(lines[1:], folder) + ['']
    comparison = os.path.join(folder, 'comparison.md')
    if os.path.exists(comparison):
      with open(comparison) as f:
        out += [f.read().strip(), '']
  return out


def _safe(name, fn, errors):
  try:
    return fn()
  except Exception:  # pylint: disable=broad-except
    errors.append(f'{name}: {traceback.format_exc(limit=3)}')
    return None


def run(tiny: bool = False, repeats: int | None = None,
        output: str | None = None, skip: tuple[str, ...] = (),
        reuse: tuple[str, ...] = ()) -> str:
  """Runs the benchmarks and writes the markdown report; returns its path.

  Every measured section's rows are saved in `measurements/` beside the
  report;
  sections named in `reuse` are read from there instead of measured again
  (the report says so, with the date and load of that measurement).
  """
  repeats = repeats or (2 if tiny else 10)
  output = output or os.path.join(
      REPO, 'benchmarks', 'RESULTS_tiny.md' if tiny else 'RESULTS.md')
  cache_dir = os.path.join(os.path.dirname(os.path.abspath(output)),
                           'measurements')
  started = datetime.datetime.now().astimezone()
  errors: list[str] = []
  sections: list[str] = []
  loads = {}
  raw_loads = {}  # the load while each section was measured (or reused)

  def measure(name, fn):
    cache = os.path.join(cache_dir, f'{name}{"_tiny" if tiny else ""}.json')
    if name in reuse:
      if not os.path.exists(cache):
        errors.append(f'{name}: --reuse asked, but {cache} does not exist')
        return None
      with open(cache) as f:
        saved = json.load(f)
      loads[name] = f"reused from {saved['date']}, load {saved['load']}"
      raw_loads[name] = saved['load']
      return saved['rows']
    if name in skip:
      return None
    loads[name] = raw_loads[name] = load_average()
    print(f'--- {name} (load {loads[name]})', flush=True)
    rows = _safe(name, fn, errors)
    if rows is not None:
      os.makedirs(cache_dir, exist_ok=True)
      with open(cache, 'w') as f:
        json.dump({'date': started.strftime('%Y-%m-%d %H:%M %Z'),
                   'load': loads[name], 'rows': rows}, f, default=float)
    return rows

  steps = measure('train_step', lambda: train_step.run(tiny, repeats))
  pair = measure('side_by_side', lambda: side_by_side.run(
      tiny, repeats, verbose=True))
  profile = measure('profile', lambda: profile_step.run(tiny, repeats))
  grads = measure('conv_grads', lambda: conv_grads.run(tiny, repeats))
  cert = measure('certification',
                 lambda: certification.run(tiny, repeats))
  tight = measure('tightness', lambda: tightness.run(tiny))
  dp = measure('data_parallel', lambda: data_parallel.run(
      tiny, repeats=max(repeats // 2, 2)))
  try:
    sound_module = importlib.import_module('benchmarks.sound_bounds')
  except ImportError:
    sound_module = None
  sound = None
  if sound_module is not None:
    sound = measure('sound_bounds', lambda: sound_module.run(
        tiny=tiny, repeats=3, verbose=False))
    if sound is None and 'sound_bounds' not in skip:
      sound = 'see errors'
  constrained_rows = measure('constrained', lambda: constrained.run(
      tiny=tiny, repeats=max(repeats // 2, 2), verbose=False,
      networks=list(constrained.NETWORKS) + [
          f'family_{f}' for f in constrained.FAMILIES]))
  lipschitz_lt = measure('liplt', lambda: liplt_benchmark.run(
      tiny=tiny, train_steps=2 if tiny else 0, verbose=False,
      models_to_run=None if tiny else ('4c3f', '6c2f')))

  info = machine_info()
  cores = os.cpu_count() or 1
  busy = [name for name, v in raw_loads.items()
          if v != 'unknown' and float(v.split(',')[0])
          > BUSY_LOAD_PER_CORE * cores]
  head = [
      '# cll_jax benchmarks' + (' (tiny smoke sizes)' if tiny else ''), '',
      f"* date: {started.strftime('%Y-%m-%d %H:%M %Z')}",
      f'* git commit: {git_commit()}',
      f"* machine: {info['cores']} cores, {info['cpu']}",
      f"* jax {info['jax']}, backend {info['backend']}, "
      f"devices {info['devices']}, XLA_FLAGS {info['xla_flags']}",
      '* load average (1, 5, 15 min) when each section started: '
      + '; '.join(f'{k} {v}' for k, v in loads.items()),
      '* command: `python -m benchmarks.run' + (' --tiny' if tiny else '')
      + '`',
      '* GPU: none lent to this task; no GPU figure exists yet (the same '
      'scripts run there: `python -m benchmarks.side_by_side`).', '']
  if busy:
    head += ['**Provisional:** the machine was shared with other jobs '
             f'(load above {BUSY_LOAD_PER_CORE} per core) while these '
             f'sections were measured: {", ".join(busy)}; '
             'wall times are inflated, CPU times (`cpu ms`) less so, and '
             'ratios timed alternately (A B A B) least. Rerun on '
             'a quiet machine for final numbers.', '']
  if steps:
    sections += _section_train_step(steps) + ['']
  if pair:
    sections += [side_by_side.format_markdown(pair), '']
  if profile:
    sections += [profile_step.format_markdown(profile), '']
  if grads:
    sections += _section_conv_grads(grads) + ['']
  if cert:
    sections += _section_certification(cert) + ['']
  if tight:
    sections += _section_tightness(tight, profile) + ['']
  if dp:
    sections += _section_data_parallel(dp) + ['']
  if 'sound_bounds' not in skip:
    sections += _section_sound_bounds(sound) + ['']
  if constrained_rows:
    sections += _section_constrained(constrained_rows) + ['']
  if lipschitz_lt:
    sections += [liplt_benchmark.format_markdown(lipschitz_lt), '']
  sections += _section_moons() + ['']
  sections += _section_quality() + ['']
  sections += _section_quality_lipconv() + ['']
  sections += _section_quality_families() + ['']
  sections += _section_studies() + ['']
  if errors:
    sections += ['## Errors', ''] + [f'```\n{e}\n```' for e in errors]
  text = '\n'.join(head + sections)
  with open(output, 'w') as f:
    f.write(text)
  print(f'wrote {output}', flush=True)
  if errors:
    raise RuntimeError('benchmarks failed:\n' + '\n'.join(errors))
  return output


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--output', default=None)
  parser.add_argument('--skip', default='',
                      help='comma-separated sections to skip, e.g. '
                      'data_parallel,sound_bounds')
  parser.add_argument('--reuse', default='',
                      help='comma-separated sections to take from the last '
                      'saved measurement (measurements/ beside the report) '
                      'instead '
                      'of measuring again, e.g. sound_bounds,liplt')
  args = parser.parse_args()
  run(tiny=args.tiny, repeats=args.repeats, output=args.output,
      skip=tuple(filter(None, args.skip.split(','))),
      reuse=tuple(filter(None, args.reuse.split(','))))


if __name__ == '__main__':
  main()
