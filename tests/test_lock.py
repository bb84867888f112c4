"""One run per output folder: of two lora-train runs started together on one --output_dir exactly one trains; the
lock dies with its holder."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lora_cli.lock import LOCK_FILE, FolderBusy, OutputLock

from .conftest import ROOT, TINY_TRAIN, run_cli

HOLD = """
import sys, time
from pathlib import Path
from lora_cli.lock import OutputLock
OutputLock(Path(sys.argv[1])).acquire()
print("locked", flush=True)
time.sleep(60)
"""


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def hold_lock(folder) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder)], stdout=subprocess.PIPE, text=True, env=env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_holder_is_refused_naming_the_first_pid(tmp_path):
    folder = tmp_path / "run"
    holder = hold_lock(folder)
    try:
        with pytest.raises(FolderBusy) as exc:
            OutputLock(folder).acquire()
        assert exc.value.exit_code == 2
        assert str(exc.value).startswith(f"--output_dir {folder}: another lora-train run (PID {holder.pid}) is "
                                         "writing into it")
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing anything: the OS dropped its lock, the file with its PID is no obstacle.
    assert (folder / LOCK_FILE).read_text().strip() == str(holder.pid)
    with OutputLock(folder) as lock:
        assert (folder / LOCK_FILE).read_text().strip() == str(os.getpid()) and lock.path.parent == folder


def test_release_leaves_the_folder_as_the_run_left_it(tmp_path):
    folder = tmp_path / "new" / "run"
    with OutputLock(folder):
        assert [p.name for p in folder.iterdir()] == [LOCK_FILE]
    assert not folder.exists()  # created for the lock, nothing written: removed again
    with OutputLock(folder):
        (folder / "adapter_config.json").write_text("{}")
    assert [p.name for p in folder.iterdir()] == ["adapter_config.json"]
    existing = tmp_path / "existing"
    existing.mkdir()
    with OutputLock(existing):
        pass
    assert existing.is_dir() and not any(existing.iterdir())  # only what the lock created is removed


def test_a_run_on_a_locked_folder_exits_2_without_writing(tiny_llama, chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    holder = hold_lock(out)
    try:
        code = run_cli(["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir", str(out),
                        *TINY_TRAIN])
    finally:
        holder.kill()
        holder.wait()
    assert code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"lora-train: error: --output_dir {out}: another lora-train run (PID {holder.pid}) is writing into it; wait "
        "for it to finish or choose another folder")
    assert not (out / "adapter_config.json").exists()


def test_two_runs_started_together_never_both_train(tiny_llama, chat_file, tmp_path):
    out = tmp_path / "run"
    argv = [sys.executable, "-c", "from lora_cli.cli.train import main; main()", "--base_model", str(tiny_llama),
            "--train_path", str(chat_file), "--output_dir", str(out), *TINY_TRAIN]
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env())
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(code for code, _ in results)
    trained = [err for code, err in results if code == 0]
    refused = [err for code, err in results if code != 0]
    assert len(trained) == 1 and "done: 3 steps" in trained[0], results
    # The loser either found the folder locked, or (started later) found the winner's finished run in it.
    assert codes == [0, 2] and ("another lora-train run (PID" in refused[0] or "not empty" in refused[0]), results
    assert "loading" not in refused[0]  # refused before loading anything
