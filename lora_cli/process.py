"""Settings of a lora-train process of its own (never of a library caller's process), each measured on the 2-core CPU
of docs/benchmarks.md ("Start-up, step time and memory on CPU"):

- Python's cyclic garbage collector is off while the libraries import and the run is set up (imports create a
  million objects and trigger many full collections: ~0.6 s of a 4 s start), then everything alive is moved out of
  its reach (gc.freeze) and it is turned back on for training.
- On CPU, freed memory stays with the C allocator for the next step instead of going back to the kernel: glibc hands
  blocks over 128 KiB-32 MiB to the kernel when freed (mmap/munmap) and each step asks for them again, and every page
  the kernel gives back costs a zero-fill fault, up to ~30 us each on a virtual machine (a third of a step measured).
  GPU runs are left alone: their CPU memory (e.g. a checkpoint on its way to the GPU) should go back.
"""

from __future__ import annotations

import ctypes
import gc
import logging
import platform

log = logging.getLogger("lora_cli")

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameters (malloc.h)
_M_MMAP_MAX = -4

_gc_paused = False


def lora_train_process(quantized: bool, optim: str) -> None:
    """What the lora-train command sets in a process of its own, before the libraries load (scripts/bench.py's
    lora-train runs do the same): the collector paused until resume_gc, bitsandbytes hidden when nothing uses it, and
    on CPU freed memory kept for reuse."""
    pause_gc()
    from .train.optimizer import hide_unused_bitsandbytes

    hide_unused_bitsandbytes(quantized, optim)
    import torch

    if not torch.cuda.is_available():
        keep_freed_memory()


def pause_gc() -> None:
    """Collector off for the set-up; resume_gc turns it back on."""
    global _gc_paused
    if gc.isenabled():
        gc.disable()
        _gc_paused = True


def resume_gc() -> None:
    """What the set-up left alive is frozen (never scanned again; the collector's full passes stay short during
    training) and the collector runs again. Nothing if pause_gc did not pause it."""
    global _gc_paused
    if _gc_paused:
        gc.freeze()
        gc.enable()
        _gc_paused = False


def keep_freed_memory() -> bool:
    """Ask glibc to serve every allocation from its heap and never to trim it, so a training step reuses the pages
    of the previous one. False (nothing changed) on other C libraries."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1
    log.debug("C allocator keeps freed memory for reuse: %s", ok)
    return ok
