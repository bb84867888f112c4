"""Preference tuning (--method dpo/orpo/kto): row errors with file:line, the answer masked to its assistant turn with
the end-of-turn token, counted length rules, and TRL's trainers on a tiny model with lora-train's run guarantees."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from safetensors.torch import load_file

from lora_cli.preference import encoding, rows

from .conftest import TINY_TRAIN, run_cli, write_jsonl
from .test_reliability import run_with_signal

PAIRS = [{"prompt": f"Is {i} even?", "chosen": "yes" if i % 2 == 0 else "no",
          "rejected": "no" if i % 2 == 0 else "yes"} for i in range(12)]
JUDGED = [{"prompt": [{"role": "user", "content": f"Is {i} even?"}], "completion": "yes", "label": i % 2 == 0}
          for i in range(12)]


@pytest.fixture()
def pairs(tmp_path):
    return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)


def train_args(model, data, out, method="dpo"):
    return ["--method", method, "--base_model", str(model), "--train_path", str(data), "--output_dir", str(out),
            *TINY_TRAIN]


def lora_weights(out) -> dict[str, torch.Tensor]:
    return load_file(out / "adapter_model.safetensors")


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Hi", "chosen": "Hello"}, "missing 'rejected'"),
    ({"prompt": "Hi", "chosen": "Hello", "rejected": " Hello "}, "'chosen' and 'rejected' are the same answer"),
    ({"prompt": [{"role": "system", "content": "Be kind."}], "chosen": "a", "rejected": "b"},
     "'prompt' has no user turn"),
    ({"prompt": "Hi", "chosen": ["Hello"], "rejected": "b"}, "chosen[1] must be an object with 'role' and 'content'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or an array of messages, got a number"),
    ({"prompt": "Hi", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     "'chosen' must hold exactly one assistant message"),
])
def test_a_bad_pair_fails_with_file_and_line(tiny_llama, tmp_path, capsys, row, message):
    data = write_jsonl(tmp_path / "bad.jsonl", PAIRS[:2] + [row])
    assert run_cli(train_args(tiny_llama, data, tmp_path / "out") + ["--dry_run"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"lora-train: error: {data}:3: ") and message in err


def test_a_bad_kto_label_fails_with_file_and_line(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "kto.jsonl", JUDGED[:1] + [{"prompt": "Hi", "completion": "Yo", "label": "yes"}])
    assert run_cli(train_args(tiny_llama, data, tmp_path / "out", "kto") + ["--dry_run"]) == 2
    assert f"{data}:2: 'label' must be true or false, got a string" in capsys.readouterr().err


@pytest.mark.parametrize("fixture", ["tokenizer", "llama3_tokenizer"])
def test_answers_are_the_assistant_turn_up_to_its_end_of_turn_token(request, fixture):
    tok = request.getfixturevalue(fixture)
    end = "<|im_end|>" if fixture == "tokenizer" else "<|eot_id|>"
    pair = rows.parse_row({"system": "Be brief.", "prompt": "Capital of France?", "chosen": "Paris",
                           "rejected": "Rome, I think"}, "f:1", rows.PAIRED)
    example = encoding.encode_pair(tok, pair)
    chosen, rejected = (tok.decode(ids) for ids in example.completions)
    assert (chosen, rejected) == (f"Paris{end}", f"Rome, I think{end}")  # not the newline the template adds after
    prompt = tok.decode(example.prompt_ids)
    assert prompt.count("Capital of France?") == 1 and prompt.count("Be brief.") == 1
    whole = tok.apply_chat_template([*pair.prompt, {"role": "assistant", "content": "Paris"}], tokenize=False)
    assert whole.startswith(prompt + chosen)  # prompt + answer is the chat template's own rendering


def test_length_rules_are_counted_never_silent(tokenizer, caplog):
    long_prompt = rows.parse_row({"prompt": "word " * 60, "chosen": "a", "rejected": "b"}, "f:1", rows.PAIRED)
    short = rows.parse_row({"prompt": "Hi", "chosen": "a", "rejected": "b"}, "f:2", rows.PAIRED)
    kept, stats = encoding.encode_examples(tokenizer, [long_prompt, short], max_length=512, max_prompt_length=40,
                                           truncation="drop", name="f")
    assert (stats.rows, stats.kept, stats.dropped_too_long, stats.prompt_too_long) == (2, 1, 1, 1)
    assert "1 of 2 rows exceed --max_seq_length 512 or --max_prompt_length 40" in caplog.text and "f:1" in caplog.text
    kept, stats = encoding.encode_examples(tokenizer, [long_prompt, short], max_length=512, max_prompt_length=40,
                                           truncation="truncate", name="f")
    assert stats.truncated == 1 and len(kept[0].prompt_ids) == 40
    assert tokenizer.decode(kept[0].prompt_ids).endswith("<|im_start|>assistant\n")  # the end is kept


def test_dpo_trains_the_adapter_against_the_base(tiny_llama, pairs, tmp_path, capsys):
    out = tmp_path / "dpo"
    assert run_cli(train_args(tiny_llama, pairs, out)) == 0
    err = capsys.readouterr().err
    assert "reference model: the base model (adapter disabled)" in err
    weights = lora_weights(out)
    assert all(".ref." not in k for k in weights) and not (out / "ref").exists()  # the reference is never saved
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())  # B starts at zero
    metrics = json.loads((out / "train_metrics.json").read_text())
    # 3 steps x 2 pairs x 2 answers x 2 tokens (the word and the end-of-turn token)
    assert metrics["optimizer_steps"] == 3 and metrics["trained_tokens"] == 3 * 2 * 2 * 2
    assert "method: dpo" in (out / "run_config.yaml").read_text()


@pytest.mark.parametrize("method, data", [("orpo", PAIRS), ("kto", JUDGED)])
def test_orpo_and_kto_train_a_tiny_model(tiny_llama, tmp_path, method, data):
    path = write_jsonl(tmp_path / f"{method}.jsonl", data)
    out = tmp_path / method
    assert run_cli(train_args(tiny_llama, path, out, method)) == 0
    weights = lora_weights(out)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in weights.items())


def test_dpo_continues_a_given_adapter_against_its_frozen_copy(tiny_llama, pairs, tmp_path, capsys):
    sft = tmp_path / "sft"
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": r["prompt"]},
                                                               {"role": "assistant", "content": r["chosen"]}]}
                                                 for r in PAIRS])
    assert run_cli(["--base_model", str(tiny_llama), "--train_path", str(chat), "--output_dir", str(sft),
                    *TINY_TRAIN]) == 0
    out = tmp_path / "dpo"
    assert run_cli(train_args(tiny_llama, pairs, out) + ["--adapter", str(sft), "--lora_r", "8"]) == 0
    assert "reference model: the starting adapter, frozen" in capsys.readouterr().err
    start, end = lora_weights(sft), lora_weights(out)
    assert start.keys() == end.keys()  # the same adapter (r=4 as saved, --lora_r does not apply), not a new one
    assert any(not torch.equal(start[k], end[k]) for k in start)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_dry_run_estimates_the_reference_forward(tiny_llama, pairs, tmp_path, capsys):
    assert run_cli(train_args(tiny_llama, pairs, tmp_path / "out") + ["--dry_run"]) == 0
    assert "reference forward (no grad)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_qlora_dpo_on_cpu(tiny_llama, pairs, tmp_path):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "qlora"
    assert run_cli(train_args(tiny_llama, pairs, out) + ["--load_in_4bit", "--max_steps", "2"]) == 0
    assert "quantization: 4bit" in (out / "run_config.yaml").read_text()
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora_weights(out).items())


@pytest.mark.slow
def test_dpo_sigterm_saves_and_resumes(tiny_llama, pairs, tmp_path):
    out = tmp_path / "run"
    argv = train_args(tiny_llama, pairs, out) + ["--max_steps", "4", "--save_steps", "2"]
    proc = run_with_signal(tmp_path, "SIGTERM", 1, argv)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert (out / "checkpoint-1").is_dir() and not (out / "adapter_config.json").exists()
    assert run_cli(argv + ["--resume"]) == 0
    assert json.loads((out / "train_metrics.json").read_text())["optimizer_steps"] == 4


def test_lora_eval_shows_preference_accuracy_rising_against_the_base(tiny_llama, pairs, tmp_path, capsys):
    from lora_cli.cli.eval import main as eval_main

    out = tmp_path / "dpo"
    assert run_cli(train_args(tiny_llama, pairs, out) + ["--max_steps", "6", "--learning_rate", "5e-2"]) == 0
    report_path = tmp_path / "eval" / "report.json"
    assert run_cli(["--adapter", str(out), "--eval_path", str(pairs), "--output", str(report_path)], eval_main) == 0
    printed = capsys.readouterr().out
    assert "accuracy" in printed and "mean margin" in printed and "vs base" in printed
    report = json.loads(report_path.read_text())
    base, tuned = report["models"]
    assert report["rows"] == len(PAIRS) and base["name"] == "base"
    assert tuned["mean_margin"] > base["mean_margin"]  # DPO raised log p(chosen) - log p(rejected) on its pairs
    assert tuned["vs_base"]["preference_accuracy"] == tuned["preference_accuracy"] - base["preference_accuracy"]
    per_row = [json.loads(line) for line in (tmp_path / "eval" / "preferences.jsonl").read_text().splitlines()]
    first = per_row[0]["logp"]
    assert first["base"]["chosen"] < 0 and set(first) == {"base", str(out)}
    accuracy = sum(r["logp"][str(out)]["chosen"] > r["logp"][str(out)]["rejected"] for r in per_row) / len(per_row)
    assert accuracy == tuned["preference_accuracy"]


def test_lora_data_shows_pairs_and_names_every_bad_row(tmp_path, capsys, tiny_llama):
    from lora_cli.cli.data import main as data_main

    data = write_jsonl(tmp_path / "pairs.jsonl", PAIRS[:2] + [{"prompt": "Hi", "chosen": "a"}] + PAIRS[2:3]
                       + [{"prompt": "Hi", "chosen": "a", "rejected": "a"}])
    assert run_cli(["--train_path", str(data), "--base_model", str(tiny_llama), "--color", "never", "--show", "1",
                    "--report_dir", str(tmp_path / "report")], data_main) == 2
    captured = capsys.readouterr()
    saved = json.loads((tmp_path / "report" / "data_report.json").read_text())
    assert (saved["rows_read"], saved["usable"], saved["can_train"]) == (5, 3, False)
    assert [p.split(": ")[0] for p in saved["problems"]] == [f"{data}:3", f"{data}:5"]
    assert "chosen (2 tokens): [[yes<|im_end|>]]" in captured.out
    assert "rejected (2 tokens): [[no<|im_end|>]]" in captured.out
    assert f"{data}:3: missing 'rejected'" in captured.out and f"{data}:5: 'chosen' and 'rejected'" in captured.out
    assert "3 of 5 rows usable, 2 with errors" in captured.err


def test_preference_rows_without_method_say_which_method(pairs, tmp_path, capsys):
    assert run_cli(["--train_path", str(pairs), "--output_dir", str(tmp_path / "out")]) == 2
    assert "holds preference rows (prompt, chosen, rejected): add --method dpo or --method orpo" in \
        capsys.readouterr().err
