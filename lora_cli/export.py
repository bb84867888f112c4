"""lora-export: a merged Hugging Face model to one GGUF file for llama.cpp, Ollama and LM Studio, checked by loading
it back.

Weights stream from the safetensors into the GGUF one tensor at a time, so memory stays near the largest tensor. The
tokenizer (vocabulary, merges, pre-tokenizer, special tokens, BOS/EOS behaviour) and the chat template go into the
GGUF metadata under llama.cpp's key names. With --ollama the chat template is also translated into a Modelfile
TEMPLATE in Go template syntax: probe conversations with sentinel contents are rendered with the Jinja template, the
text around each sentinel gives the role prefixes and suffixes, and the translation is accepted only if it renders
the same text as the Jinja template.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import chat
from .config import opt
from .errors import RunFailure, UsageError

log = logging.getLogger("lora_cli")

OUTTYPES = ("f16", "bf16", "q8_0", "f32")
INDEX = "model.safetensors.index.json"


@dataclass(frozen=True)
class Arch:
    gguf: str  # llama.cpp's architecture name
    # HF rotates the two halves of each head (NeoX style); llama.cpp's llama graph rotates adjacent pairs, so q/k rows
    # are reordered on the way. Its qwen2 graph uses the NeoX layout itself.
    permute_qk: bool
    display: str


ARCHS = {"llama": Arch("llama", True, "Llama (incl. SmolLM)"), "mistral": Arch("llama", True, "Mistral"),
         "qwen2": Arch("qwen2", False, "Qwen2")}
SUPPORTED = ", ".join(f"{a.display} [{name}]" for name, a in ARCHS.items())

# Gates on the next-token logits of the exported model (loaded back with transformers) against the source, both run
# in fp32: the difference is the rounding of the weights to --outtype. Relative to the logit scale (the largest
# |logit| of the source on the same prompts), so that tiny random models and real ones share the numbers.
TOLERANCES = {"f32": {"max_rel_logit_diff": 1e-4, "max_kl": 1e-6},
              "f16": {"max_rel_logit_diff": 1e-2, "max_kl": 2e-3},
              "bf16": {"max_rel_logit_diff": 5e-2, "max_kl": 2e-2},
              "q8_0": {"max_rel_logit_diff": 1e-1, "max_kl": 5e-2}}
# Text the tokenizer check encodes besides the rendered prompts: unicode, odd whitespace, digits, special tokens.
TRICKY_STRINGS = ["naïve café, Zürich — 東京 🙂 ﬁ", "  two leading spaces and trailing  ",
                  "tabs\tand\n\nnewlines\r\n", "12345 3.14159 -0.5e10", "don't I'LL we've",
                  "<|im_start|>user\nhi<|im_end|>", "a\u00a0b\u200bc", "```python\nprint('x')\n```"]


@dataclass
class ExportConfig:
    PROG = "lora-export"
    DESCRIPTION = ("Convert a merged model folder (from lora-merge, or any Hugging Face Llama, Mistral, Qwen2 or "
                   "SmolLM model) to one GGUF file for llama.cpp, Ollama and LM Studio, with its tokenizer and chat "
                   "template; optionally write an Ollama Modelfile next to it. The file is then loaded back with "
                   "transformers and compared with the source model.")
    EPILOG = "Example: lora-export runs/demo-merged runs/demo.gguf --ollama"
    GROUPS = {"io": "input and output", "export": "export", "verify": "verification", "run": "run"}

    model_dir: str = opt("", "Model folder to convert (config.json, safetensors and tokenizer), e.g. what "
                             "lora-merge wrote.", group="io", metavar="MODEL_DIR", positional=True)
    out: str = opt("", "GGUF file to write (.gguf); it must not exist unless --overwrite.", group="io",
                   metavar="OUT", positional=True)
    overwrite: bool = opt(False, "Replace an existing OUT (and Modelfile), once the new one is complete.", group="io")
    outtype: str = opt("f16", "Weight type of the 2-D tensors: f16, bf16, q8_0 (8-bit, about half the size of f16) "
                              "or f32; norms always stay f32.", group="export", choices=OUTTYPES)
    ollama: bool = opt(False, "Also write an Ollama Modelfile next to OUT (OUT without .gguf, plus .Modelfile): "
                              "FROM, the chat template as a Go TEMPLATE, the default system prompt and the stop "
                              "tokens.", group="export")
    verify: bool = opt(True, "Load OUT back with transformers and compare next-token logits and token ids with the "
                             "source model on chat-formatted prompts; exit 1 beyond tolerance. Skipped with a "
                             "warning when the model would not fit in memory.", group="verify")
    debug: bool = opt(False, "Show full tracebacks and library warnings.", group="run")

    def problems(self) -> list[str]:
        errors = model_dir_problems(self.model_dir) if self.model_dir else \
            ["MODEL_DIR is required (a merged model folder, e.g. from lora-merge)"]
        if not self.out:
            errors.append("OUT is required (the .gguf file to write)")
        else:
            errors += out_problems(Path(self.out), self.overwrite, self.ollama)
        return errors


def model_dir_problems(model_dir: str) -> list[str]:
    """Why MODEL_DIR cannot be exported, read from its files alone (no torch)."""
    folder = Path(model_dir)
    if not folder.exists():
        return [f"MODEL_DIR {model_dir}: not found"]
    if folder.is_file():
        if folder.suffix.lower() == ".gguf":
            return [f"MODEL_DIR {model_dir}: already a GGUF file; lora-export converts a Hugging Face model folder"]
        return [f"MODEL_DIR {model_dir}: a file, not a model folder"]
    if not (folder / "config.json").is_file():
        if (folder / "adapter_config.json").is_file():
            return [f"MODEL_DIR {model_dir}: a LoRA adapter, not a model; merge it first "
                    f"(lora-merge {model_dir} {folder.with_name(folder.name + '-merged')}) and export the merged "
                    "folder"]
        return [f"MODEL_DIR {model_dir}: no config.json, not a Hugging Face model folder"]
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"MODEL_DIR {model_dir}: config.json cannot be read ({exc})"]
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ARCHS:
        return [f"MODEL_DIR {model_dir}: architecture {model_type!r} is not supported; lora-export supports "
                f"{SUPPORTED}"]
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantised")
        return [f"MODEL_DIR {model_dir}: a pre-quantised ({method}) checkpoint; export the full-precision model"]
    if not (folder / INDEX).is_file() and not (folder / "model.safetensors").is_file():
        return [f"MODEL_DIR {model_dir}: no safetensors weights (model.safetensors or {INDEX}); save the model with "
                "save_pretrained() first"]
    return []


def modelfile_path(out: Path) -> Path:
    return out.with_suffix(".Modelfile")


def out_problems(out: Path, overwrite: bool, ollama: bool) -> list[str]:
    if out.suffix.lower() != ".gguf":
        return [f"OUT {out}: must end in .gguf"]
    if out.is_dir():
        return [f"OUT {out}: is a folder; give the file name to write, ending in .gguf"]
    errors = []
    for path in [out] + ([modelfile_path(out)] if ollama else []):
        if path.exists() and not overwrite:
            errors.append(f"{'OUT' if path == out else 'Modelfile'} {path}: already exists; pass --overwrite to "
                          "replace it, or choose another name")
    return errors


# --- the source model -----------------------------------------------------------------------------------------------

@dataclass
class Source:
    folder: Path
    config: Any  # transformers PretrainedConfig
    arch: Arch
    files: dict[str, Path]  # tensor name -> safetensors file holding it
    shapes: dict[str, tuple[int, ...]]

    @property
    def head_dim(self) -> int:
        c = self.config
        return getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads

    def rope(self) -> tuple[float, str]:
        """(rope theta, rope type), from transformers 5's rope_parameters or the older rope_theta/rope_scaling."""
        c = self.config
        params = getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {}
        theta = params.get("rope_theta", getattr(c, "rope_theta", None)) or 10000.0
        return float(theta), params.get("rope_type") or params.get("type") or "default"


def open_source(folder: Path) -> Source:
    from safetensors import safe_open
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    index = folder / INDEX
    names = list(dict.fromkeys(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())) \
        if index.is_file() else ["model.safetensors"]
    files, shapes = {}, {}
    for name in names:
        path = folder / name
        if not path.is_file():
            raise UsageError(f"MODEL_DIR {folder}: shard {name} listed in {INDEX} is missing")
        with safe_open(path, framework="pt") as f:
            for key in f.keys():
                files[key] = path
                shapes[key] = tuple(f.get_slice(key).get_shape())
    source = Source(folder, config, ARCHS[config.model_type], files, shapes)
    rope_type = source.rope()[1]
    if rope_type != "default":
        raise UsageError(f"MODEL_DIR {folder}: rope scaling {rope_type!r} is not supported by lora-export yet (only "
                         "plain RoPE)")
    window = getattr(config, "sliding_window", None)
    if window and getattr(config, "use_sliding_window", True) and window < config.max_position_embeddings:
        log.warning("the model attends over a sliding window of %d tokens, which llama.cpp's %s graph does not: "
                    "outputs match only while the context is shorter", window, source.arch.gguf)
    return source


# --- weights: names, layout and types -------------------------------------------------------------------------------

@dataclass
class PlannedTensor:
    name: str  # GGUF name, e.g. blk.0.attn_q.weight
    source: str  # HF name, e.g. model.layers.0.self_attn.q_proj.weight
    shape: tuple[int, ...]  # HF (row-major) shape; GGUF lists dimensions the other way round, the writer flips them
    qtype: Any  # gguf.GGMLQuantizationType

    @property
    def nbytes(self) -> int:
        import gguf

        block, size = gguf.GGML_QUANT_SIZES[self.qtype]
        return math.prod(self.shape) // block * size


def plan_tensors(source: Source, outtype: str) -> list[PlannedTensor]:
    """Every tensor the GGUF gets, its llama.cpp name and its type; the tied lm_head is left out (llama.cpp reuses
    token_embd when there is no output.weight)."""
    import gguf

    arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == source.arch.gguf)
    names = gguf.get_tensor_name_map(arch, source.config.num_hidden_layers)
    tied = bool(getattr(source.config, "tie_word_embeddings", False))
    if not tied and "lm_head.weight" not in source.shapes:
        raise UsageError(f"MODEL_DIR {source.folder}: untied embeddings but no lm_head.weight in the checkpoint")
    wanted = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0, "f32": gguf.GGMLQuantizationType.F32}[outtype]
    plan = []
    for hf_name, shape in source.shapes.items():
        if hf_name.endswith("rotary_emb.inv_freq") or (tied and hf_name == "lm_head.weight"):
            continue  # recomputed by every runtime / the same matrix as the embeddings
        base, _, suffix = hf_name.rpartition(".")
        mapped = names.get_name(base)
        if mapped is None:
            raise UsageError(f"MODEL_DIR {source.folder}: tensor {hf_name} has no llama.cpp {source.arch.gguf} "
                             "equivalent; is this a plain checkpoint of a supported architecture?")
        qtype = wanted
        if len(shape) < 2:
            qtype = gguf.GGMLQuantizationType.F32  # norms and biases: tiny, and llama.cpp computes them in f32
        elif qtype == gguf.GGMLQuantizationType.Q8_0 and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16  # rows must split into whole 32-value blocks
        plan.append(PlannedTensor(f"{mapped}.{suffix}", hf_name, shape, qtype))
    return sorted(plan, key=_gguf_order)


def _gguf_order(t: PlannedTensor) -> tuple:
    """token_embd first, then block by block, then the output norm and head, as llama.cpp's converter orders them."""
    m = re.match(r"blk\.(\d+)\.", t.name)
    return (1, int(m.group(1)), t.name) if m else (0 if t.name.startswith("token_embd") else 2, 0, t.name)


class TensorReader:
    """Source tensors one at a time, in fp32, already in llama.cpp's layout."""

    def __init__(self, source: Source):
        self.source = source
        self.handles: dict[Path, Any] = {}

    def read(self, t: PlannedTensor) -> Any:
        import torch
        from safetensors import safe_open

        path = self.source.files[t.source]
        if path not in self.handles:
            self.handles[path] = safe_open(path, framework="pt")
        tensor = self.handles[path].get_tensor(t.source).to(torch.float32)
        if self.source.arch.permute_qk and re.search(r"\.attn_[qk]\.(weight|bias)$", t.name):
            c = self.source.config
            tensor = rope_rows_to_pairs(tensor, c.num_attention_heads if ".attn_q." in t.name
                                        else c.num_key_value_heads)
        return tensor.numpy()

    def close(self) -> None:
        self.handles.clear()


def rope_rows_to_pairs(w: Any, n_heads: int) -> Any:
    """Reorder each head's rows from (first half, second half) to interleaved pairs (0, d/2, 1, d/2+1, ...), the
    order in which llama.cpp's llama graph applies rotary embeddings."""
    half = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def encode_tensor(t: PlannedTensor, values: Any) -> Any:
    """fp32 numpy values -> the bytes GGUF stores for t.qtype."""
    import gguf
    import numpy as np

    if t.qtype == gguf.GGMLQuantizationType.F16:
        out = values.astype(np.float16)
        if not np.isfinite(out).all() and np.isfinite(values).all():
            raise RunFailure(f"tensor {t.source} has values beyond the f16 range (65504); use --outtype bf16 or f32")
        return out
    if t.qtype == gguf.GGMLQuantizationType.F32:
        return values.astype(np.float32, copy=False)
    return gguf.quants.quantize(values, t.qtype)


# --- the tokenizer --------------------------------------------------------------------------------------------------

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


# --- writing the GGUF -----------------------------------------------------------------------------------------------

def file_type(outtype: str) -> int:
    import gguf

    return int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype])


def add_metadata(writer: Any, source: Source, vocab: Vocab, outtype: str, name: str) -> None:
    """The model's shape under llama.cpp's keys for its architecture, then the tokenizer."""
    import gguf

    c = source.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type(outtype))
    if outtype == "q8_0":
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(source.rope()[0])
    writer.add_rope_dimension_count(source.head_dim)
    if source.head_dim != c.hidden_size // c.num_attention_heads:  # e.g. Mistral Nemo: heads wider than hidden/n
        writer.add_key_length(source.head_dim)
        writer.add_value_length(source.head_dim)
    writer.add_vocab_size(len(vocab.tokens))
    add_tokenizer_metadata(writer, vocab)


def add_tokenizer_metadata(writer: Any, vocab: Vocab) -> None:
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.types)
    writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
    for key, token_id in vocab.special.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)


def write_gguf(path: Path, source: Source, plan: list[PlannedTensor], vocab: Vocab, outtype: str, name: str) -> None:
    """Metadata and tensor directory first, then the tensors one at a time: memory stays near one tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(None, source.arch.gguf)
    add_metadata(writer, source, vocab, outtype, name)
    for t in plan:
        raw = t.qtype not in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32)
        shape = gguf.quant_shape_to_byte_shape(t.shape, t.qtype) if raw else t.shape
        dtype = np.uint8 if raw else (np.float16 if t.qtype == gguf.GGMLQuantizationType.F16 else np.float32)
        writer.add_tensor_info(t.name, shape, np.dtype(dtype), t.nbytes, raw_dtype=t.qtype if raw else None)
    reader = TensorReader(source)
    try:
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            writer.write_tensor_data(encode_tensor(t, reader.read(t)))
    finally:
        writer.close()
        reader.close()


# --- the chat template as an Ollama Modelfile -----------------------------------------------------------------------

SENTINELS = {"system": "LCXSYSTEM0", "user1": "LCXUSER1", "assistant1": "LCXASSISTANT1", "user2": "LCXUSER2",
             "assistant2": "LCXASSISTANT2"}


@dataclass
class ChatShape:
    """A chat template reduced to text around each turn: the shape of ChatML, Llama-3 and [INST] templates."""

    pre: str  # once at the start (e.g. <|begin_of_text|> when the runtime does not add BOS itself)
    system: tuple[str, str] | None  # (prefix, suffix) around the system prompt; None: the template drops it
    user: tuple[str, str]
    assistant: tuple[str, str]
    generation: str  # after the last user turn, where the model's answer starts
    default_system: str = ""  # the system prompt the template inserts when the conversation has none
    system_always: bool = False  # the system turn is written even when empty (Llama 3.1: a header with dates)
    dropped_bos: str = ""  # template text left to the runtime, which adds BOS itself
    trims_content: bool = False  # the template strips whitespace around message contents; Go templates cannot


class Untranslatable(UsageError):
    def __init__(self, why: str):
        super().__init__(f"--ollama: cannot translate the chat template into an Ollama TEMPLATE: {why}; export "
                         "without --ollama (the GGUF keeps the Jinja template for llama.cpp and LM Studio)")


def chat_shape(tokenizer: Any, adds_bos: bool) -> ChatShape:
    """Derive the turn prefixes and suffixes by rendering probe conversations whose contents are sentinels."""
    s = SENTINELS

    def render(roles_contents: list[tuple[str, str]], generation: bool = False) -> str:
        messages = [{"role": r, "content": c} for r, c in roles_contents]
        try:
            return chat.render(tokenizer, messages, add_generation_prompt=generation)
        except Exception as exc:  # noqa: BLE001 - jinja raises many types, raise_exception() included
            raise Untranslatable(f"rendering a probe conversation failed ({' '.join(str(exc).split())[:200]})") \
                from None

    u1, a1, u2 = ("user", s["user1"]), ("assistant", s["assistant1"]), ("user", s["user2"])
    before_user, user_suffix = _split(render([u1]), [s["user1"]])
    generation = _after(render([u1], True), before_user + s["user1"] + user_suffix, "the generation prompt")
    mid = _split(render([u1, a1, u2]), [s["user1"], s["assistant1"], s["user2"]])
    if mid[0] != before_user or mid[3] != user_suffix:
        raise Untranslatable("the first user turn renders differently once more turns follow")
    assistant_prefix = _after(mid[1], user_suffix, "the assistant prefix")
    closed = _split(render([u1, a1]), [s["user1"], s["assistant1"]])
    assistant_suffix = closed[2]
    user_prefix = _after(mid[2], assistant_suffix, "the user prefix")
    if not before_user.endswith(user_prefix):
        raise Untranslatable("the first user turn is introduced differently from later ones")
    head = before_user[:len(before_user) - len(user_prefix)]
    shape = ChatShape(head, None, (user_prefix, user_suffix), (assistant_prefix, assistant_suffix), generation)
    bos = (tokenizer.bos_token or "") if adds_bos else ""
    _add_system(shape, render, head, bos)
    if bos and shape.pre.startswith(bos):  # llama.cpp adds BOS itself: keep one, not two
        shape.pre, shape.dropped_bos = shape.pre[len(bos):], bos
    padded = " \n" + s["user1"] + " \n"
    shape.trims_content = padded not in render([("user", padded)])
    return shape


def _add_system(shape: ChatShape, render, head: str, bos: str) -> None:
    """Find the system prompt's prefix and suffix, and a default system prompt the template adds on its own. `bos`:
    the BOS text the runtime adds itself (empty when it does not)."""
    s = SENTINELS
    try:
        text = render([("system", s["system"]), ("user", s["user1"])])
    except Untranslatable:  # e.g. Mistral's templates raise on a system message: no system prompt in Ollama either
        text = None
    if text is None or s["system"] not in text:
        if text is not None and text != render([("user", s["user1"])]):
            raise Untranslatable("the template folds the system prompt into another turn")
        return
    before_system, between, after = _split(text, [s["system"], s["user1"]])
    if after != shape.user[1] or not between.endswith(shape.user[0]):
        raise Untranslatable("the system prompt changes how the user turn renders")
    system_suffix = between[:len(between) - len(shape.user[0])]
    if before_system.startswith(head):  # no default system prompt: what precedes the first user turn is the preamble
        shape.system = (before_system[len(head):], system_suffix)
        return
    if not (head.startswith(before_system) and head.endswith(system_suffix) and
            len(head) >= len(before_system) + len(system_suffix)):
        raise Untranslatable("a conversation without a system message renders neither plainly nor with a default "
                             "system prompt")
    # The system turn is always there (with the Modelfile's SYSTEM, or empty): only a leading BOS stays outside it.
    shape.pre = bos if bos and before_system.startswith(bos) else ""
    shape.system = (before_system[len(shape.pre):], system_suffix)
    shape.default_system = head[len(before_system):len(head) - len(system_suffix)]
    shape.system_always = not shape.default_system


def _split(text: str, sentinels: list[str]) -> list[str]:
    """text around the sentinels, which must each appear exactly once and in order."""
    pieces, rest = [], text
    for sentinel in sentinels:
        if text.count(sentinel) != 1:
            raise Untranslatable(f"a message content is rendered {text.count(sentinel)} times instead of once")
        before, _, rest = rest.partition(sentinel)
        pieces.append(before)
    return pieces + [rest]


def _after(text: str, prefix: str, what: str) -> str:
    if not text.startswith(prefix):
        raise Untranslatable(f"cannot isolate {what}: turns do not render the same way in every position")
    return text[len(prefix):]


def go_template(shape: ChatShape) -> str:
    """The Ollama TEMPLATE. Ollama passes the turns as .Messages and the system prompt (the request's, else the
    Modelfile's SYSTEM) as .System; the last assistant turn is left open, as Ollama continues it."""
    head = _go_text(shape.pre, line_end=shape.system is None)
    if shape.system:
        turn = _go_text(shape.system[0]) + "{{ .System }}" + _go_text(shape.system[1], line_end=shape.system_always)
        head += turn if shape.system_always else "{{ if .System }}" + turn + "{{ end }}"
    user = '{{- if eq .Role "user" }}' + _go_text(shape.user[0]) + "{{ .Content }}" + \
        _go_text(shape.user[1], line_end=not shape.generation)
    if shape.generation:
        user += "{{ if $last }}" + _go_text(shape.generation) + "{{ end }}"
    assistant = '{{- else if eq .Role "assistant" }}' + _go_text(shape.assistant[0]) + "{{ .Content }}"
    if shape.assistant[1]:
        assistant += "{{ if not $last }}" + _go_text(shape.assistant[1]) + "{{ end }}"
    lines = [head, "{{- range $i, $_ := .Messages }}", "{{- $last := eq (len (slice $.Messages $i)) 1 }}", user,
             assistant, "{{- end }}", "{{- end }}"]
    return "\n".join(line for line in lines if line)


def _go_text(text: str, line_end: bool = False) -> str:
    """Template text as a Go literal; as a quoted string where it holds braces, or where it ends a line in trailing
    whitespace that the next line's {{- would otherwise trim."""
    if "{" in text or "}" in text or (line_end and text != text.rstrip()):
        return "{{ " + json.dumps(text, ensure_ascii=False) + " }}"
    return text


def stop_tokens(tokenizer: Any, shape: ChatShape) -> list[str]:
    """The special tokens that end an assistant turn (in the order the template writes them), else EOS."""
    suffix = shape.assistant[1]
    found = sorted((suffix.find(s), s) for s in chat._special_strings(tokenizer) if s in suffix)
    stops = [s for _, s in found]
    if not stops and tokenizer.eos_token:
        stops.append(tokenizer.eos_token)
    return list(dict.fromkeys(stops))


def ollama_data(messages: list[dict], default_system: str = "") -> dict:
    """What Ollama hands the template: the messages, consecutive ones of the same role joined, and the system
    prompts joined (else the Modelfile's SYSTEM, which Ollama puts first)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    if not system and default_system:
        system, messages = default_system, [{"role": "system", "content": default_system}, *messages]
    collated: list[dict] = []
    for m in messages:
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
        else:
            collated.append({"Role": m["role"], "Content": m["content"]})
    return {"System": system, "Messages": collated}


def check_translation(tokenizer: Any, shape: ChatShape, template: str) -> int:
    """Render probe and real conversations with both templates; any difference refuses the translation. Returns the
    number of renderings compared."""
    from .merge import BUILTIN_PROMPTS

    s = SENTINELS
    system = [{"role": "system", "content": s["system"]}]
    turns = [{"role": r, "content": s[k]} for r, k in
             (("user", "user1"), ("assistant", "assistant1"), ("user", "user2"), ("assistant", "assistant2"))]
    conversations = [turns[:1], turns[:3], turns, system + turns[:3], system + turns]
    for real in BUILTIN_PROMPTS:
        conversations += [real[:-1], real]
    for messages in conversations:
        ends_open = messages[-1]["role"] == "assistant"
        expected = chat.render(tokenizer, messages, add_generation_prompt=not ends_open)
        if not expected.startswith(shape.dropped_bos):
            raise Untranslatable("the template does not always start with BOS")
        expected = expected[len(shape.dropped_bos):]
        got = render_go_template(template, ollama_data(messages, shape.default_system))
        if ends_open:  # Ollama continues the last assistant turn; the Jinja rendering closes it
            got += shape.assistant[1]
        if got != expected:
            at = len(os.path.commonprefix([got, expected]))
            raise Untranslatable(f"the translation renders {got[at:at + 40]!r} where the Jinja template renders "
                                 f"{expected[at:at + 40]!r} (after {expected[max(0, at - 40):at]!r})")
    return len(conversations)


@dataclass
class Modelfile:
    text: str
    shape: ChatShape
    stops: list[str]
    name: str  # suggested Ollama model name


def ollama_modelfile(tokenizer: Any, vocab: Vocab, out: Path, model_dir: Path) -> Modelfile:
    """The Modelfile for OUT, or Untranslatable (exit 2) before anything is written."""
    if not vocab.chat_template:
        raise Untranslatable("the tokenizer has no chat template (lora-merge copies the one used in training)")
    shape = chat_shape(tokenizer, vocab.add_bos)
    template = go_template(shape)
    check_translation(tokenizer, shape, template)
    if '"""' in template or '"""' in shape.default_system:
        raise Untranslatable('the template contains """, which a Modelfile cannot quote')
    if shape.trims_content:
        log.warning("the chat template strips whitespace around message contents and Ollama's TEMPLATE cannot; "
                    "prompts differ only for messages that start or end with whitespace")
    if shape.system is None:
        log.warning("the chat template has no system turn: system prompts are dropped, in Ollama as in the template")
    stops = stop_tokens(tokenizer, shape)
    name = re.sub(r"[^a-z0-9._-]+", "-", out.stem.lower()).strip("-") or "model"
    lines = [f"# Ollama Modelfile written by lora-export from {model_dir}.",
             f"# Create and run:  ollama create {name} -f {modelfile_path(out).name}  &&  ollama run {name}",
             f"FROM ./{out.name}", "", f'TEMPLATE """{template}"""', ""]
    if shape.default_system:
        lines += [f'SYSTEM """{shape.default_system}"""', ""]
    lines += [f"PARAMETER stop {json.dumps(stop, ensure_ascii=False)}" for stop in stops]
    return Modelfile("\n".join(lines) + "\n", shape, stops, name)


# --- a small Go text/template renderer, for the constructs go_template() writes -------------------------------------
# if / else if / else / end, range with $i, $_ variables, := assignments, fields of . and $, string and integer
# literals, parentheses, and the functions eq, ne, and, or, not, len, slice and index.

_GO_TOKEN = re.compile(r'\(|\)|"(?:\\.|[^"\\])*"|:=|,|[^\s(),]+')
_GO_FUNCS = {
    "eq": lambda a, *bs: any(a == b for b in bs), "ne": lambda a, b: a != b, "not": lambda a: not _go_truth(a),
    "and": lambda *xs: next((x for x in xs if not _go_truth(x)), xs[-1]),
    "or": lambda *xs: next((x for x in xs if _go_truth(x)), xs[-1]),
    "len": len, "slice": lambda x, i=0, j=None: x[i:j], "index": lambda x, *keys: _go_index(x, keys),
}


def _go_index(x: Any, keys: tuple) -> Any:
    for key in keys:
        x = x[key]
    return x


def _go_truth(value: Any) -> bool:
    return value not in (None, False, 0, "") and not (isinstance(value, (list, dict)) and not value)


def render_go_template(template: str, data: dict) -> str:
    nodes, _, end = _go_parse(_go_lex(template), 0)
    if end is not None:
        raise ValueError(f"unexpected {{{{ {end} }}}}")
    out: list[str] = []
    _go_exec(nodes, data, {"$": data}, out)
    return "".join(out)


def _go_lex(template: str) -> list[tuple[str, str]]:
    """[("text", ...), ("action", ...)], with {{- and -}} already applied to the neighbouring text."""
    items: list[tuple[str, str]] = []
    pos = 0
    while (start := template.find("{{", pos)) >= 0:
        text = template[pos:start]
        end = start + 2
        while not template.startswith("}}", end):  # skip over string literals, which may hold }}
            if end >= len(template):
                raise ValueError("unclosed action")
            end = _GO_TOKEN.match(template, end).end() if template[end] == '"' else end + 1
        action = template[start + 2:end]
        if action.startswith("- "):
            text, action = text.rstrip(), action[2:]
        items.append(("text", text))
        trim_next = action.endswith(" -")
        items.append(("action", action.removesuffix(" -").strip()))
        pos = end + 2
        if trim_next:
            pos = len(template) - len(template[pos:].lstrip())
    items.append(("text", template[pos:]))
    return [(kind, value) for kind, value in items if kind == "action" or value]


def _go_parse(items: list[tuple[str, str]], pos: int) -> tuple[list, int, str | None]:
    """Nodes up to the next end/else (returned as the third item), from items[pos]."""
    nodes: list = []
    while pos < len(items):
        kind, value = items[pos]
        pos += 1
        keyword = value.split(None, 1)[0] if kind == "action" and value else ""
        if kind == "text":
            nodes.append(("text", value))
        elif keyword in ("end", "else"):
            return nodes, pos, value
        elif keyword == "if":
            branches, condition = [], value[2:].strip()
            while True:
                body, pos, end = _go_parse(items, pos)
                branches.append((condition, body))
                if end is None:
                    raise ValueError("{{ if }} without {{ end }}")
                if end == "end":
                    break
                condition = end.removeprefix("else").strip().removeprefix("if").strip() or None
            nodes.append(("if", branches))
        elif keyword == "range":
            m = re.fullmatch(r"range\s+(?:(\$\w*)\s*(?:,\s*(\$\w*)\s*)?:=\s*)?(.+)", value, re.S)
            body, pos, end = _go_parse(items, pos)
            if end != "end":
                raise ValueError("{{ range }} without {{ end }}")
            nodes.append(("range", m.group(1), m.group(2), m.group(3), body))
        elif m := re.fullmatch(r"(\$\w+)\s*:?=\s*(.+)", value, re.S):
            nodes.append(("set", m.group(1), m.group(2)))
        else:
            nodes.append(("print", value))
    return nodes, pos, None


def _go_exec(nodes: list, dot: Any, scope: dict, out: list[str]) -> None:
    for node in nodes:
        kind = node[0]
        if kind == "text":
            out.append(node[1])
        elif kind == "print":
            value = _go_eval(node[1], dot, scope)
            out.append("<no value>" if value is None else str(value).lower() if isinstance(value, bool) else
                       str(value))
        elif kind == "set":
            scope[node[1]] = _go_eval(node[2], dot, scope)
        elif kind == "if":
            for condition, body in node[1]:
                if condition is None or _go_truth(_go_eval(condition, dot, scope)):
                    _go_exec(body, dot, dict(scope), out)
                    break
        elif kind == "range":
            _, index_var, value_var, expr, body = node
            if value_var is None:  # {{ range $x := ... }} names the element, not the index
                index_var, value_var = None, index_var
            for i, item in enumerate(_go_eval(expr, dot, scope) or []):
                inner = dict(scope)
                inner.update({k: v for k, v in ((index_var, i), (value_var, item)) if k})
                _go_exec(body, item, inner, out)


def _go_eval(expr: str, dot: Any, scope: dict) -> Any:
    tokens = _GO_TOKEN.findall(expr)
    value, pos = _go_command(tokens, 0, dot, scope)
    if pos != len(tokens):
        raise ValueError(f"cannot evaluate {expr!r}")
    return value


def _go_command(tokens: list[str], pos: int, dot: Any, scope: dict) -> tuple[Any, int]:
    """A function call or a single operand, up to a closing parenthesis or the end."""
    args: list[Any] = []
    function = tokens[pos] if pos < len(tokens) and tokens[pos] in _GO_FUNCS else None
    pos += function is not None
    while pos < len(tokens) and tokens[pos] != ")":
        if tokens[pos] == "(":
            value, pos = _go_command(tokens, pos + 1, dot, scope)
            pos += 1  # the closing parenthesis
        else:
            value, pos = _go_operand(tokens[pos], dot, scope), pos + 1
        args.append(value)
    if function is not None:
        return _GO_FUNCS[function](*args), pos
    if len(args) != 1:
        raise ValueError(f"cannot evaluate {' '.join(tokens)!r}")
    return args[0], pos


def _go_operand(token: str, dot: Any, scope: dict) -> Any:
    if token.startswith('"'):
        return json.loads(token)
    if re.fullmatch(r"-?\d+", token):
        return int(token)
    if token in ("true", "false"):
        return token == "true"
    if token.startswith("$"):
        name, _, path = token.partition(".")
        value = scope[name]
    elif token.startswith("."):
        value, path = dot, token[1:]
    else:
        raise ValueError(f"unknown function or value {token!r}")
    for part in filter(None, path.split(".")):
        value = value.get(part) if isinstance(value, dict) else getattr(value, part)
    return value


# --- verification ---------------------------------------------------------------------------------------------------

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
    from .merge import BUILTIN_PROMPTS

    if getattr(tokenizer, "chat_template", None):
        try:
            return [chat.encode(tokenizer, messages).input_ids for messages in BUILTIN_PROMPTS]
        except Exception as exc:  # noqa: BLE001 - jinja and the masking code raise many types
            log.warning("verifying on plain text: the chat template does not render the probe conversations (%s)",
                        " ".join(str(exc).split())[:200])
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


def next_token_logits(model: Any, conversations: list[list[int]]) -> list[Any]:
    import torch

    model.eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([ids])).logits[0].to(torch.float32) for ids in conversations]


def compare_logits(reference: list[Any], exported: list[Any], tolerance: dict[str, float]) -> dict[str, Any]:
    """Largest |logit difference| (absolute and relative to the largest |logit|), KL(source || export) of the next-token
    distributions at every position, and how often the most likely next token agrees."""
    import torch

    diff = max(float((r - e).abs().max()) for r, e in zip(reference, exported))
    scale = max(float(r.abs().max()) for r in reference) or 1.0
    kls, agree, positions = [], 0, 0
    for r, e in zip(reference, exported):
        logp, logq = torch.log_softmax(r.double(), -1), torch.log_softmax(e.double(), -1)
        kls.append((logp.exp() * (logp - logq)).sum(-1).clamp_min(0))
        agree += int((r.argmax(-1) == e.argmax(-1)).sum())
        positions += r.shape[0]
    kl = torch.cat(kls)
    result = {"prompts": len(reference), "positions": positions, "max_abs_logit_diff": diff, "logit_scale": scale,
              "max_rel_logit_diff": diff / scale, "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
              "top1_agreement": agree / positions, "tolerance": tolerance}
    result["passed"] = all(result[k] <= v for k, v in tolerance.items())
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
    reference = next_token_logits(AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32),
                                  conversations)
    gc.collect()
    try:
        with _gguf_progress_bar_off():
            exported_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001
        raise RunFailure(f"verification: transformers cannot load the written GGUF ({exc})") from None
    exported = next_token_logits(exported_model, conversations)
    del exported_model
    gc.collect()
    logits = compare_logits(reference, exported, TOLERANCES[outtype])
    return {"passed": logits["passed"] and tokens["passed"], "logits": logits, "tokenizer": tokens}


def log_verification(result: dict[str, Any], outtype: str) -> None:
    lg, tk = result["logits"], result["tokenizer"]
    log.info("logits vs source (%d positions): max |diff| %.3g = %.3g%% of the logit scale %.3g (limit %.3g%% for "
             "%s), KL mean %.2e max %.2e (limit %.0e), top-1 agreement %.1f%% -> %s", lg["positions"],
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


# --- the command ----------------------------------------------------------------------------------------------------

def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - missing files and broken configs raise many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise UsageError(f"MODEL_DIR {folder}: cannot load its tokenizer ({first})") from None


def check_disk_space(out: Path, plan: list[PlannedTensor]) -> None:
    import shutil

    need = sum(t.nbytes for t in plan)
    free = shutil.disk_usage(out.parent).free
    if free < need * 1.05:
        raise RunFailure(f"OUT {out}: the GGUF needs about {need / 2**30:.2f} GiB, only {free / 2**30:.2f} GiB free "
                         "on that disk")


def _write_text_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Write OUT (and the Modelfile), verify, report. Returns the report; RunFailure when verification fails."""
    start = time.perf_counter()
    folder, out = Path(cfg.model_dir), Path(cfg.out)
    source = open_source(folder)
    tokenizer = load_tokenizer(folder)
    vocab = build_vocab(tokenizer, source.config.vocab_size)
    modelfile = ollama_modelfile(tokenizer, vocab, out, folder) if cfg.ollama else None  # refuse before writing
    plan = plan_tensors(source, cfg.outtype)
    parameters = sum(math.prod(t.shape) for t in plan)
    log.info("exporting %s (%s, %d layers, %.1fM parameters) to %s as %s", folder, source.config.model_type,
             source.config.num_hidden_layers, parameters / 1e6, out, cfg.outtype)
    log.info("tokenizer: byte-level BPE, %d tokens (%d added, %d placeholders), %d merges, pre-tokenizer %s; %s; "
             "add BOS %s; chat template %s", len(vocab.tokens), vocab.added, vocab.padded, len(vocab.merges),
             vocab.pre, ", ".join(f"{k} {vocab.tokens[v]}" for k, v in vocab.special.items()),
             "on" if vocab.add_bos else "off", "kept" if vocab.chat_template else "none (llama.cpp will guess)")
    report: dict[str, Any] = {"model_dir": str(folder), "out": str(out), "outtype": cfg.outtype,
                              "architecture": source.arch.gguf, "tensors": len(plan), "parameters": parameters}
    report.update(write_verified(cfg, source, plan, tokenizer, vocab))
    if modelfile is not None:
        _write_text_atomically(modelfile_path(out), modelfile.text)
        report["modelfile"] = str(modelfile_path(out))
        log.info("wrote %s (TEMPLATE%s, stop %s): ollama create %s -f %s", modelfile_path(out),
                 ", default SYSTEM prompt" if modelfile.shape.default_system else "", " ".join(modelfile.stops),
                 modelfile.name, modelfile_path(out))
    report["seconds"] = round(time.perf_counter() - start, 1)
    verification = report["verification"]
    failed = not verification.get("skipped") and not verification["passed"]
    log.info("done: %s (%.1f MiB, %s) in %.1f s; %s", out, report["size_bytes"] / 2**20, cfg.outtype,
             report["seconds"], "not verified" if verification.get("skipped") else
             "VERIFICATION FAILED" if failed else "verified")
    if failed:
        raise RunFailure(f"verification failed: {out} differs from {folder} beyond tolerance for {cfg.outtype} "
                         "(numbers above)")
    return report


def write_verified(cfg: ExportConfig, source: Source, plan: list[PlannedTensor], tokenizer: Any,
                   vocab: Vocab) -> dict[str, Any]:
    """Write the GGUF under a temporary name next to OUT, verify it, then rename it to OUT (also when verification
    fails, as lora-merge does: the numbers say what is wrong, the file lets one look)."""
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    check_disk_space(out, plan)
    # Named per process rather than by mkstemp, whose private 0600 mode the finished file would keep.
    tmp = out.with_name(f".{out.stem}.partial-{os.getpid()}.gguf")
    try:
        write_gguf(tmp, source, plan, vocab, cfg.outtype, source.folder.resolve().name)
        counts: dict[str, int] = {}
        for t in plan:
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
        size = tmp.stat().st_size
        log.info("wrote %d tensors (%s), %.1f MiB", len(plan), ", ".join(f"{n} {k}" for k, n in counts.items()),
                 size / 2**20)
        verification = _verify_or_skip(cfg, source, tmp, tokenizer, vocab, sum(math.prod(t.shape) for t in plan))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return {"tensor_types": counts, "size_bytes": size, "verification": verification}


def _verify_or_skip(cfg: ExportConfig, source: Source, path: Path, tokenizer: Any, vocab: Vocab,
                    parameters: int) -> dict[str, Any]:
    from .merge import fits_in_memory

    if not cfg.verify:
        return {"skipped": "--no-verify"}
    if not fits_in_memory(parameters * 4 * 2):  # fp32 weights, twice while transformers dequantises the GGUF
        reason = f"the model needs about {parameters * 12 / 2**30:.1f} GiB to verify, more than is available"
        log.warning("verification skipped: %s", reason)
        return {"skipped": reason}
    result = verify(source, path, tokenizer, vocab, cfg.outtype)
    log_verification(result, cfg.outtype)
    return result
