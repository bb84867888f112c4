"""The tokenizer as llama.cpp's byte-level BPE vocabulary."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .. import chat
from ..errors import UsageError

# llama.cpp's pre-tokenizer names for the split regexes of Hugging Face tokenizer.json files (Split, then ByteLevel
# without its own regex). These are the models' published patterns; llama.cpp implements the same ones by name.
PRE_TOKENIZER_SPLITS = {
    "llama-bpe": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "qwen2": (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+"),
    "tekken": (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
               r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
               r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"),
}


@dataclass
class Vocab:
    pre: str  # llama.cpp pre-tokenizer name
    tokens: list[str]
    types: list[int]  # gguf.TokenType per token
    merges: list[str]
    special: dict[str, int]  # bos / eos / unk / pad / eot -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    added: int = 0  # added (special or user-defined) tokens
    padded: int = 0  # placeholder tokens filling the model's vocab_size beyond the tokenizer's


def build_vocab(tokenizer: Any, vocab_size: int) -> Vocab:
    """The tokenizer as llama.cpp's byte-level BPE ("gpt2") vocabulary: tokens spelled in the byte alphabet as in
    tokenizer.json, merges, token types (added special tokens are CONTROL) and the special ids."""
    import gguf

    spec = tokenizer_spec(tokenizer)
    ids = tokenizer.backend_tokenizer.get_vocab(with_added_tokens=True)
    if max(ids.values()) >= vocab_size:
        raise UsageError(f"tokenizer: {max(ids.values()) + 1} tokens, more than the model's vocab_size {vocab_size}")
    # Embedding rows the tokenizer never produces (vocab_size padded to a multiple of 64 or 128) still need a name.
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [int(gguf.TokenType.UNUSED)] * vocab_size
    for token, i in ids.items():
        tokens[i], types[i] = token, int(gguf.TokenType.NORMAL)
    for added in spec.get("added_tokens", []):
        types[added["id"]] = int(gguf.TokenType.CONTROL if added["special"] else gguf.TokenType.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    special = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    special = {k: v for k, v in special.items() if v is not None}
    eot = _end_of_turn_id(tokenizer)
    if eot is not None and eot != special.get("eos"):
        special["eot"] = eot
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    extra = len(with_specials) > len(tokenizer("a", add_special_tokens=False)["input_ids"])
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return Vocab(pre_tokenizer_name(spec), tokens, types, merges, special,
                 add_bos=extra and with_specials[0] == tokenizer.bos_token_id,
                 add_eos=extra and with_specials[-1] == tokenizer.eos_token_id, chat_template=template,
                 added=len(spec.get("added_tokens", [])), padded=vocab_size - len(ids))


def tokenizer_spec(tokenizer: Any) -> dict:
    """tokenizer.json as a dict, checked to be a byte-level BPE tokenizer that llama.cpp reproduces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UsageError("the tokenizer is not a Hugging Face fast tokenizer (no tokenizer.json); lora-export "
                         "needs one")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        raise UsageError("tokenizer: sentencepiece-style BPE with byte fallback (Llama 2, Mistral 7B) is not "
                         "supported yet; lora-export writes byte-level BPE tokenizers (Llama 3, Qwen2, SmolLM, "
                         "Mistral Nemo)")
    if model.get("type") != "BPE" or (spec.get("decoder") or {}).get("type") != "ByteLevel":
        raise UsageError(f"tokenizer: a {model.get('type')} model; lora-export writes byte-level BPE tokenizers "
                         "(Llama 3, Qwen2, SmolLM, Mistral Nemo)")
    normalizer = (spec.get("normalizer") or {}).get("type")
    if normalizer not in (None, "NFC"):  # llama.cpp applies no normalizer; NFC only matters for rare non-NFC input
        raise UsageError(f"tokenizer: normalizer {normalizer} has no llama.cpp equivalent")
    return spec


def _end_of_turn_id(tokenizer: Any) -> int | None:
    """The token that closes an assistant turn under the chat template (<|im_end|>, <|eot_id|>), if any."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    try:
        ids = chat.end_of_turn_ids(tokenizer)
    except Exception:  # noqa: BLE001 - a template the training masks cannot read: no end-of-turn token to state
        return None
    return ids[0] if ids else None


def pre_tokenizer_name(spec: dict) -> str:
    """llama.cpp's name for how tokenizer.json splits text before BPE; an unknown split would silently tokenise
    differently in llama.cpp, so it is refused."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is not None and not byte_level.get("add_prefix_space", False):
        if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
            return "gpt2"
        if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
            return "smollm"
        if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True) and \
                steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
            regex = (steps[0].get("pattern") or {}).get("Regex")
            for name, pattern in PRE_TOKENIZER_SPLITS.items():
                if regex == pattern:
                    return name
    raise UsageError(f"tokenizer: pre-tokenizer {' + '.join(map(str, kinds)) or 'none'} is not one llama.cpp "
                     f"knows by name (supported: GPT-2 byte-level, SmolLM digits, {', '.join(PRE_TOKENIZER_SPLITS)})")
