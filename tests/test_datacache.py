"""The tokenised-data cache: reused only when nothing the encoding depends on changed, and never trusted blindly."""

from __future__ import annotations

import logging

from lora_cli import config, datacache
from lora_cli.train import prepare

from .conftest import CHAT, TINY_TRAIN, run_cli, write_jsonl


def _prepare(base, data, out, *extra):
    return prepare(config.parse_args(["--base_model", str(base), "--train_path", str(data), "--output_dir",
                                      str(out), *TINY_TRAIN, *extra]))


def _entries(cache) -> list[str]:
    return sorted(p.name for p in cache.iterdir() if not p.name.startswith("."))


def _columns(prepared) -> tuple[list, list]:
    return list(prepared.train["input_ids"]), list(prepared.train["labels"])


def test_second_run_reuses_the_encoding_and_gets_the_same_rows(tiny_llama, chat_file, tmp_path, own_data_cache,
                                                               caplog, monkeypatch):
    first = _prepare(tiny_llama, chat_file, tmp_path / "a")
    assert len(_entries(own_data_cache)) == 1

    import lora_cli.train.dataset as train_module

    def no_encoding(*args, **kwargs):
        raise AssertionError("the cached rows should have been used")

    monkeypatch.setattr(train_module, "encode_table", no_encoding)
    with caplog.at_level(logging.INFO, logger="lora_cli"):
        second = _prepare(tiny_llama, chat_file, tmp_path / "b")
    assert "reused from the data cache" in caplog.text
    assert _columns(second) == _columns(first)
    assert second.train_stats == first.train_stats


def test_anything_the_encoding_depends_on_gives_a_new_entry(tiny_llama, chat_file, tmp_path, own_data_cache):
    _prepare(tiny_llama, chat_file, tmp_path / "a")
    _prepare(tiny_llama, chat_file, tmp_path / "b", "--max_seq_length", "64")
    _prepare(tiny_llama, chat_file, tmp_path / "c", "--train_on_inputs")
    _prepare(tiny_llama, chat_file, tmp_path / "d", "--chat_template", "chatml")  # the model's own is ChatML-like
    edited = write_jsonl(tmp_path / "edited.jsonl", [{"messages": CHAT}] * 3)
    _prepare(tiny_llama, edited, tmp_path / "e")
    keys = _entries(own_data_cache)
    assert len(keys) == 5  # one entry per distinct encoding
    # Settings that do not touch the encoding (learning rate, LoRA rank...) reuse the entry.
    _prepare(tiny_llama, chat_file, tmp_path / "f", "--learning_rate", "3e-4", "--lora_r", "8")
    assert _entries(own_data_cache) == keys


def test_a_changed_tokenizer_is_a_different_key(tokenizer, llama3_tokenizer, chat_file, demo_dir, monkeypatch):
    from transformers import AutoTokenizer

    from lora_cli.data import load_conversations

    rows = load_conversations(str(chat_file))
    settings = {"max_seq_length": 2048, "truncation": "drop", "train_on_inputs": False}
    key = datacache.key(tokenizer, rows, settings)
    assert key == datacache.key(AutoTokenizer.from_pretrained(demo_dir), rows, dict(settings))
    assert key != datacache.key(llama3_tokenizer, rows, settings)
    assert key != datacache.key(tokenizer, rows[:-1], settings)
    # A setting held only by the Python tokenizer that changes the ids.
    assert key != datacache.key(AutoTokenizer.from_pretrained(demo_dir, split_special_tokens=True), rows, settings)
    monkeypatch.setattr(datacache, "_versions", lambda *names: {"transformers": "0.0"})  # another library version
    assert key != datacache.key(tokenizer, rows, settings)
    monkeypatch.undo()
    assert key == datacache.key(tokenizer, rows, settings)
    monkeypatch.setattr(datacache, "ENCODING_VERSION", datacache.ENCODING_VERSION + 1)  # new encoding rules
    assert key != datacache.key(tokenizer, rows, settings)


def test_entries_are_readable_by_other_users_of_a_shared_cache(tiny_llama, chat_file, tmp_path, own_data_cache):
    import os
    import stat

    old = os.umask(0o022)
    try:
        _prepare(tiny_llama, chat_file, tmp_path / "a")
    finally:
        os.umask(old)
    (entry,) = _entries(own_data_cache)
    assert stat.S_IMODE((own_data_cache / entry).stat().st_mode) == 0o755


def test_packing_writes_nothing_into_the_cache_entry(tiny_llama, chat_file, tmp_path, own_data_cache):
    from lora_cli import models
    from lora_cli.train import attach_lora, build_trainer, step_plan

    _prepare(tiny_llama, chat_file, tmp_path / "a", "--max_seq_length", "256")
    (entry,) = _entries(own_data_cache)
    before = sorted(p.name for p in (own_data_cache / entry).rglob("*"))
    cfg = config.parse_args(["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir",
                             str(tmp_path / "b"), *TINY_TRAIN, "--packing", "--max_seq_length", "256"])
    prepared = prepare(cfg)
    model = attach_lora(models.load_model(prepared.base, precision="fp32"), cfg)
    build_trainer(cfg, model, prepared, step_plan(cfg, model, "fp32", prepared.train_stats), "fp32")
    assert prepared.train.cache_files  # read from the entry, and packed by TRL...
    assert sorted(p.name for p in (own_data_cache / entry).rglob("*")) == before  # ...without writing into it


def test_warnings_are_repeated_from_the_cache(tiny_llama, tmp_path, caplog):
    long_row = {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]}
    short_row = {"messages": CHAT}
    data = write_jsonl(tmp_path / "d.jsonl", [long_row, short_row, short_row])
    for out in ("a", "b"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="lora_cli"):
            prepared = _prepare(tiny_llama, data, tmp_path / out, "--max_seq_length", "128")
        assert "1 of 3 rows are longer than --max_seq_length 128" in caplog.text
        assert prepared.train_stats.dropped_too_long == 1 and len(prepared.train) == 2
    assert "reused from the data cache" in caplog.text


def test_damaged_entry_is_rebuilt(tiny_llama, chat_file, tmp_path, own_data_cache, caplog):
    first = _prepare(tiny_llama, chat_file, tmp_path / "a")
    (entry,) = _entries(own_data_cache)
    for f in (own_data_cache / entry / "data").glob("*.arrow"):
        f.write_bytes(b"not arrow")
    with caplog.at_level(logging.WARNING, logger="lora_cli"):
        again = _prepare(tiny_llama, chat_file, tmp_path / "b")
    assert "ignoring unreadable data cache" in caplog.text
    assert _columns(again) == _columns(first)
    caplog.clear()  # the damaged entry was replaced by a whole one
    with caplog.at_level(logging.INFO, logger="lora_cli"):
        third = _prepare(tiny_llama, chat_file, tmp_path / "c")
    assert "reused from the data cache" in caplog.text and "unreadable" not in caplog.text
    assert _columns(third) == _columns(first) and _entries(own_data_cache) == [entry]


def test_no_data_cache_and_dry_run_write_nothing(tiny_llama, chat_file, tmp_path, own_data_cache, capsys):
    _prepare(tiny_llama, chat_file, tmp_path / "a", "--no-data_cache")
    assert _entries(own_data_cache) == []
    argv = ["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir", str(tmp_path / "dry"),
            "--dry_run", *TINY_TRAIN]
    assert run_cli(argv) == 0
    assert _entries(own_data_cache) == [] and not list(own_data_cache.iterdir())


def test_unwritable_cache_does_not_stop_training(tiny_llama, chat_file, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    monkeypatch.setenv("LORA_CLI_DATA_CACHE", str(blocker / "datasets"))
    with caplog.at_level(logging.WARNING, logger="lora_cli"):
        prepared = _prepare(tiny_llama, chat_file, tmp_path / "a")
    assert "could not write the data cache" in caplog.text and len(prepared.train) == 16
