"""Checking a written model against the one it was made from, shared by lora-merge and lora-export: the probe
conversations, the logits comparison, the pass/fail limits, and skipping when the models would not fit in memory."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("lora_cli")

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

# lora-merge, by --dtype. The merged weights are evaluated in fp32, so the gates measure the merge plus the rounding
# of storing the weights in --dtype (compute precision is the deployment's choice). fp32 leaves summation-order noise
# only (about 1e-4 on the demo model). Rounding every weight to bf16 moves the demo's logits by up to 1.3 and its mean
# KL to 6e-4, about what a 10% error in the LoRA scale does; a missing adapter or a halved scale gives mean KL near 0.1.
MERGE_TOLERANCES = {"fp32": {"max_abs_logit_diff": 1e-3, "mean_kl": 1e-6},
                    "fp16": {"max_abs_logit_diff": 0.5, "mean_kl": 1e-4},
                    "bf16": {"max_abs_logit_diff": 4.0, "mean_kl": 5e-3}}
# lora-export, by --outtype: the exported model (loaded back with transformers) against the source, both run in fp32:
# the difference is the rounding of the weights to --outtype. Relative to the logit scale (the largest |logit| of the
# source on the same prompts), so that tiny random models and real ones share the numbers.
EXPORT_TOLERANCES = {"f32": {"max_rel_logit_diff": 1e-4, "max_kl": 1e-6},
                     "f16": {"max_rel_logit_diff": 1e-2, "max_kl": 2e-3},
                     "bf16": {"max_rel_logit_diff": 5e-2, "max_kl": 2e-2},
                     "q8_0": {"max_rel_logit_diff": 1e-1, "max_kl": 5e-2},
                     # against the source rounded as the file stores it (export/verify.py ROUNDED_REFERENCE):
                     # transformers' reader dequantises to the very same values, so f32's limits apply (measured: 0
                     # on the demo and tiny models; q/k rows in the wrong order 54-57%, docs/benchmarks.md)
                     "q4_0": {"max_rel_logit_diff": 1e-4, "max_kl": 1e-6}}


def next_token_logits(model: Any, conversations: list[list[int]]) -> list[Any]:
    """The model's logits at every position of each conversation (token ids), in fp32 on the CPU."""
    import torch

    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids], device=model.device)).logits[0].to("cpu", torch.float32)
                for ids in conversations]


def logit_differences(reference: list[Any], other: list[Any]) -> dict[str, Any]:
    """Largest |logit difference| (absolute, and relative to the largest |logit| of the reference), KL(reference ||
    other) of the next-token distributions at every position, and how often the most likely next token agrees."""
    import torch

    diff = max(float((r - o).abs().max()) for r, o in zip(reference, other))
    scale = max(float(r.abs().max()) for r in reference) or 1.0
    kls, agree, positions = [], 0, 0
    for r, o in zip(reference, other):
        logp, logq = torch.log_softmax(r.double(), -1), torch.log_softmax(o.double(), -1)
        kls.append((logp.exp() * (logp - logq)).sum(-1).clamp_min(0))
        agree += int((r.argmax(-1) == o.argmax(-1)).sum())
        positions += r.shape[0]
    kl = torch.cat(kls)
    return {"positions": positions, "max_abs_logit_diff": diff, "logit_scale": scale,
            "max_rel_logit_diff": diff / scale, "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": agree / positions}


def within(result: dict[str, Any], tolerance: dict[str, float]) -> bool:
    """Every measure a tolerance names is at or below its limit."""
    return all(result[k] <= v for k, v in tolerance.items())


def fits_in_memory(need_bytes: float) -> bool:
    """Whether `need_bytes` are available in RAM now; verification holds fp32 models, plus activations."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return True  # not Linux: try, as the user asked
    return need_bytes < available


def verify_or_skip(enabled: bool, need_bytes: float, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """run() unless --no-verify, or unless verifying needs more memory than is available (a warning, not a
    failure: the written model is fine, only the check cannot run here)."""
    if not enabled:
        return {"skipped": "--no-verify"}
    if not fits_in_memory(need_bytes):
        reason = f"the model needs about {need_bytes / 2**30:.1f} GiB to verify, more than is available"
        log.warning("verification skipped: %s", reason)
        return {"skipped": reason}
    return run()
