"""lora-data: the report shows and counts exactly what lora-train trains on, lists every problem, and guards scripts
with its exit code. Expected numbers are computed here independently, from the tokenizer and the rendered text."""

from __future__ import annotations

import itertools
import json
import re

import pytest

from lora_cli import chat
from lora_cli.cli.data import main
from lora_cli.data import Conversation
from lora_cli.datareport import DataConfig, render_plain
from lora_cli.encode import encode_rows

from .conftest import CHAT, run_cli, write_jsonl

ANSI = re.compile(r"\x1b\[[0-9;]*m")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def pair(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]}


def lora_data(capsys, *argv) -> tuple[int, str, str]:
    code = run_cli([str(a) for a in argv], main=main)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(autouse=True)
def _no_forced_colour(monkeypatch):
    for name in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"):
        monkeypatch.delenv(name, raising=False)


def rendered_row(out: str, number: int) -> str:
    """The text of shown row `number`: the lines after its header, up to the next row or the statistics."""
    block = re.split(r"\n\n(?=── row |Statistics\n)", out.split(f"── row {number} ")[1].split("\n", 1)[1])[0]
    return re.split(r"\n  (?:✂|ids  )", block)[0]  # the notes printed under a row are not part of it


def expected_rendering(tokenizer, ids: list[int], labels: list[int]) -> str:
    """Oracle for the plain rendering: every maximal run of trained tokens decoded and put in [[ ]]."""
    out = []
    for trained, run in itertools.groupby(zip(ids, labels), key=lambda pair: pair[1] != -100):
        text = tokenizer.decode([i for i, _ in run], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        out.append(f"[[{text}]]" if trained else text)
    return "".join(out)


# --- rendering --------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", ["smollm2", "llama3"])
def test_rendering_marks_exactly_the_trained_tokens(capsys, tmp_path, request, model):
    folder, tokenizer = {"smollm2": ("demo_dir", "tokenizer"), "llama3": ("tiny_qwen", "llama3_tokenizer")}[model]
    folder, tokenizer = request.getfixturevalue(folder), request.getfixturevalue(tokenizer)
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, pair("Hi", "Hello")])
    code, out, _ = lora_data(capsys, "--train_path", path, "--base_model", folder, "--show", 1)
    assert code == 0
    enc = chat.encode(tokenizer, CHAT)  # the labels lora-train computes for this row
    shown = rendered_row(out, 1)
    assert shown == expected_rendering(tokenizer, enc.input_ids, enc.labels).rstrip("\n")
    # The brackets hold exactly the decoded trained runs, and without them the text is what the model reads.
    runs = [[i for i, _ in run] for trained, run in
            itertools.groupby(zip(enc.input_ids, enc.labels), key=lambda p: p[1] != -100) if trained]
    bracketed = re.findall(r"\[\[(.*?)\]\]", shown, flags=re.S)
    assert bracketed == [tokenizer.decode(run, skip_special_tokens=False) for run in runs]
    whole = tokenizer.decode(enc.input_ids, skip_special_tokens=False)
    assert shown.replace("[[", "").replace("]]", "") == whole.rstrip("\n")
    assert "Paris" in bracketed[0] and "Rome, of course." in bracketed[1]
    assert not any("Capital of France?" in text for text in bracketed)


def test_truncated_row_is_rendered_as_lora_train_cuts_it(capsys, tmp_path, demo_dir, tokenizer):
    rows = [{"messages": CHAT}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    full = chat.encode(tokenizer, CHAT)
    first_answer_end = next(i for i, label in enumerate(full.labels) if label != -100) + 2
    columns, _ = encode_rows(tokenizer, [Conversation(CHAT, "x")], max_seq_length=first_answer_end,
                             truncation="truncate", train_on_inputs=False, name="x")
    code, out, _ = lora_data(capsys, "--train_path", path, "--base_model", demo_dir, "--show", 1,
                             "--max_seq_length", first_answer_end, "--truncation", "truncate")
    assert code == 0
    shown = rendered_row(out, 1)
    assert shown == expected_rendering(tokenizer, columns["input_ids"][0], columns["labels"][0]).rstrip("\n")
    assert "Rome" not in shown  # the answer after the cut is not shown: lora-train never sees it
    assert f"truncated at {first_answer_end}" in out


def test_render_plain_with_train_on_inputs_brackets_everything(tokenizer):
    enc = chat.encode(tokenizer, CHAT, train_on_inputs=True)
    text = render_plain(tokenizer, enc.input_ids, enc.labels)
    assert text.startswith("[[") and text.endswith("]]") and text.count("[[") == 1


def test_show_ids_prints_the_ids_around_each_trained_span(capsys, tmp_path, demo_dir, tokenizer):
    path = write_jsonl(tmp_path / "d.jsonl", [pair("Hi", "Hello")])
    code, out, _ = lora_data(capsys, "--train_path", path, "--base_model", demo_dir, "--show", 1, "--show_ids")
    assert code == 0
    enc = chat.encode(tokenizer, pair("Hi", "Hello")["messages"])
    first = next(i for i, label in enumerate(enc.labels) if label != -100)
    last = max(i for i, label in enumerate(enc.labels) if label != -100)
    line = next(line for line in out.splitlines() if "ids  span 1" in line)
    assert f"tokens {first}..{last}" in line
    assert f'{enc.input_ids[last]} "<|im_end|>" ]]' in line
    assert line.split("[[")[0].rstrip().endswith(f'{enc.input_ids[first - 1]} "\\n"')


# --- statistics -------------------------------------------------------------------------------------------------------

def test_statistics_match_hand_counts(capsys, tmp_path, demo_dir, tokenizer):
    long_question = " ".join(f"word{i}" for i in range(80))
    rows = [pair("What is 2+2?", "4"), pair("Name a colour.", "Blue, for example."),
            pair("What is 2+2?", "4"),  # a duplicate of line 1
            pair(long_question, "Too long."),
            {"instruction": "Say yes.", "output": "Yes"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    limit = 60
    code, out, _ = lora_data(capsys, "--train_path", path, "--base_model", demo_dir, "--max_seq_length", limit,
                             "--report_dir", tmp_path / "report", "--show", 0)
    assert code == 0
    report = json.loads((tmp_path / "report" / "data_report.json").read_text())
    stats = report["statistics"]

    # Independently: SmolLM2's template renders each conversation (with its default system prompt); the trained
    # tokens are each answer and its <|im_end|>.
    conversations = [r["messages"] if "messages" in r else
                     [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
                     for r in rows]
    lengths = [len(tokenizer(tokenizer.apply_chat_template(m, tokenize=False), add_special_tokens=False)["input_ids"])
               for m in conversations]
    trained = [len(tokenizer(m[-1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
               for m in conversations]
    kept = [i for i, n in enumerate(lengths) if n <= limit]
    assert lengths[3] > limit and len(kept) == 4
    assert stats["rows_read"] == stats["rows_valid"] == 5
    assert stats["duplicates"] == 1
    assert stats["formats"] == {"messages": 4, "alpaca": 1}
    assert stats["tokens_total"] == sum(lengths)
    assert stats["tokens_trained_on"] == sum(lengths[i] for i in kept)
    assert stats["tokens_in_loss"] == sum(trained[i] for i in kept)
    assert stats["tokens_per_row"] == {"min": min(lengths), "median": sorted(lengths)[2], "max": max(lengths)}
    fractions = sorted(trained[i] / lengths[i] for i in kept)
    assert stats["trained_fraction_per_row"] == {"min": round(fractions[0], 4),
                                                 "median": round((fractions[1] + fractions[2]) / 2, 4),
                                                 "max": round(fractions[-1], 4)}
    assert (stats["rows_over_max_seq_length"], stats["rows_dropped_too_long"], stats["rows_truncated"]) == (1, 1, 0)
    assert stats["rows_zero_trained_tokens"] == 0
    assert (stats["assistant_turns"], stats["turns_missing_end_of_turn"]) == (5, 0)
    assert f"{sum(trained[i] for i in kept)} of them in the loss" in out
    checks = {p["check"]: p["where"] for p in report["problems"]}
    assert checks == {"duplicate": f"{path}:3", "too_long": f"{path}:4", "format": f"{path}:5"}


@pytest.mark.parametrize("truncation", ["drop", "truncate"])
def test_counts_agree_with_lora_trains_encode_rows(capsys, tmp_path, demo_dir, tokenizer, truncation):
    rows = [{"messages": CHAT}, pair("Hi", "Hello"), pair(" ".join(["long"] * 60), "x")]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    code, _, _ = lora_data(capsys, "--train_path", path, "--base_model", demo_dir, "--max_seq_length", 50,
                           "--truncation", truncation, "--report_dir", tmp_path / "r", "--show", 0)
    assert code == 0
    _, expected = encode_rows(tokenizer, [Conversation(r["messages"], f"{path}:{i}") for i, r in
                                          enumerate(rows, start=1)],
                              max_seq_length=50, truncation=truncation, train_on_inputs=False, name=str(path))
    assert json.loads((tmp_path / "r" / "data_report.json").read_text())["encode_stats"] == expected.as_dict()


def test_report_dir_holds_json_and_png_histograms(capsys, tmp_path, chat_file, demo_dir):
    out_dir = tmp_path / "nested" / "report"
    code, out, _ = lora_data(capsys, "--train_path", chat_file, "--base_model", demo_dir, "--report_dir", out_dir,
                             "--show", 0)
    assert code == 0
    for name in ("token_lengths.png", "trained_fraction.png"):
        png = (out_dir / name).read_bytes()
        assert png.startswith(PNG_MAGIC) and len(png) > 1024, name
    report = json.loads((out_dir / "data_report.json").read_text())
    assert report["can_train"] is True and report["statistics"]["rows_read"] == 16
    assert str(out_dir / "token_lengths.png") in out
    assert out.rstrip().splitlines()[-1].startswith("lora-data: ready to train: 16 rows")


# --- exit status ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("truncation", ["drop", "truncate"])
def test_data_with_nothing_to_train_exits_2(capsys, tmp_path, demo_dir, truncation):
    # Every answer starts after token 30, so with --max_seq_length 30 no trained token survives.
    rows = [pair(f"Question number {i}: " + "please answer this carefully " * 4, "Answer.") for i in range(3)]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    code, out, err = lora_data(capsys, "--train_path", path, "--base_model", demo_dir, "--max_seq_length", 30,
                               "--truncation", truncation, "--report_dir", tmp_path / "r")
    assert code == 2
    assert err.strip().count("\n") == 0 and err.startswith("lora-data: error: cannot train on")
    assert "none of the 3 encoded rows can be trained on (3 too long" in err
    report = json.loads((tmp_path / "r" / "data_report.json").read_text())  # written even when it cannot train
    assert report["can_train"] is False and report["statistics"]["rows_trained_on"] == 0


def test_every_schema_error_is_listed_with_its_line(capsys, tmp_path, demo_dir):
    path = tmp_path / "d.jsonl"
    lines = [json.dumps(pair("Hi", "Hello")),
             "{not json",
             json.dumps({"messages": [{"role": "user", "content": "no answer"}]}),
             "",
             json.dumps({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]}),
             json.dumps({"text": "plain"}),
             json.dumps(pair("Fine", "Yes"))]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    code, out, err = lora_data(capsys, "--train_path", path, "--base_model", demo_dir, "--show", 0)
    assert code == 2
    assert f"{path}:2: invalid JSON" in out
    assert f"{path}:3: no assistant turn" in out
    assert f"{path}:5: messages[1] has unknown role 'bot'" in out
    assert f"{path}:6: no usable fields (found: text)" in out
    assert "4 rows lora-train cannot read" in err
    assert "6 read, 2 valid" in out  # blank lines are not rows; the good rows are still counted


def test_json_array_errors_are_listed_by_row(capsys, tmp_path, demo_dir):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([pair("Hi", "Hello"), {"messages": []}, {"prompt": 1, "completion": "x"}]))
    code, out, _ = lora_data(capsys, "--train_path", path, "--base_model", demo_dir, "--show", 0)
    assert code == 2
    assert f"{path}:row 2: 'messages' is empty" in out and f"{path}:row 3: 'prompt' must be a string" in out


def test_warnings_are_reported_but_exit_0(capsys, tmp_path, demo_dir):
    rows = [{"messages": [{"role": "user", "content": "A"}, {"role": "user", "content": "B"},
                          {"role": "assistant", "content": "C"}, {"role": "user", "content": "Thanks!"}]},
            {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": " "},
                          {"role": "assistant", "content": "D"}]},
            {"messages": [{"role": "assistant", "content": "Hello there"}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "E"}]}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    code, out, _ = lora_data(capsys, "--train_path", path, "--base_model", demo_dir, "--report_dir", tmp_path / "r",
                             "--show", 0)
    assert code == 0
    assert f"{path}:1: messages 1 and 2 are both user turns" in out
    assert f"{path}:1: ends with 1 message after the last assistant turn, never trained on" in out
    assert f"{path}:2: message 2 (user) is empty" in out
    assert f"{path}:3: message 1 (assistant) comes before any user turn" in out
    assert "ready to train: 3 rows" in out and "4 warnings" in out
    checks = sorted(p["check"] for p in json.loads((tmp_path / "r" / "data_report.json").read_text())["problems"])
    assert checks == ["empty_content", "roles", "roles", "trailing_turn"]


def test_missing_end_of_turn_is_warned(capsys, tmp_path, demo_dir):
    template = tmp_path / "plain.jinja"  # no special token closes the assistant turn
    template.write_text("{% for m in messages %}{{ m['role'] + ':\\n' + m['content'] + '\\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}{{ 'assistant:\\n' }}{% endif %}")
    path = write_jsonl(tmp_path / "d.jsonl", [pair("Hi", "Hello"), pair("Yo", "Hey")])
    code, out, _ = lora_data(capsys, "--train_path", path, "--base_model", demo_dir, "--chat_template", template,
                             "--show", 1)
    assert code == 0
    assert "0 of 2 assistant turns end with an end-of-turn token in the loss" in out
    assert "2 rows whose assistant turns end without an end-of-turn token in the loss" in out


# --- CLI --------------------------------------------------------------------------------------------------------------

def test_help_lists_every_flag(capsys):
    assert run_cli(["--help"], main=main) == 0
    out = capsys.readouterr().out
    from lora_cli.config import fields

    for f in fields(DataConfig):
        assert f"--{f.name}" in out, f.name


def test_argument_problems_are_reported_together(capsys, tmp_path):
    code, _, err = lora_data(capsys, "--train_path", tmp_path / "missing.jsonl", "--show", "-1", "--truncation",
                             "cut", "--max_seq_length", "0", "--bogus")
    assert code == 2
    for expected in ("unknown flag --bogus", "--truncation: 'cut' is not one of drop, truncate",
                     "--train_path: file not found", "--show: must be >= 0", "--max_seq_length: must be > 0"):
        assert expected in err


def test_output_is_plain_when_not_a_terminal_and_coloured_on_request(capsys, tmp_path, demo_dir):
    path = write_jsonl(tmp_path / "d.jsonl", [pair("Hi", "Hello")])
    code, plain, _ = lora_data(capsys, "--train_path", path, "--base_model", demo_dir, "--show", 1)
    assert code == 0 and not ANSI.search(plain) and "[[Hello<|im_end|>]]" in plain
    code, coloured, _ = lora_data(capsys, "--train_path", path, "--base_model", demo_dir, "--show", 1, "--color",
                                  "always")
    assert code == 0 and ANSI.search(coloured) and "[[" not in coloured
    # Colour replaces the brackets; the words are the same.
    assert ANSI.sub("", coloured).count("Hello<|im_end|>") == 1
