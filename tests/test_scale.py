"""Data at scale: tokenising on several processes into Arrow gives exactly the single-process encoding and counts,
and a cached run reads none of the data files."""

from __future__ import annotations

import logging

import pytest

from lora_cli import config, sources
from lora_cli.encode import encode_rows, encode_table
from lora_cli.errors import DataError
from lora_cli.train import prepare

from .conftest import CHAT, TINY_TRAIN, write_jsonl


def _rows(tmp_path, n=90):
    rows = [{"messages": CHAT}]
    for i in range(n):
        answer = "word " * (i % 40)  # some rows longer than --max_seq_length below
        rows.append({"messages": [{"role": "user", "content": f"Question {i}?"},
                                  {"role": "assistant", "content": f"Answer {i}: {answer}"}]})
        if i % 17 == 0:  # a long question: cut at --max_seq_length, nothing of the answer is left
            rows.append({"messages": [{"role": "user", "content": "Why " * 60},
                                      {"role": "assistant", "content": "Because."}]})
    return str(write_jsonl(tmp_path / "rows.jsonl", rows))


@pytest.mark.parametrize("truncation", ["drop", "truncate"])
@pytest.mark.parametrize("num_proc", [1, 2])
def test_table_encoding_equals_row_encoding(tokenizer, tmp_path, truncation, num_proc):
    mixture = sources.load(_rows(tmp_path), 0)
    settings = dict(max_seq_length=48, truncation=truncation, train_on_inputs=False, name="rows")
    columns, expected = encode_rows(tokenizer, list(mixture.conversations()), **settings)
    dataset, stats = encode_table(tokenizer, mixture.rows, num_proc=num_proc, batch_size=16, **settings)
    assert stats == expected
    assert expected.dropped_too_long and expected.first_problem_rows  # the cases are there
    assert expected.truncated if truncation == "truncate" else not expected.truncated
    assert dataset.column_names == ["input_ids", "labels"]
    assert dataset["input_ids"] == columns["input_ids"] and dataset["labels"] == columns["labels"]


def test_a_template_error_in_a_worker_names_the_row(tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
            for i in range(40)]
    rows[33] = {"messages": [{"role": "assistant", "content": "an answer first"},
                             {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    tokenizer = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = ("{% for m in messages %}{% if loop.first and m['role'] != 'user' %}"
                               "{{ raise_exception('first turn must be the user') }}{% endif %}"
                               "{{ m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}")
    with pytest.raises(DataError, match=r"bad\.jsonl:34: the chat template .* cannot render"):
        encode_table(tokenizer, sources.load(str(path), 0).rows, max_seq_length=64, truncation="drop",
                     train_on_inputs=False, name="bad", num_proc=2, batch_size=8)


def test_a_cached_run_reads_no_data_file(tiny_llama, tmp_path, monkeypatch, caplog):
    data = _rows(tmp_path, 30)
    args = ["--base_model", str(tiny_llama), "--train_path", f"{data}:2,{data}:1", "--val_split", "0.1",
            "--output_dir", str(tmp_path / "out"), *TINY_TRAIN]
    first = prepare(config.parse_args(args))
    assert first.train_sources and first.eval is not None

    def no_reading(*args, **kwargs):
        raise AssertionError("the data files should not be read again")

    import lora_cli.train.dataset as module

    monkeypatch.setattr(module.sources, "load", no_reading)
    with caplog.at_level(logging.INFO, logger="lora_cli"):
        second = prepare(config.parse_args(args))
    assert caplog.text.count("reused from the data cache") == 2
    assert second.train_sources == first.train_sources
    assert second.train["input_ids"] == first.train["input_ids"] and second.eval["labels"] == first.eval["labels"]
    assert second.train_stats == first.train_stats and second.eval_stats == first.eval_stats
    monkeypatch.undo()
    other_seed = prepare(config.parse_args([*args, "--seed", "7"]))  # the seed picks other rows: a new entry
    assert other_seed.train["input_ids"] != first.train["input_ids"]


def test_num_proc_is_validated(tmp_path):
    from lora_cli.errors import UsageError

    with pytest.raises(UsageError, match="--num_proc: must be >= 0, got -1"):
        config.parse_args(["--train_path", _rows(tmp_path, 2), "--output_dir", "o", "--num_proc", "-1"])


def test_streaming_trains_with_masks_and_counts(tiny_llama, tmp_path):
    """--streaming: the rows reach the trainer tokenised as in a prepared run (same ids and labels, in mixture order)
    and train_metrics.json counts the rows read, per source too."""
    import json

    from lora_cli.encode import encode_row
    from lora_cli.sources.mixture import conversation

    from .conftest import run_cli

    a = write_jsonl(tmp_path / "a.jsonl", [{"messages": CHAT}] * 3)
    long_answer = {"messages": [{"role": "user", "content": "Why " * 80}, {"role": "assistant", "content": "Ok."}]}
    b = write_jsonl(tmp_path / "b.jsonl", [long_answer, {"messages": CHAT[1:3]}])
    args = ["--base_model", str(tiny_llama), "--train_path", f"{a},{b}", "--streaming", "--max_seq_length", "64",
            "--output_dir", str(tmp_path / "out"), *TINY_TRAIN]
    cfg = config.parse_args(args)
    prepared = prepare(cfg)
    rows = list(prepared.train)
    expected = [encode_row(prepared.tokenizer, conversation(t), max_seq_length=64, truncation="drop",
                           train_on_inputs=False) for t in sources.load(f"{a},{b}", 0).texts()]
    kept = [e for e in expected if e.kept]
    assert [r["input_ids"] for r in rows] == [e.input_ids for e in kept]
    assert [r["labels"] for r in rows] == [e.labels for e in kept]
    assert prepared.train_stats.rows == 5 and prepared.train_stats.dropped_too_long == 1  # counted as read
    assert run_cli(args) == 0
    metrics = json.loads((tmp_path / "out" / "train_metrics.json").read_text())
    # 3 steps of 2 rows over a stream of 4 kept rows: one pass and a half, every row read is counted
    assert metrics["data"]["kept"] >= 6 and metrics["data"]["dropped_too_long"] >= 1
    assert set(metrics["data_sources"]) == {str(a), str(b)}


@pytest.mark.parametrize("extra, message", [
    ([], "--streaming needs --max_steps"),
    (["--max_steps", "3", "--val_split", "0.2"], "--streaming cannot hold out --val_split"),
    (["--max_steps", "3", "--packing"], "--streaming with --packing"),
])
def test_streaming_settings_that_cannot_work_are_refused(tmp_path, extra, message):
    from lora_cli.errors import UsageError

    with pytest.raises(UsageError, match=message):
        config.parse_args(["--train_path", _rows(tmp_path, 2), "--output_dir", "o", "--streaming", *extra])


def test_direct_tokenizer_backend_only_where_it_equals_transformers(tokenizer, llama3_tokenizer):
    """chat.encode calls the Rust tokenizer directly (a third of the cost of transformers' wrapper) only when that is
    exactly what transformers gives; a backend with truncation set (from its tokenizer.json) goes through transformers."""
    from lora_cli.chat import encode
    from lora_cli.chat.encoding import _direct_backend

    for tok in (tokenizer, llama3_tokenizer):
        assert _direct_backend(tok) is not None
    odd = type(tokenizer).from_pretrained(tokenizer.name_or_path)
    odd.backend_tokenizer.enable_truncation(8)
    assert _direct_backend(odd) is None
    long = CHAT + [{"role": "user", "content": "More " * 20}, {"role": "assistant", "content": "Fine " * 20}]
    assert len(encode(odd, long).input_ids) == len(encode(tokenizer, long).input_ids) > 8  # never cut silently
