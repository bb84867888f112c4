"""The GGUF's tensors: llama.cpp names, layout and types, read one at a time from the source."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from ..errors import RunFailure, UsageError
from .source import Source


@dataclass
class PlannedTensor:
    name: str  # GGUF name, e.g. blk.0.attn_q.weight
    source: str  # HF name, e.g. model.layers.0.self_attn.q_proj.weight
    shape: tuple[int, ...]  # HF (row-major) shape; GGUF lists dimensions the other way round, the writer flips them
    qtype: Any  # gguf.GGMLQuantizationType
    computed: bool = False  # made from the config (rope_freqs), not read from the checkpoint

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
    if not tied and "lm_head.weight" not in source.weights.shapes:
        raise UsageError(f"MODEL_DIR {source.folder}: untied embeddings but no lm_head.weight in the checkpoint")
    wanted = {"f16": gguf.GGMLQuantizationType.F16, "bf16": gguf.GGMLQuantizationType.BF16,
              "q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0,
              "f32": gguf.GGMLQuantizationType.F32}[outtype]
    plan = []
    for hf_name, shape in source.weights.shapes.items():
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
        elif qtype == gguf.GGMLQuantizationType.Q4_0 and mapped in ("token_embd", "output") and \
                (mapped == "output" or tied):
            qtype = gguf.GGMLQuantizationType.Q8_0  # the output matrix stays 8-bit, as llama-quantize keeps it
        if qtype.name in _QUANTISED and shape[-1] % gguf.GGML_QUANT_SIZES[qtype][0]:
            qtype = gguf.GGMLQuantizationType.F16  # rows must split into whole 32-value blocks
        plan.append(PlannedTensor(f"{mapped}.{suffix}", hf_name, shape, qtype))
    if source.rope()[1] == "llama3":
        plan.append(PlannedTensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", "rope_freqs",
                                  (source.head_dim // 2,), gguf.GGMLQuantizationType.F32, computed=True))
    if source.rope()[1] == "longrope":
        for kind in (gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT):
            plan.append(PlannedTensor(gguf.TENSOR_NAMES[kind] + ".weight", gguf.TENSOR_NAMES[kind],
                                      (source.head_dim // 2,), gguf.GGMLQuantizationType.F32, computed=True))
    return sorted(plan, key=_gguf_order)


_QUANTISED = {"Q8_0", "Q4_0"}


def _gguf_order(t: PlannedTensor) -> tuple:
    """token_embd first, then block by block, then the output norm and head, as llama.cpp's converter orders them."""
    m = re.match(r"blk\.(\d+)\.", t.name)
    return (1, int(m.group(1)), t.name) if m else (0 if t.name.startswith("token_embd") else 2, 0, t.name)


class TensorReader:
    """Source tensors one at a time, in fp32, already in llama.cpp's layout."""

    def __init__(self, source: Source):
        self.source = source

    def read(self, t: PlannedTensor) -> Any:
        import torch

        if t.computed:
            if t.source.startswith("rope_factors_"):  # Phi-3's LongRoPE
                short, long, _, _ = self.source.longrope()
                return long if t.source == "rope_factors_long" else short
            return self.source.rope_freq_divisors()
        tensor = self.source.weights.read(t.source).to(torch.float32)
        if self.source.arch.norm_shift and t.source.endswith("norm.weight"):
            tensor = tensor + self.source.arch.norm_shift
        if self.source.arch.permute_qk and re.search(r"\.attn_[qk]\.(weight|bias)$", t.name):
            c = self.source.config
            tensor = rope_rows_to_pairs(tensor, c.num_attention_heads if ".attn_q." in t.name
                                        else c.num_key_value_heads)
        return tensor.numpy()

    def close(self) -> None:
        self.source.weights.close()


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


def stored_values(t: PlannedTensor, values: Any) -> Any:
    """fp32 numpy values -> the fp32 values the GGUF holds for them once llama.cpp dequantises (or widens) them."""
    import gguf
    import numpy as np

    encoded = encode_tensor(t, values)
    if t.qtype in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32):
        return encoded.astype(np.float32)
    return gguf.quants.dequantize(encoded, t.qtype).astype(np.float32, copy=False)


def round_as_stored(model: Any, plan: list[PlannedTensor]) -> None:
    """Give the source model (transformers, fp32) the weights the GGUF stores, rounded exactly as the file rounds
    them (quantisation blocks run along rows, which the q/k reordering only permutes): a reference that differs from
    the file only in how the runtime computes, not in what --outtype drops."""
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for t in plan:
            if t.computed or t.qtype.name == "F32":
                continue
            p = params[t.source]
            p.copy_(torch.from_numpy(stored_values(t, p.detach().to(torch.float32).numpy())).reshape(p.shape))
