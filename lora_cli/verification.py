"""Checking a written model against the one it was made from: shared by lora-merge and lora-export."""

from __future__ import annotations

# Conversations to compare models on when a run recorded no data of its own (and, for lora-export, always).
BUILTIN_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain what a hash table is in one sentence."},
     {"role": "assistant", "content": "A hash table stores values under keys and finds them by hashing the key."}],
    [{"role": "user", "content": "Write a haiku about autumn."},
     {"role": "assistant", "content": "Red leaves drift and fall,\ncool wind hums through bare trees,\n"
                                      "the year exhales slow."}],
    [{"role": "user", "content": "List three prime numbers."},
     {"role": "assistant", "content": "2, 3 and 5."}],
]


def fits_in_memory(model_bytes: int) -> bool:
    """Verification holds one fp32 model at a time, plus activations."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return True  # not Linux: try, as the user asked
    return model_bytes * 1.5 < available
