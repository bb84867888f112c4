"""The merged model against base+adapter (peft, unmerged) on a few conversations."""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TYPE_CHECKING

from .. import chat, data, models
from ..adapters import Adapter
from ..errors import DataError, RunFailure, UsageError, one_line
from ..verification import BUILTIN_PROMPTS, MERGE_TOLERANCES, logit_differences, next_token_logits, within
from .writer import round_trip_in_place

if TYPE_CHECKING:
    from .command import Prepared

log = logging.getLogger("lora_cli")

N_PROMPTS = 4
MAX_NEW_TOKENS = 32


@dataclass
class Probe:
    messages: list[dict]
    ids: list[int]  # the whole conversation, tokenised as in training: logits are compared at every position
    prompt: list[int]  # everything before the last assistant turn, plus the generation prompt: greedy answers


def probes(adapter: Adapter, tokenizer: Any) -> tuple[list[Probe], str]:
    """A few conversations to compare on, rendered with the adapter's chat template: from the adapter's eval data
    when it can be read, else its training data, else built-in ones."""
    for path in _recorded_data(adapter):
        try:
            rows = [r.messages for r in data.load_conversations(str(path))]
        except DataError as exc:
            log.warning("cannot read %s for verification (%s)", path, exc)
            continue
        items = _encode_probes(tokenizer, rows)
        if items:
            return items, str(path)
    items = _encode_probes(tokenizer, BUILTIN_PROMPTS)
    if not items:
        raise RunFailure("cannot build verification prompts with the adapter's chat template; use --no-verify")
    return items, "built-in prompts"


def _recorded_data(adapter: Adapter) -> list[Path]:
    rc = adapter.run_config or {}
    found = []
    for path in (rc.get("eval_path"), rc.get("train_path")):
        # relative to where training ran (usually the current folder), else to the adapter
        candidates = [Path(path), adapter.path / path] if path else []
        found += [c for c in candidates if c.is_file()][:1]
    return found


def _encode_probes(tokenizer: Any, conversations: list[list[dict]]) -> list[Probe]:
    result = []
    for messages in conversations:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            continue
        try:
            ids = chat.encode(tokenizer, messages[: last + 1]).input_ids
            prompt = chat.encode_prompt(tokenizer, messages[:last])
        except (DataError, UsageError):
            continue
        result.append(Probe(messages[: last + 1], ids, prompt))
        if len(result) == N_PROMPTS:
            break
    return result


@dataclass
class Outputs:
    logits: list[Any]  # fp32, one (tokens, vocab) tensor per probe
    answers: list[str]


def run_probes(model: Any, tokenizer: Any, items: list[Probe], eos_ids: list[int]) -> Outputs:
    import torch

    model.eval()
    logits = next_token_logits(model, [p.ids for p in items])
    answers = []
    with torch.no_grad():
        for p in items:
            prompt = torch.tensor([p.prompt], device=model.device)
            generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                       max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos_ids,
                                       pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True))
    return Outputs(logits, answers)


def compare(reference: Outputs, merged: Outputs) -> dict[str, Any]:
    """Max absolute logit difference, KL(reference || merged) of the next-token distributions at every position,
    top-1 agreement, and how many greedy answers are identical."""
    logits = logit_differences(reference.logits, merged.logits)
    return {**{k: logits[k] for k in ("max_abs_logit_diff", "mean_kl", "max_kl", "top1_agreement")},
            "answers_identical": sum(a == b for a, b in zip(reference.answers, merged.answers)),
            "reference_answers": reference.answers}


@dataclass
class Reference:
    """base+adapter as peft runs it, unmerged: on the full-precision, NF4-rounded or real 4-bit base."""

    label: str
    nf4: set[str] = field(default_factory=set)  # base weights rounded through NF4 first
    four_bit: bool = False
    gates: bool = False  # pass/fail is decided against this one


def verify(job: Prepared, out: Path, tokenizer: Any, eos_ids: list[int], trust_remote_code: bool) -> dict[str, Any]:
    """Merged model vs base+adapter (peft, unmerged) on a few conversations. Pass/fail is against the reference the
    merge reproduces (the full-precision base, or the NF4-rounded one with --simulate_nf4); a QLoRA adapter is also
    compared with the real 4-bit base+adapter, which is expected to differ more."""
    import torch
    from transformers import AutoModelForCausalLM

    adapter, base, plan = job.adapter, job.base, job.plan
    items, source = probes(adapter, tokenizer)
    log.info("verifying on %d conversation(s) from %s against base+adapter (peft)", len(items), source)
    references = [Reference("base+adapter, NF4-rounded base" if plan.nf4 else "base+adapter, full-precision base",
                            nf4=plan.nf4, gates=True)]
    if plan.nf4:
        references.append(Reference("base+adapter, full-precision base"))
    if adapter.quantization == "4bit":
        references.append(Reference("base+adapter, 4-bit NF4 base (as trained)", four_bit=True))
    merged_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                        trust_remote_code=trust_remote_code)
    merged = run_probes(merged_model, tokenizer, items, eos_ids)
    del merged_model
    gc.collect()
    tolerance = MERGE_TOLERANCES[job.dtype]
    comparisons = []
    for ref in references:
        try:
            outputs = run_probes(_reference_model(adapter, base, ref, trust_remote_code), tokenizer, items, eos_ids)
        except Exception as exc:  # informative references may be unavailable (e.g. bitsandbytes on this machine)
            if ref.gates:
                raise
            log.warning("comparison with %s skipped: %s", ref.label, one_line(exc))
            continue
        finally:
            gc.collect()
        result = {"reference": ref.label, "gates": ref.gates, **compare(outputs, merged)}
        result["within_tolerance"] = within(result, tolerance)
        comparisons.append(result)
        log.info("vs %s: max |logit diff| %.2e, KL mean %.2e max %.2e, top-1 agreement %.1f%%, greedy answers "
                 "identical %d/%d%s", ref.label, result["max_abs_logit_diff"], result["mean_kl"], result["max_kl"],
                 100 * result["top1_agreement"], result["answers_identical"], len(items),
                 (" -> " + ("PASS" if result["within_tolerance"] else "FAIL")) if ref.gates else " (informative)")
    passed = next(c for c in comparisons if c["gates"])["within_tolerance"]
    return {"passed": passed, "tolerance": tolerance, "evaluated_in": "fp32", "source": source,
            "prompts": [p.messages for p in items], "merged_answers": merged.answers, "comparisons": comparisons}


def _reference_model(adapter: Adapter, base: models.BaseModel, ref: Reference, trust_remote_code: bool) -> Any:
    from peft import PeftModel

    model = models.load_model(base, precision="fp32", quantization="4bit" if ref.four_bit else None,
                              trust_remote_code=trust_remote_code)
    if ref.nf4:
        round_trip_in_place(model, {n.removesuffix(".weight") for n in ref.nf4})
    return PeftModel.from_pretrained(model, str(adapter.path))
