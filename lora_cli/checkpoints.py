"""What makes a long run survive: complete-only checkpoints, resume checks, atomic saves and clean signal stops."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
from pathlib import Path
from typing import Any

from . import fsutil, integrity
from .errors import LoraCliError, UsageError, writing
from .filenames import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CHECKPOINT_STAGING, COMPLETE_MARKER, FINAL_STAGING, RUN_CONFIG,
                        RUN_STATE, TRAIN_METRICS)

log = logging.getLogger("lora_cli")

_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# Files a finished run leaves in the output dir (besides the tokenizer); cleared by --overwrite.
FINAL_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, TRAIN_METRICS, "README.md", COMPLETE_MARKER)


class Interrupted(LoraCliError):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell convention: 130 for Ctrl-C, 143 for SIGTERM


def complete_checkpoints(out: Path) -> list[Path]:
    """Checkpoint folders whose save finished, oldest first."""
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir()
             if (m := _CHECKPOINT.match(p.name)) and p.is_dir() and (p / COMPLETE_MARKER).is_file()]
    return [p for _, p in sorted(found)]


def checkpoint_info(checkpoint: str | Path) -> dict[str, Any]:
    return json.loads((Path(checkpoint) / COMPLETE_MARKER).read_text(encoding="utf-8"))


def remove_incomplete(out: Path) -> None:
    """Delete checkpoints a killed process left half-written, and the staging area."""
    shutil.rmtree(out / CHECKPOINT_STAGING, ignore_errors=True)
    for p in out.glob("checkpoint-*"):
        if p.is_dir() and not (p / COMPLETE_MARKER).is_file():
            log.warning("removing incomplete checkpoint %s (its save did not finish)", p)
            shutil.rmtree(p, ignore_errors=True)


def finish_checkpoint(staged: Path, out: Path, step: int, keep: int, trained_tokens: int = 0) -> Path:
    """Mark a staged checkpoint complete, move it into place, then prune the oldest beyond `keep` (0: keep all)."""
    integrity.write_marker(staged, step=step, trained_tokens=trained_tokens)
    final = out / staged.name
    fsutil.replace_folder(staged, final)  # the same step may be saved again (e.g. a stop right after a scheduled save)
    if keep:
        for old in complete_checkpoints(out)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def newest_intact(out: Path) -> Path:
    """The newest complete checkpoint whose files verify; damaged ones are named and skipped (a failing disk, a cut
    copy), so a run resumes from the last good state instead of failing on the first bad byte."""
    found = complete_checkpoints(out)
    if not found:
        raise UsageError(f"--resume: no complete checkpoint in {out} (checkpoints are written every --save_steps); "
                         "start again without --resume")
    damaged = []
    for checkpoint in reversed(found):
        damage = integrity.verify(checkpoint)
        if not damage:
            return checkpoint
        log.warning("%s is damaged, skipping it: %s", checkpoint.name, "; ".join(str(d) for d in damage))
        damaged += damage
    raise integrity.DamagedFiles(damaged, f"--resume: no intact checkpoint in {out}", "start again with --overwrite")


def require_intact(checkpoint: Path) -> None:
    """--resume_from_checkpoint names one checkpoint: a damaged one is an error, not something to fall back from."""
    damage = integrity.verify(checkpoint)
    if damage:
        raise integrity.DamagedFiles(damage, f"--resume_from_checkpoint {checkpoint} is damaged (--resume picks the "
                                             "newest intact checkpoint)")


def fingerprint(**paths: str) -> dict[str, str]:
    """sha256 of each data spec by role (train_path=..., eval_path=...), so a resume can tell if the data changed."""
    from . import sources

    return {role: sources.fingerprint(path) for role, path in paths.items() if path}


def resume_problems(saved_config: dict[str, Any], current: dict[str, Any], saved_data: dict[str, str],
                    current_data: dict[str, str]) -> list[str]:
    """What differs between the interrupted run and this one, in words; settings marked resumable in the config
    (they do not change what is learned) may differ. A setting added since the checkpoint was saved had its
    default then."""
    from .config import TrainConfig, fields, resumable

    may_change = resumable(TrainConfig)
    saved_config = {**{f.name: f.default for f in fields(TrainConfig)}, **saved_config}
    problems = [f"{key}: {saved_config.get(key)!r} -> {current.get(key)!r}"
                for key in sorted(set(saved_config) & set(current))
                if key not in may_change and saved_config.get(key) != current.get(key)]
    problems += [f"the --{role} data changed since the checkpoint (sha256 {saved_data.get(role, 'none')[:12]} -> "
                 f"{current_data.get(role, 'none')[:12]})"
                 for role in sorted(set(saved_data) | set(current_data))
                 if saved_data.get(role) != current_data.get(role)]
    return problems


def read_state(out: Path) -> dict[str, Any]:
    path = out / RUN_STATE
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_state(out: Path, state: dict[str, Any]) -> None:
    fsutil.atomic_write(out / RUN_STATE, json.dumps(state, indent=2) + "\n")


def check_resume(out: Path, current_config: dict[str, Any], current_data: dict[str, str], force: bool) -> None:
    """Refuse to resume a run whose config or data changed, naming what changed (unless forced)."""
    import yaml

    run_file = out / RUN_CONFIG
    state = read_state(out)
    if not run_file.is_file() or "data" not in state:
        raise UsageError(f"--resume: {out} holds no lora-train run to resume (no {RUN_CONFIG}/{RUN_STATE})")
    from .config.runfile import upgrade

    saved = upgrade(yaml.safe_load(run_file.read_text(encoding="utf-8")) or {})
    problems = resume_problems(saved, current_config, state["data"], current_data)
    if problems and not force:
        raise UsageError("--resume: the run changed since its checkpoint: " + "; ".join(problems)
                         + " (pass --resume_force to resume anyway, or --overwrite to start over)")
    for problem in problems:
        log.warning("resuming despite a change (--resume_force): %s", problem)


def clear_previous_run(out: Path) -> None:
    """--overwrite: remove what an earlier run left (checkpoints, adapter, metrics), not the user's other files."""
    for p in out.glob("checkpoint-*"):
        shutil.rmtree(p, ignore_errors=True)
    shutil.rmtree(out / CHECKPOINT_STAGING, ignore_errors=True)
    for name in FINAL_FILES + (RUN_STATE,):
        (out / name).unlink(missing_ok=True)


def save_final(trainer: Any, out: Path, main_process: bool = True) -> None:
    """Write the adapter under a temporary name, then move it into place with adapter_config.json last: a save cut
    short leaves no adapter_config.json, so nothing half-written can be loaded as an adapter. Every process calls
    this (sharded models gather their weights in save_model); only the main one writes. The completion marker,
    written last, lets lora-merge/eval/export check the files before loading them."""
    staging = out / FINAL_STAGING
    if main_process:
        shutil.rmtree(staging, ignore_errors=True)
        (out / COMPLETE_MARKER).unlink(missing_ok=True)
        (out / ADAPTER_CONFIG).unlink(missing_ok=True)
    with writing(f"saving the adapter into {out}", "add --resume to the same command (the checkpoints are intact)"):
        trainer.save_model(str(staging))
        trainer.accelerator.wait_for_everyone()
        if not main_process:
            return
        files = sorted(staging.iterdir(), key=lambda p: p.name == ADAPTER_CONFIG)
        for f in files:
            os.replace(f, out / f.name)
        staging.rmdir()
        integrity.write_marker(out, [f.name for f in files if (out / f.name).is_file()],
                               step=trainer.state.global_step)


def stop_on_signal_callback():
    """A TrainerCallback that turns the first SIGTERM/SIGINT into 'save a checkpoint and stop after this step'."""
    from transformers import TrainerCallback

    class StopOnSignal(TrainerCallback):
        def __init__(self):
            self.signum: int | None = None
            self._previous: dict[int, Any] = {}

        def install(self) -> None:
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)

        def uninstall(self) -> None:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            self._previous.clear()

        def _handle(self, signum, frame) -> None:
            if self.signum is not None:  # the second signal: quit now
                self.uninstall()
                raise KeyboardInterrupt
            self.signum = signum
            log.warning("%s received: saving a checkpoint after this step, then stopping "
                        "(press Ctrl-C again to quit at once without saving)", signal.Signals(signum).name)

        def on_step_end(self, args, state, control, **kwargs):
            if self.signum is not None:
                control.should_save = True
                control.should_training_stop = True
            return control

    return StopOnSignal()
