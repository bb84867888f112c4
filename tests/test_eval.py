"""lora-eval on tiny random models: the loss is lora-train's, adapters are compared with the base on the same rows,
reports are complete, and bad input fails before any model loads."""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from lora_cli import chat, config, evaluate, models
from lora_cli.cli.eval import main as eval_main
from lora_cli.evaluate import EvalConfig, contains_match, exact_match, rouge_l, scoring
from lora_cli.adapters import read_adapter
from lora_cli.errors import UsageError

from .conftest import CHAT, INST_TEMPLATE, run_cli, write_jsonl

# Distinct answers, so that memorising them needs the question. Each question repeats its key word: a random 2-layer
# model attends almost uniformly, and a word said once is too faint at the answer position to learn from quickly.
FACTS = [(" ".join([country] * 12), city) for country, city in (("France", "Paris"), ("Italy", "Rome"),
                                                                 ("Spain", "Madrid"))]
FACT_ROWS = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in FACTS]
METRICS = ("loss", "perplexity", "exact_match", "contains", "rouge_l", "tokens_per_second", "trained_tokens",
           "generated_tokens", "generation_seconds")
# Memorise FACTS (every step sees all three rows): lm_head is trained in full because a random model's logits are too
# flat for LoRA alone to make one token win in a few steps; a learning rate above 1e-2 is unstable here.
MEMORISE = ["--max_steps", "30", "--batch_size", "3", "--gradient_accumulation_steps", "1", "--learning_rate", "1e-2",
            "--lr_scheduler_type", "constant", "--warmup_ratio", "0", "--optim", "adamw_torch", "--lora_r", "8",
            "--lora_alpha", "16", "--lora_dropout", "0.0", "--modules_to_save", "lm_head", "--logging_steps", "10",
            "--save_steps", "1000", "--no-gradient_checkpointing"]


def run_eval(*argv: str) -> tuple[int, str]:
    """lora-eval in-process: the exit code and what it printed to stdout (the table)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run_cli(list(argv), main=eval_main)
    return code, out.getvalue()


def eval_config(*argv: str) -> EvalConfig:
    return config.parse_args(list(argv), cls=EvalConfig)


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("facts") / "facts.jsonl", FACT_ROWS)


@pytest.fixture(scope="module")
def memorised(tiny_llama, facts, tmp_path_factory):
    """An adapter trained by the lora-train CLI until it repeats FACTS word for word."""
    from lora_cli.cli.train import main as train_main

    folder = tmp_path_factory.mktemp("memorised")
    code = run_cli(["--base_model", str(tiny_llama), "--train_path", str(facts), "--output_dir",
                    str(folder / "adapter"), *MEMORISE], main=train_main)
    assert code == 0
    return folder / "adapter"


@pytest.fixture(scope="module")
def facts_eval(memorised, facts, tmp_path_factory):
    """One lora-eval run of the base and the memorised adapter (base model taken from the adapter) on FACTS."""
    out = tmp_path_factory.mktemp("facts_eval")
    code, table = run_eval("--adapter", str(memorised), "--eval_path", str(facts), "--max_new_tokens", "8",
                           "--output", str(out / "report.json"))
    assert code == 0
    report = json.loads((out / "report.json").read_text(encoding="utf-8"))
    lines = (out / "generations.jsonl").read_text(encoding="utf-8").splitlines()
    return report, [json.loads(line) for line in lines], table


def hand_nll(model, tokenizer, messages) -> tuple[float, int]:
    """Summed NLL of the labelled tokens of one conversation, straight from the logits and chat.encode's labels."""
    import torch

    enc = chat.encode(tokenizer, messages)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=torch.tensor([enc.input_ids])).logits[0].double(), dim=-1)
    pairs = [(t - 1, label) for t, label in enumerate(enc.labels) if label != chat.IGNORE_INDEX]
    return -sum(logprobs[t, label].item() for t, label in pairs), len(pairs)


# --- the loss is lora-train's ----------------------------------------------------------------------------------------

def test_loss_and_perplexity_equal_hand_computation(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = write_jsonl(tmp_path / "one.jsonl", [{"messages": CHAT}])
    code, _ = run_eval("--base_model", str(tiny_llama), "--eval_path", str(data), "--max_new_tokens", "1",
                       "--output", str(tmp_path / "report.json"))
    assert code == 0
    result = json.loads((tmp_path / "report.json").read_text())["models"][0]

    nll, count = hand_nll(AutoModelForCausalLM.from_pretrained(tiny_llama).eval(),
                          AutoTokenizer.from_pretrained(tiny_llama), CHAT)
    assert result["trained_tokens"] == count
    assert result["loss"] == pytest.approx(nll / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_loss_is_token_weighted_over_padded_batches(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    rows = [CHAT, CHAT[1:3], FACT_ROWS[0]["messages"]]  # different lengths: padded together in one batch
    data = write_jsonl(tmp_path / "rows.jsonl", [{"messages": m} for m in rows])
    prepared = evaluate.prepare(eval_config("--base_model", str(tiny_llama), "--eval_path", str(data),
                                            "--output", str(tmp_path / "r.json")))
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    sums, counts = zip(*(hand_nll(model, prepared.tokenizer, m) for m in rows))
    nll, count = evaluate.assistant_nll(model, prepared.loss, prepared.tokenizer.pad_token_id, batch_size=3)
    assert count == sum(counts)
    assert nll / count == pytest.approx(sum(sums) / sum(counts), rel=1e-5)  # not the mean of per-row means


@pytest.mark.parametrize("truncation", ["drop", "truncate"])
def test_scored_labels_are_lora_trains(tiny_llama, chat_file, tmp_path, truncation):
    from lora_cli.train import prepare as train_prepare

    rows = [json.loads(line) for line in chat_file.read_text().splitlines()]
    rows.append({"instruction": "Count.", "output": "word " * 80})  # over 64 tokens, but truncation leaves labels
    data = write_jsonl(tmp_path / "eval.jsonl", rows)
    common = ["--base_model", str(tiny_llama), "--eval_path", str(data), "--max_seq_length", "64",
              "--truncation", truncation]
    trained = train_prepare(config.parse_args([*common, "--train_path", str(data), "--output_dir",
                                               str(tmp_path / "out")]))
    scored = evaluate.prepare(eval_config(*common, "--output", str(tmp_path / "r.json")))
    assert scored.loss == trained.eval.to_dict()
    assert len(scored.rows) == len(scored.prompts) == len(scored.references) == len(trained.eval["labels"])
    assert len(scored.rows) == len(rows) - (truncation == "drop")


# --- an adapter that learned the rows beats the base -----------------------------------------------------------------

def test_memorised_adapter_beats_base(facts_eval, memorised):
    report, _, _ = facts_eval
    base, adapter = report["models"]
    assert (base["name"], adapter["name"]) == ("base", str(memorised))
    assert adapter["exact_match"] == 1.0 > base["exact_match"]
    assert adapter["loss"] < base["loss"]
    assert adapter["vs_base"]["exact_match"] == pytest.approx(adapter["exact_match"] - base["exact_match"])


def test_report_has_every_model_and_metric(facts_eval, tiny_llama):
    report, _, _ = facts_eval
    assert report["rows"] == report["rows_read"] == len(FACTS)
    assert report["base_model_path"] == str(tiny_llama)  # recorded by the adapter, not given on the command line
    assert report["generation"]["stop_tokens"] == ["<|im_end|>"]  # SmolLM2's end of turn is also its EOS
    for entry in report["models"]:
        for metric in METRICS:
            assert isinstance(entry[metric], (int, float)) and math.isfinite(entry[metric]), metric
    assert set(report["models"][1]["vs_base"]) == set(evaluate.METRICS)


def test_generations_have_one_line_per_row(facts_eval, memorised):
    report, lines, _ = facts_eval
    assert len(lines) == report["rows"]
    for line, (question, answer) in zip(lines, FACTS):
        assert line["reference"] == answer
        assert question in line["prompt"] and line["prompt"].endswith("<|im_start|>assistant\n")
        assert set(line["answers"]) == {"base", str(memorised)}
        assert line["answers"][str(memorised)] == {"answer": answer, "exact_match": True, "contains": True,
                                                   "rouge_l": 1.0}


def test_table_shows_models_side_by_side(facts_eval, memorised):
    _, _, table = facts_eval
    for text in ("exact match", "ROUGE-L", "tokens/s", "base", str(memorised), "vs base", "+100.0 pts"):
        assert text in table


def test_base_loads_once_and_adapters_switch_on_it(memorised, facts, facts_eval, tmp_path, monkeypatch):
    twin = shutil.copytree(memorised, tmp_path / "twin")
    loads = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: loads.append(1) or real(*a, **k))
    code, _ = run_eval("--adapter", f"{memorised},{twin}", "--eval_path", str(facts), "--max_new_tokens", "8",
                       "--output", str(tmp_path / "report.json"))
    assert code == 0 and len(loads) == 1
    base, first, second = json.loads((tmp_path / "report.json").read_text())["models"]
    single_base, single_adapter = facts_eval[0]["models"]
    # Switching adapters on and off gives what each model gives alone (lm_head too, which the adapter replaces).
    assert base["loss"] == pytest.approx(single_base["loss"], rel=1e-6)
    assert first["loss"] == pytest.approx(second["loss"], rel=1e-6) == pytest.approx(single_adapter["loss"], rel=1e-6)
    assert first["exact_match"] == second["exact_match"] == 1.0


def test_batched_generation_answers_as_one_row_at_a_time(tiny_llama, tmp_path):
    # Prompts of different lengths: in a batch the shorter ones are left-padded, which must change nothing.
    rows = [{"messages": m} for m in (CHAT, CHAT[1:3], FACT_ROWS[0]["messages"], CHAT[:3])]
    data = write_jsonl(tmp_path / "rows.jsonl", rows)
    answers = {}
    for batch_size in ("1", "4"):
        code, _ = run_eval("--base_model", str(tiny_llama), "--eval_path", str(data), "--max_new_tokens", "6",
                           "--batch_size", batch_size, "--output", str(tmp_path / batch_size / "report.json"))
        assert code == 0
        lines = (tmp_path / batch_size / "generations.jsonl").read_text().splitlines()
        answers[batch_size] = [json.loads(line)["answers"]["base"]["answer"] for line in lines]
    assert answers["4"] == answers["1"] and all(answers["1"])


def test_limit_takes_the_first_rows(tiny_llama, chat_file, tmp_path):
    code, _ = run_eval("--base_model", str(tiny_llama), "--eval_path", str(chat_file), "--limit", "2",
                       "--max_new_tokens", "2", "--output", str(tmp_path / "out" / "report.json"))
    assert code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["rows"], report["rows_read"], report["limit"]) == (2, 16, 2)
    lines = (tmp_path / "out" / "generations.jsonl").read_text().splitlines()
    assert [json.loads(line)["where"] for line in lines] == [f"{chat_file}:1", f"{chat_file}:2"]


def test_qlora_adapter_is_evaluated_on_a_4bit_base(memorised, facts, tmp_path, monkeypatch):
    qlora = shutil.copytree(memorised, tmp_path / "qlora")
    run_config = yaml.safe_load((qlora / "run_config.yaml").read_text())
    (qlora / "run_config.yaml").write_text(yaml.safe_dump({**run_config, "quantization": "4bit"}))
    seen = []
    real = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *a, **k: seen.append(k) or real(*a, **k))
    code, _ = run_eval("--adapter", str(qlora), "--eval_path", str(facts), "--max_new_tokens", "2", "--limit", "1",
                       "--output", str(tmp_path / "report.json"))
    assert code == 0
    assert seen[0]["quantization"] == "4bit"
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["quantization"] == "4bit" and all(math.isfinite(m["loss"]) for m in report["models"])


def test_quantisation_flags_override_the_adapters_record(memorised, facts, tmp_path):
    qlora = shutil.copytree(memorised, tmp_path / "qlora")
    run_config = yaml.safe_load((qlora / "run_config.yaml").read_text())
    # As lora-train saved it before `quantization` existed: two bools.
    old = {**{k: v for k, v in run_config.items() if k != "quantization"}, "load_in_4bit": True, "load_in_8bit": False}
    (qlora / "run_config.yaml").write_text(yaml.safe_dump(old))
    adapters = [read_adapter(qlora)]
    assert adapters[0].quantization == "4bit"
    decide = lambda *flags: evaluate.choose_quantization(eval_config("--eval_path", str(facts), *flags), adapters)
    assert decide() == "4bit" == decide("--quantization", "auto")
    assert decide("--no-load_in_4bit") is None and decide("--quantization", "none") is None
    assert decide("--load_in_8bit") == "8bit" == decide("--quantization", "8bit")
    with pytest.raises(UsageError, match="differently quantised"):
        evaluate.choose_quantization(eval_config("--eval_path", str(facts)),
                                     adapters + [read_adapter(memorised)])


# --- bad input: exit 2, one line, before any model loads --------------------------------------------------------------

@pytest.fixture()
def no_model_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", refuse)


@pytest.mark.parametrize("content, message", [
    ('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n{"messages": [\n',
     "bad.jsonl:2: invalid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}\n', "bad.jsonl:1: no assistant turn"),
    ('{"text": "hello"}\n', "bad.jsonl:1: no usable fields"),
    ("", "bad.jsonl: no rows"),
])
def test_bad_data_exits_2_before_loading_a_model(tiny_llama, tmp_path, capsys, no_model_loads, content, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(content, encoding="utf-8")
    code, _ = run_eval("--base_model", str(tiny_llama), "--eval_path", str(bad), "--output", str(tmp_path / "r.json"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("lora-eval: error: ") and message in err[-1]
    assert not (tmp_path / "r.json").exists()


def test_bad_flags_are_all_reported_at_once(tmp_path, capsys, no_model_loads):
    code, _ = run_eval("--eval_path", str(tmp_path / "missing.jsonl"), "--adapter", str(tmp_path), "--limit", "-1",
                       "--batch_size", "0", "--temperture", "0.5")
    err = capsys.readouterr().err
    assert code == 2
    for text in ("5 problems", "--eval_path: file not found", "no adapter_config.json", "--limit: must be >= 0",
                 "--batch_size: must be > 0", "unknown flag --temperture (did you mean --temperature?)"):
        assert text in err


def test_adapters_recording_different_bases_are_an_error(memorised, facts, tmp_path, capsys, no_model_loads):
    other = shutil.copytree(memorised, tmp_path / "other")
    run_config = yaml.safe_load((other / "run_config.yaml").read_text())
    (other / "run_config.yaml").write_text(yaml.safe_dump({**run_config, "base_model": "org/another-model"}))
    code, _ = run_eval("--adapter", str(memorised), "--adapter", str(other), "--eval_path", str(facts),
                       "--output", str(tmp_path / "r.json"))
    assert code == 2
    assert "record different base models" in capsys.readouterr().err


def test_adapter_flag_repeats_or_takes_a_list(facts, memorised, tmp_path):
    twin = shutil.copytree(memorised, tmp_path / "twin")
    repeated = eval_config("--eval_path", str(facts), "--adapter", str(memorised), "--adapter", str(twin))
    listed = eval_config("--eval_path", str(facts), "--adapter", f"{memorised}, {twin}")
    assert repeated.adapter_paths == listed.adapter_paths == [str(memorised), str(twin)]
    with pytest.raises(UsageError, match="given twice"):
        eval_config("--eval_path", str(facts), "--adapter", str(memorised), "--adapter", str(memorised))


def test_help_is_instant_and_torch_free():
    import subprocess
    import sys

    code = ("import sys; from lora_cli.cli.eval import main\ntry: main(['--help'])\nexcept SystemExit: pass\n"
            "assert 'torch' not in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "--adapter DIR" in proc.stdout and "--max_new_tokens" in proc.stdout


# --- prompts, stopping and metrics -----------------------------------------------------------------------------------

def test_prompt_is_the_conversation_before_the_final_assistant_turn(tokenizer):
    prompt, reference = evaluate.split_final_turn(CHAT + [{"role": "user", "content": "Thanks!"}])
    assert prompt == CHAT[:4] and reference == "Rome, of course."
    ids = chat.encode_prompt(tokenizer, prompt)
    full = chat.encode(tokenizer, CHAT).input_ids
    assert full[:len(ids)] == ids  # the model answers from exactly the tokens it was trained to continue


def test_generation_stops_at_the_templates_end_of_turn(tokenizer, llama3_tokenizer):
    import copy

    assert chat.end_of_turn_ids(tokenizer) == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    eot = llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert chat.end_of_turn_ids(llama3_tokenizer) == [eot, llama3_tokenizer.eos_token_id]
    inst = copy.deepcopy(tokenizer)
    inst.chat_template = INST_TEMPLATE
    assert chat.end_of_turn_ids(inst) == [inst.eos_token_id]
    assert scoring._until_stop([5, 6, eot, 7, 0], [eot]) == [5, 6, eot]


def test_match_metrics_normalise_case_and_whitespace():
    assert exact_match("  The answer:\n  PARIS ", "the answer: paris")
    assert not exact_match("Paris.", "Paris")
    assert contains_match("I think it is Paris, France", "paris")
    assert not contains_match("Par is", "Paris")
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))
    assert rouge_l("", "Paris") == rouge_l("Rome", "Paris") == 0.0


def _lcs_brute(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    if a[0] == b[0]:
        return 1 + _lcs_brute(a[1:], b[1:])
    return max(_lcs_brute(a[1:], b), _lcs_brute(a, b[1:]))


words = st.lists(st.sampled_from(["a", "b", "c", "D"]), max_size=7).map(" ".join)


@given(words, words)
def test_rouge_l_is_the_lcs_f1(answer, reference):
    a, r = answer.lower().split(), reference.lower().split()
    lcs = _lcs_brute(a, r)
    expected = 0.0 if lcs == 0 else 2 * lcs / (len(a) + len(r))  # F1 of precision lcs/|a| and recall lcs/|r|
    assert rouge_l(answer, reference) == pytest.approx(expected)
    assert rouge_l(answer, reference) == pytest.approx(rouge_l(reference, answer))
    assert 0.0 <= rouge_l(answer, reference) <= 1.0
