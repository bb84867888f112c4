"""The tokenizer as llama.cpp's byte-level BPE vocabulary."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .. import chat
from ..errors import UsageError

# How llama.cpp's converter (convert_hf_to_gguf.py, get_vocab_base_pre) recognises a tokenizer's pre-tokenizer: it
# encodes this fixed text with the Hugging Face tokenizer (special tokens added, as encode() does by default) and
# looks the sha256 of str(ids) up in a table of known models. The same test here gives the same names, never a guess.
CHECK_TEXT = ("\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ "
              "🦙🦙 3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
              "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
              "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL")
# sha256 of the check ids -> (llama.cpp's pre-tokenizer name, the model its converter took it from), for the byte-level
# BPE tokenizers of the architectures lora-export writes; the values are those published in llama.cpp's converter.
PRE_TOKENIZER_HASHES = {
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": ("llama-bpe", "Meta-Llama-3-8B"),
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": ("smaug-bpe", "Smaug-Llama-3-70B-Instruct"),
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": ("qwen2", "Qwen1.5-7B"),
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": ("qwen2", "Qwen3-Embedding-0.6B"),
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": ("deepseek-r1-qwen",
                                                                         "DeepSeek-R1-Distill-Qwen-1.5B"),
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": ("smollm", "SmolLM-135M"),
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": ("gpt-2", "gpt2"),
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": ("tekken", "Mistral-Nemo-Base-2407"),
    "9d032fcbd5501f4a38150912590928bfb36091efb5df11b8e2124b0390e3fb1e": ("falcon3", "Falcon3-7B-Base"),
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": ("deepseek-llm", "deepseek-llm-7b-base"),
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": ("deepseek-coder",
                                                                         "deepseek-coder-6.7b-base"),
}

# For tokenizers the check text does not identify (e.g. a vocabulary paired with another family's split, as
# transformers 5 does when it rebuilds a tokenizer for the model's architecture): the split regexes llama.cpp
# implements under these names, matched exactly against tokenizer.json (Split, then ByteLevel without its own regex).
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
    merges: list[str]  # byte-level BPE only: SentencePiece vocabularies merge by score
    special: dict[str, int]  # bos / eos / unk / pad / eot -> id
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    added: int = 0  # added (special or user-defined) tokens
    padded: int = 0  # placeholder tokens filling the model's vocab_size beyond the tokenizer's
    model: str = "gpt2"  # llama.cpp's tokenizer model: gpt2 (byte-level BPE) or llama (SentencePiece)
    scores: list[float] | None = None  # SentencePiece: the merge priority of each token
    add_space_prefix: bool = False  # SentencePiece: "▁" before the text (and after each special token)

    @property
    def kind(self) -> str:
        return "SentencePiece BPE" if self.model == "llama" else "byte-level BPE"


def build_vocab(tokenizer: Any, vocab_size: int, source_gguf_pre: str | None = None) -> Vocab:
    """The tokenizer as llama.cpp's byte-level BPE ("gpt2") vocabulary: tokens spelled in the byte alphabet as in
    tokenizer.json, merges, token types (added special tokens are CONTROL) and the special ids; or, for a
    SentencePiece tokenizer (Llama 2, Mistral), as llama.cpp's "llama" vocabulary: "▁"-spelled pieces, byte tokens
    and scores in place of merges."""
    import gguf

    spec = tokenizer_spec(tokenizer)
    sentencepiece = bool(spec["model"].get("byte_fallback"))
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
    if sentencepiece:
        for i, token in enumerate(tokens):
            if re.fullmatch(r"<0x[0-9A-F]{2}>", token):
                types[i] = int(gguf.TokenType.BYTE)
        if tokenizer.unk_token_id is not None:
            types[tokenizer.unk_token_id] = int(gguf.TokenType.UNKNOWN)
    special = {name: getattr(tokenizer, f"{name}_token_id") for name in ("bos", "eos", "unk", "pad")}
    special = {k: v for k, v in special.items() if v is not None}
    eot = _end_of_turn_id(tokenizer)
    if eot is not None and eot != special.get("eos"):
        special["eot"] = eot
    with_specials = tokenizer("a", add_special_tokens=True)["input_ids"]
    extra = len(with_specials) > len(tokenizer("a", add_special_tokens=False)["input_ids"])
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    vocab = Vocab("default" if sentencepiece else pre_tokenizer_name(tokenizer, source_gguf_pre, spec), tokens,
                  types, merges, special, add_bos=extra and with_specials[0] == tokenizer.bos_token_id,
                  add_eos=extra and with_specials[-1] == tokenizer.eos_token_id, chat_template=template,
                  added=len(spec.get("added_tokens", [])), padded=vocab_size - len(ids))
    if sentencepiece:
        vocab.model, vocab.merges = "llama", []
        vocab.scores = _merge_scores(tokens, merges)
        vocab.add_space_prefix = _adds_space_prefix(spec)
    return vocab


def _merge_scores(tokens: list[str], merges: list[str]) -> list[float]:
    """llama.cpp's SentencePiece tokenizer merges the best-scored adjacent pair first; tokenizer.json lists merges in
    that order (transformers builds them from the SentencePiece scores), so a merge's rank gives its result's score.
    Tokens no merge makes (characters, bytes, specials) are never merge results: 0."""
    rank = {}
    for r, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), r)
    return [-float(rank[t]) - 1.0 if t in rank else 0.0 for t in tokens]


def _adds_space_prefix(spec: dict) -> bool:
    """Whether the tokenizer writes "▁" before the text: a Metaspace pre-tokenizer that prepends, or a Prepend
    normalizer (the older tokenizer.json layout)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    if any(s.get("type") == "Metaspace" and s.get("prepend_scheme", "always") != "never" for s in steps):
        return True
    norm = spec.get("normalizer") or {}
    norms = norm.get("normalizers", []) if norm.get("type") == "Sequence" else [norm]
    return any(n.get("type") == "Prepend" for n in norms)


def tokenizer_spec(tokenizer: Any) -> dict:
    """tokenizer.json as a dict, checked to be a byte-level BPE tokenizer that llama.cpp reproduces."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UsageError("the tokenizer is not a Hugging Face fast tokenizer (no tokenizer.json); lora-export "
                         "needs one")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return spec  # SentencePiece BPE (Llama 2, Mistral 7B) in tokenizer.json form
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


def check_hash(tokenizer: Any) -> str:
    from hashlib import sha256

    return sha256(str(tokenizer.encode(CHECK_TEXT)).encode()).hexdigest()


def pre_tokenizer_name(tokenizer: Any, source_gguf_pre: str | None = None, spec: dict | None = None) -> str:
    """llama.cpp's name for how the tokenizer splits text before BPE, found as llama.cpp's converter finds it; else,
    for a model converted from a GGUF file, that file's own name; else the name of the exact split llama.cpp
    implements. An unknown tokenizer is refused: a wrong name makes llama.cpp refuse the file, or tokenise
    differently without a word."""
    digest = check_hash(tokenizer)
    if digest in PRE_TOKENIZER_HASHES:
        return PRE_TOKENIZER_HASHES[digest][0]
    if source_gguf_pre:
        return source_gguf_pre
    same_split = _split_name(spec if spec is not None else json.loads(tokenizer.backend_tokenizer.to_str()))
    if same_split:
        return same_split
    known = ", ".join(sorted({f"{name} ({model})" for name, model in PRE_TOKENIZER_HASHES.values()}))
    raise UsageError(f"tokenizer: llama.cpp does not know this tokenizer's pre-tokenizer (check hash {digest[:16]}, "
                     f"as llama.cpp's convert_hf_to_gguf.py computes it, is none of: {known}); a fine-tune keeps its "
                     "base model's tokenizer, so export from a folder whose tokenizer files are the base's, or use "
                     "llama.cpp's own convert_hf_to_gguf.py if it knows this model")


def _split_name(spec: dict) -> str | None:
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    byte_level = steps[-1] if kinds and kinds[-1] == "ByteLevel" else None
    if byte_level is None or byte_level.get("add_prefix_space", False):
        return None
    if kinds == ["ByteLevel"] and byte_level.get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and byte_level.get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not byte_level.get("use_regex", True) and \
            steps[0].get("behavior") == "Isolated" and not steps[0].get("invert"):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        return next((name for name, pattern in PRE_TOKENIZER_SPLITS.items() if regex == pattern), None)
    return None
