"""Checkpoints that are whole or absent: staged in a hidden folder, renamed into place once complete."""

from __future__ import annotations

import os
import shutil

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

_STAGING = ".staging"


class StagedCheckpoints:
    """Checkpoints are written into ``OUT/.staging/`` and renamed into place once complete, so a
    crash mid-save never leaves a checkpoint that looks whole (Trainer writes in place)."""

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Write the checkpoint into a hidden staging folder, then rename it into place."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        self._staging_dir = os.path.join(run_dir, _STAGING)
        if self.args.should_save:  # what a failed save (a crash, a full disk) left there
            shutil.rmtree(os.path.join(self._staging_dir, name), ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()  # every rank has written its RNG state
        if self.args.should_save:
            staging, final = os.path.join(run_dir, _STAGING), os.path.join(run_dir, name)
            if os.path.exists(final):  # re-saving a step (e.g. the final save after a resume)
                shutil.rmtree(final)
            os.replace(os.path.join(staging, name), final)
            shutil.rmtree(staging, ignore_errors=True)
            if self.state.best_model_checkpoint:
                self.state.best_model_checkpoint = self.state.best_model_checkpoint.replace(staging, run_dir)
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()

