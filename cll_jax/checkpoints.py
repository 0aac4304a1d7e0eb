"""Orbax checkpoints of the training state, atomic and resumable.

Orbax writes every checkpoint into a temporary folder and renames it into
place when complete, so a killed run leaves either a whole checkpoint or
none; `latest_step` only sees complete ones. The loop saves only states whose
step was finite (see `cll_jax.steps.train_step`), so a diverging run can
never replace good checkpoints with NaNs.
"""

from __future__ import annotations

import logging
import os

from cll_jax import steps

CHECKPOINT_DIR = 'checkpoints'


def manager(workdir: str, max_to_keep: int = 2, create: bool = True):
  """An orbax `CheckpointManager` over `workdir/checkpoints`."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep,
                                         create=create)
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, CHECKPOINT_DIR)), options=options)


def latest_step(workdir: str) -> int | None:
  """The step of the newest complete checkpoint, or None."""
  if not os.path.isdir(os.path.join(workdir, CHECKPOINT_DIR)):
    return None
  m = manager(workdir, create=False)
  try:
    return m.latest_step()
  finally:
    m.close()


def save(ckpt_manager, state: steps.TrainState, force: bool = False) -> None:
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  ckpt_manager.save(int(state.step), args=ocp.args.StandardSave(state),
                    force=force)


def restore(ckpt_manager, template: steps.TrainState,
            step: int | None = None) -> steps.TrainState:
  """Restores checkpoint `step` (default: latest) into `template`'s structure.

  Raises:
    FileNotFoundError: no checkpoint.
    ValueError: the checkpoint's tree differs from the template's (another
      model, bound or optimizer than the run was trained with).
  """
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  step = ckpt_manager.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'no checkpoint in {ckpt_manager.directory}')
  logging.info('restoring checkpoint at step %d', step)
  try:
    return ckpt_manager.restore(step, args=ocp.args.StandardRestore(template))
  except (ValueError, KeyError, TypeError) as e:
    raise ValueError(
        f'the checkpoint at step {step} in {ckpt_manager.directory} does not '
        'fit the model and optimizer of this config (was the run trained '
        'with another model, bound or optimizer?). Orbax said: '
        f'{str(e)[:500]}') from e
