"""The written GGUF loaded back with transformers and compared with the source model and tokenizer."""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
from pathlib import Path
from typing import Any

from .. import chat
from ..errors import RunFailure, one_line
from ..verification import BUILTIN_PROMPTS, EXPORT_TOLERANCES, logit_differences, next_token_logits, within
from .source import Source
from .tensors import plan_tensors, round_as_stored
from .vocab import Vocab

log = logging.getLogger("lora_cli")

# Outtypes judged against the source rounded exactly as the file stores it (tensors.round_as_stored): the margins
# then hold the runtime's arithmetic only, not what the rounding itself costs (for q4_0 on the demo model, as much as
# q/k rows in the wrong order cost a tiny one: docs/benchmarks.md, "q4_0 verification").
ROUNDED_REFERENCE = ("q4_0",)

# Text the tokenizer check encodes besides the rendered prompts: unicode, odd whitespace, digits, special tokens.
TRICKY_STRINGS = ["naïve café, Zürich — 東京 🙂 ﬁ", "  two leading spaces and trailing  ",
                  "tabs\tand\n\nnewlines\r\n", "12345 3.14159 -0.5e10", "don't I'LL we've",
                  "<|im_start|>user\nhi<|im_end|>", "a\u00a0b\u200bc", "```python\nprint('x')\n```"]


def _transformers_pre_tokenizers() -> set[str]:
    """Pre-tokenizers transformers' GGUF loader rebuilds; for the others it falls back to GPT-2's split."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
    except ImportError:
        return {"gpt2"}
    return {"gpt2", *GGUF_PRE_TOKENIZER_SPLITS}


def probe_conversations(tokenizer: Any) -> list[list[int]]:
    """Token ids of a few whole conversations as training encodes them (chat template, BOS where the model wants
    one); their plain text when there is no template, or one that does not render them."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return [chat.encode(tokenizer, messages).input_ids for messages in BUILTIN_PROMPTS]
        except Exception as exc:  # noqa: BLE001 - jinja and the masking code raise many types
            log.warning("verifying on plain text: the chat template does not render the probe conversations (%s)",
                        one_line(exc))
    return [tokenizer(" ".join(m["content"] for m in messages))["input_ids"] for messages in BUILTIN_PROMPTS]


def compare_tokenizers(source: Any, loaded: Any, texts: list[str], vocab: Vocab) -> dict[str, Any]:
    mismatched = [t for t in texts if source(t, add_special_tokens=False)["input_ids"] !=
                  loaded(t, add_special_tokens=False)["input_ids"]]
    if source("Hello", add_special_tokens=True)["input_ids"] != loaded("Hello", add_special_tokens=True)["input_ids"]:
        mismatched.append("<BOS/EOS added to 'Hello'>")
    ids = {name: (getattr(source, f"{name}_token_id"), getattr(loaded, f"{name}_token_id"))
           for name in ("bos", "eos", "unk", "pad")}
    wrong_ids = [f"{name} {a} -> {b}" for name, (a, b) in ids.items() if a is not None and a != b]
    template_kept = (loaded.chat_template or None) == (vocab.chat_template or None)
    exact = vocab.pre in _transformers_pre_tokenizers()
    return {"texts": len(texts), "mismatched": mismatched, "special_id_changes": wrong_ids,
            "chat_template_preserved": template_kept, "checked_by_transformers": exact,
            "passed": (not mismatched or not exact) and not wrong_ids and template_kept}


def compare_logits(reference: list[Any], exported: list[Any], tolerance: dict[str, float]) -> dict[str, Any]:
    """The source's and the export's logits compared (verification.logit_differences), judged against `tolerance`."""
    result = {"prompts": len(reference), **logit_differences(reference, exported), "tolerance": tolerance}
    result["passed"] = within(result, tolerance)
    return result


@contextlib.contextmanager
def _gguf_progress_bar_off():
    """transformers' GGUF loader draws a tqdm bar of its own, outside its logging settings; --debug keeps it."""
    import transformers.modeling_gguf_pytorch_utils as loader

    original = getattr(loader, "tqdm", None)
    if original is None or log.isEnabledFor(logging.DEBUG):
        yield
        return
    loader.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        loader.tqdm = original


def verify(source: Source, gguf_path: Path, tokenizer: Any, vocab: Vocab, outtype: str) -> dict[str, Any]:
    """Load the GGUF back with transformers (weights dequantised to fp32, tokenizer rebuilt from the metadata) and
    compare it with the source model and tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    conversations = probe_conversations(tokenizer)
    specials = chat._special_strings(tokenizer)[:8]
    texts = [tokenizer.decode(ids) for ids in conversations] + TRICKY_STRINGS + specials
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        loaded_tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as exc:  # noqa: BLE001 - whatever transformers raises, the file did not load
        raise RunFailure(f"verification: transformers cannot load the tokenizer of the written GGUF ({exc})") from None
    tokens = compare_tokenizers(tokenizer, loaded_tokenizer, texts, vocab)
    log.info("verifying: running the source model and the GGUF (loaded back with transformers, fp32) on %d chat "
             "conversations", len(conversations))
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32)
    if outtype in ROUNDED_REFERENCE:
        round_as_stored(model, plan_tensors(source, outtype))
    reference = next_token_logits(model, conversations)
    del model
    gc.collect()
    try:
        with _gguf_progress_bar_off():
            exported_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise RunFailure(f"verification: transformers cannot load the written GGUF ({exc})") from None
    exported = next_token_logits(exported_model, conversations)
    del exported_model
    gc.collect()
    logits = compare_logits(reference, exported, EXPORT_TOLERANCES[outtype])
    return {"passed": logits["passed"] and tokens["passed"], "logits": logits, "tokenizer": tokens}


def log_verification(result: dict[str, Any], outtype: str) -> None:
    lg, tk = result["logits"], result["tokenizer"]
    log.info("logits vs source%s (%d positions): max |diff| %.3g = %.3g%% of the logit scale %.3g (limit %.3g%% for "
             "%s), KL mean %.2e max %.2e (limit %.0e), top-1 agreement %.1f%% -> %s",
             f" rounded as the file stores {outtype}" if outtype in ROUNDED_REFERENCE else "", lg["positions"],
             lg["max_abs_logit_diff"], 100 * lg["max_rel_logit_diff"], lg["logit_scale"],
             100 * lg["tolerance"]["max_rel_logit_diff"], outtype, lg["mean_kl"], lg["max_kl"],
             lg["tolerance"]["max_kl"], 100 * lg["top1_agreement"], "PASS" if lg["passed"] else "FAIL")
    problems = [f"ids differ on {len(tk['mismatched'])} of {tk['texts']} texts (e.g. {tk['mismatched'][0]!r})"] \
        if tk["mismatched"] else []
    problems += [f"special ids changed: {', '.join(tk['special_id_changes'])}"] if tk["special_id_changes"] else []
    problems += [] if tk["chat_template_preserved"] else ["chat template not preserved"]
    if tk["mismatched"] and not tk["checked_by_transformers"]:
        log.warning("tokenizer: transformers' GGUF loader does not implement this pre-tokenizer, so its ids differ "
                    "from the source; llama.cpp implements it by name (not a failure)")
        problems = problems[1:]
    log.info("tokenizer: %s -> %s", "; ".join(problems) if problems else
             f"same ids on {tk['texts']} texts (chat prompts, unicode, whitespace, special tokens), same special ids, "
             "chat template preserved", "PASS" if tk["passed"] else "FAIL")
