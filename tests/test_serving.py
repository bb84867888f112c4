"""Outputs that load and serve everywhere: every folder lora_cli writes a tokenizer into (adapter, checkpoint, merged
model) names a tokenizer class transformers 4.x has too and carries the chat template in tokenizer_config.json as
well; adapters vLLM cannot serve are named when training starts."""

from __future__ import annotations

import json
from pathlib import Path

from .conftest import TINY_TRAIN, run_cli


def test_no_saved_file_names_tokenizers_backend(tiny_llama, chat_file, tmp_path):
    from transformers import AutoTokenizer

    from lora_cli.cli.merge import main as merge_main
    from lora_cli.cli.train import main as train_main

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert run_cli(["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir", str(adapter),
                    *TINY_TRAIN, "--save_steps", "2"], main=train_main) == 0  # a checkpoint, checked too
    assert run_cli([str(adapter), str(merged), "--no-verify"], main=merge_main) == 0
    folders = [adapter, merged, *sorted(adapter.glob("checkpoint-*"))]
    assert len(folders) >= 3, folders
    source = AutoTokenizer.from_pretrained(tiny_llama)
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".jinja", ".txt"):
                assert "TokenizersBackend" not in path.read_text(encoding="utf-8"), path
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast", folder
        assert config["chat_template"] == source.chat_template, folder  # TGI reads only tokenizer_config.json
        loaded = AutoTokenizer.from_pretrained(folder)
        assert loaded("Hello, naïve 12345")["input_ids"] == source("Hello, naïve 12345")["input_ids"]
        assert loaded.chat_template == source.chat_template


def test_adapters_vllm_cannot_serve_are_named_at_train_time(chat_file, tmp_path):
    from lora_cli.config import TrainConfig, parse_args
    from lora_cli.train.adapter import serving_traps

    base = ["--train_path", str(chat_file), "--output_dir", str(tmp_path / "adapter")]
    assert serving_traps(parse_args(base, cls=TrainConfig)) == []
    (dora,) = serving_traps(parse_args([*base, "--use_dora"], cls=TrainConfig))
    (both,) = serving_traps(parse_args([*base, "--use_dora", "--modules_to_save", "lm_head"], cls=TrainConfig))
    assert dora.startswith("--use_dora: vLLM cannot serve") and "lora-merge" in dora
    assert both.startswith("--use_dora and --modules_to_save:")
