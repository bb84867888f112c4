"""Writing the GGUF file: llama.cpp's metadata keys, then the tensors one at a time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .source import GEMMA, Source
from .tensors import PlannedTensor, TensorReader, encode_tensor
from .vocab import Vocab


def file_type(outtype: str) -> int:
    import gguf

    return int({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[outtype])


def add_metadata(writer: Any, source: Source, vocab: Vocab, outtype: str, name: str) -> None:
    """The model's shape under llama.cpp's keys for its architecture, then the tokenizer."""
    import gguf

    c = source.config
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_file_type(file_type(outtype))
    if outtype in ("q8_0", "q4_0"):
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
    if source.rope()[1] == "longrope":  # llama.cpp takes the long factors when its context exceeds the original
        _, _, attention, original = source.longrope()
        writer.add_rope_scaling_orig_ctx_len(original)
        writer.add_rope_scaling_attn_factors(attention)
    if source.head_dim != c.hidden_size // c.num_attention_heads:  # e.g. Mistral Nemo: heads wider than hidden/n
        writer.add_key_length(source.head_dim)
        writer.add_value_length(source.head_dim)
    if source.arch.gguf in GEMMA:
        add_gemma_metadata(writer, source)
    writer.add_vocab_size(len(vocab.tokens))
    add_tokenizer_metadata(writer, vocab)


def add_gemma_metadata(writer: Any, source: Source) -> None:
    """Gemma 2/3: which layers attend over a sliding window (and how far), their RoPE base, logit soft-capping."""
    c = source.config
    window = getattr(c, "sliding_window", None)
    layer_types = getattr(c, "layer_types", None)
    if window and layer_types:
        writer.add_sliding_window(window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in layer_types])
        writer.add_rope_freq_base_swa(source.rope("sliding_attention")[0])
    for key, add in (("attn_logit_softcapping", writer.add_attn_logit_softcapping),
                     ("final_logit_softcapping", writer.add_final_logit_softcapping)):
        if getattr(c, key, None):
            add(float(getattr(c, key)))


def add_tokenizer_metadata(writer: Any, vocab: Vocab) -> None:
    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id, "unk": writer.add_unk_token_id,
              "pad": writer.add_pad_token_id, "eot": writer.add_eot_token_id}
    for key, token_id in vocab.special.items():
        adders[key](token_id)
    writer.add_add_bos_token(vocab.add_bos)
    writer.add_add_eos_token(vocab.add_eos)
    writer.add_add_space_prefix(vocab.add_space_prefix)
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
