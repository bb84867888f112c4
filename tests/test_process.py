"""lora_cli/process.py: the lora-train process's own settings (garbage collector during set-up, C allocator on CPU)."""

from __future__ import annotations

import gc
import platform
import subprocess
import sys

import pytest

from lora_cli import process


def test_set_up_runs_without_the_collector_and_training_with_it():
    assert gc.isenabled()
    try:
        process.pause_gc()
        assert not gc.isenabled()
        kept = object()  # alive across the set-up: frozen, never scanned again
        process.resume_gc()
        assert gc.isenabled() and gc.get_freeze_count() > 0
        assert kept is not None
        process.resume_gc()  # a second call changes nothing
        assert gc.isenabled()
    finally:
        gc.enable()
        gc.unfreeze()


def test_a_collector_the_caller_switched_off_stays_off():
    gc.disable()
    try:
        process.pause_gc()
        process.resume_gc()
        assert not gc.isenabled()  # not ours to turn on
    finally:
        gc.enable()


PROBE = """
import sys, torch
from lora_cli import process
if sys.argv[1] == "keep":
    assert process.keep_freed_memory()
def resident_pages():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1])
for n in (2**18, 2**22, 2**24):  # 1, 16 and 64 MiB: a training step's activations, freed at its end
    x = torch.ones(n)
    before = resident_pages()
    del x
    print(before - resident_pages(), n * 4 // 4096)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_on_cpu_freed_memory_stays_with_the_process_for_the_next_step():
    def returned(mode: str) -> list[tuple[int, int]]:
        done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        return [tuple(map(int, line.split())) for line in done.stdout.splitlines()]

    # glibc's default gives large freed blocks back to the kernel, and the next step faults their pages in again
    assert all(back >= pages * 0.9 for back, pages in returned("default")[1:])
    assert all(back < pages * 0.1 for back, pages in returned("keep"))  # kept: the next step reuses them
