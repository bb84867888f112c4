"""Data from several sources: specs, weights, deterministic mixing, save_to_disk folders, the Hub loader offline,
and errors that still name the source and the row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lora_cli import sources
from lora_cli.errors import DataError, UsageError

from .conftest import ROOT, TINY_TRAIN, run_cli, write_jsonl


def _chat(tag: str, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag} question {i}?"},
                          {"role": "assistant", "content": f"{tag} answer {i}."}]} for i in range(n)]


def _save_to_disk(path, rows, splits=None):
    import datasets

    datasets.disable_progress_bars()
    if splits:
        datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    else:
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def _tags(mixture) -> list[str]:
    return [c.messages[0]["content"].split()[0] for c in mixture.conversations()]


@pytest.fixture()
def three(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", _chat("alpha", 30))
    b = write_jsonl(tmp_path / "b.jsonl", _chat("beta", 10))
    c = _save_to_disk(tmp_path / "saved", _chat("gamma", 20))
    return a, b, c


def test_spec_forms(tmp_path, three):
    a, b, c = three
    assert [(s.kind, s.weight) for s in sources.parse(str(a))] == [("file", None)]
    parsed = sources.parse(f"{a}:0.7,{c}:0.3")
    assert [(s.path, s.kind, s.weight) for s in parsed] == [(str(a), "file", 0.7), (str(c), "folder", 0.3)]
    assert [s.kind for s in sources.parse(str(tmp_path / "*.jsonl"))] == ["glob"]
    hub = sources.parse("org/ds,org/ds:test,org/ds:cfg:validation@v1.0")
    assert [(s.path, s.name, s.split, s.revision) for s in hub] == [
        ("org/ds", None, None, None), ("org/ds", None, "test", None), ("org/ds", "cfg", "validation", "v1.0")]
    assert hub[2].label == "org/ds:cfg:validation@v1.0"
    odd = tmp_path / "odd,name:1.jsonl"  # a path that exists is that path, commas and colons included
    odd.write_text(a.read_text())
    assert [s.path for s in sources.parse(str(odd))] == [str(odd)]


@pytest.mark.parametrize("spec, message", [
    ("{a}:0.7,{b}", "give every source a weight or none"),
    ("{a}:0,{b}:1", "must be above 0"),
    ("{a},missing.jsonl", "file not found: missing.jsonl"),
    ("{dir}/*.parquet", "no files match"),
    ("not/a/hub/id", "nor a Hub dataset id"),
    ("data/train.jsonl", r"file not found: data/train\.jsonl$"),  # one slash, but a file name: not a Hub id
])
def test_bad_specs_name_the_flag_and_the_item(tmp_path, three, spec, message):
    a, b, _ = three
    with pytest.raises(UsageError, match=message) as exc:
        sources.parse(spec.format(a=a, b=b, dir=tmp_path), "eval_path")
    assert str(exc.value).startswith("--eval_path")


def test_yaml_list(tmp_path, three):
    a, _, c = three
    spec = tmp_path / "mix.yaml"
    spec.write_text(f"- path: a.jsonl\n  weight: 3\n  limit: 12\n- path: {c}\n  weight: 1\n")
    parsed = sources.parse(str(spec))
    assert [(s.path, s.weight, s.limit) for s in parsed] == [(str(a), 3.0, 12), (str(c), 1.0, None)]
    mixture = sources.load(str(spec), seed=0)
    assert mixture.read == {str(a): 12, str(c): 20}  # the limit caps what is read
    assert mixture.counts == {str(a): 24, str(c): 8}  # 32 rows, shares 3:1
    spec.write_text("- path: a.jsonl\n  wieght: 3\n")
    with pytest.raises(UsageError, match="unknown keys wieght"):
        sources.parse(str(spec))


def test_weights_mix_files_and_a_datasets_folder_deterministically(three):
    a, b, c = three
    spec = f"{a}:0.5,{b}:0.25,{c}:0.25"
    first = sources.load(spec, seed=1)
    assert first.read == {str(a): 30, str(b): 10, str(c): 20}
    assert first.counts == {str(a): 30, str(b): 15, str(c): 15}  # 60 rows by weight: b repeated, c sampled
    assert len(first) == 60
    tags = _tags(first)
    assert tags.count("alpha") == 30 and tags.count("beta") == 15 and tags.count("gamma") == 15
    again, other = sources.load(spec, seed=1), sources.load(spec, seed=2)
    assert list(again.texts()) == list(first.texts())
    assert list(other.texts()) != list(first.texts())  # another seed samples other rows
    sampled = [c_.messages[0]["content"] for c_ in first.conversations() if c_.messages[0]["content"].startswith("gamma")]
    assert len(set(sampled)) == 15  # a sample without repeats
    assert sources.load(f"{a},{b}", seed=1).counts == {str(a): 30, str(b): 10}  # no weights: every row once


def test_folder_of_shards_glob_and_datasetdict_split(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", _chat("one", 3))
    write_jsonl(shards / "part-1.jsonl", _chat("two", 4))
    assert len(sources.load(str(shards), 0)) == 7
    assert len(sources.load(str(shards / "part-*.jsonl"), 0)) == 7
    dd = _save_to_disk(tmp_path / "dd", None, {"train": _chat("tr", 5), "test": _chat("te", 2)})
    assert _tags(sources.load(str(dd), 0)) == ["tr"] * 5  # train by default
    test = sources.load(f"{dd}:test", 0)
    assert _tags(test) == ["te"] * 2 and test.counts == {f"{dd}:test": 2}
    with pytest.raises(DataError, match="no split 'dev'"):
        sources.load(f"{dd}:dev", 0)


def test_bad_rows_name_their_source_and_row(tmp_path, three):
    a, _, _ = three
    bad = write_jsonl(tmp_path / "bad.jsonl", [*_chat("x", 2), {"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"bad\.jsonl:3"):
        sources.load(f"{a},{bad}", 0)
    saved = _save_to_disk(tmp_path / "bad_saved", [*_chat("y", 3), {"messages": [{"role": "wizard", "content": "hi"}]}])
    with pytest.raises(DataError, match=r"bad_saved:row 4"):
        sources.load(f"{a}:1,{saved}:1", 0)


def test_lora_data_reports_bad_rows_of_every_source(tiny_llama, tmp_path, three, capsys):
    from lora_cli.cli.data import main

    a, _, _ = three
    bad1 = write_jsonl(tmp_path / "bad1.jsonl", [*_chat("x", 2), {"messages": []}])
    saved = _save_to_disk(tmp_path / "bad_saved", [{"messages": [{"role": "wizard", "content": "hi"}]},
                                                   *_chat("y", 3)])
    code = run_cli(["--train_path", f"{a},{bad1},{saved}", "--base_model", str(tiny_llama), "--show", "0"], main)
    out = capsys.readouterr()
    text = out.out + out.err
    assert code == 2
    assert "bad1.jsonl:3" in text and "bad_saved:row 1" in text


def test_training_on_a_mixture_saves_the_counts(tiny_llama, three, tmp_path):
    a, b, c = three
    out = tmp_path / "run"
    assert run_cli(["--base_model", str(tiny_llama), "--train_path", f"{a}:2,{b}:1,{c}:1", "--output_dir", str(out),
                    *TINY_TRAIN]) == 0
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["data_sources"] == {str(a): 30, str(b): 15, str(c): 15}
    assert metrics["data"]["rows"] == 60


def _offline(code: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_hub_loader_offline(tmp_path):
    """The Hub path is datasets.load_dataset(id, name, split=, revision=); offline, the same call reads a local dataset
    folder (a Hub dataset repository's layout), and an id absent from the cache is one clear DataError."""
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    write_jsonl(repo / "data" / "train.jsonl", _chat("hub", 6))
    write_jsonl(repo / "data" / "test.jsonl", [*_chat("hubtest", 1), {"messages": [{"role": "wizard", "content": "x"}]}])
    code = f"""
from lora_cli import sources
from lora_cli.errors import DataError
train = list(sources.scan(sources.Source({str(repo)!r}, "hub")))
print(len(train), train[0][0], train[0][1]["messages"][0]["content"])
streamed = list(sources.scan(sources.Source({str(repo)!r}, "hub"), streaming=True))  # --streaming: read as it comes
print("streamed", streamed == train)
try:
    list(sources.scan(sources.Source({str(repo)!r}, "hub", split="test")))
    [__import__("lora_cli").data.normalise_row(raw, where) for where, raw in sources.scan(
        sources.Source({str(repo)!r}, "hub", split="test"))]
except DataError as exc:
    print("ERR", exc)
try:
    sources.load("nobody-here/no-such-dataset:train", 0)
except DataError as exc:
    print("ERR", exc)
"""
    done = _offline(code, tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"6 {repo}:row 1 hub question 0?"
    assert lines[1] == "streamed True"
    assert lines[2].startswith(f"ERR {repo}:test:row 2")
    assert lines[3].startswith("ERR nobody-here/no-such-dataset:train: cannot load the dataset")


def test_hub_id_offline_is_one_line_and_exit_2(tiny_llama, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, "-m", "lora_cli.cli.data", "--train_path", "nobody-here/no-such-dataset",
                           "--base_model", str(tiny_llama)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "nobody-here/no-such-dataset" in done.stderr and "Traceback" not in done.stderr


def test_fingerprint_follows_every_file_of_a_spec(tmp_path, three):
    """A resume compares it: editing any file of a mixture, or a weight, is a change; a single file keeps the plain
    sha256 of its bytes that run states written before data sources hold."""
    import hashlib

    a, b, c = three
    assert sources.fingerprint(str(a)) == hashlib.sha256(a.read_bytes()).hexdigest()
    spec = f"{a}:1,{b}:1,{c}:2"
    before = sources.fingerprint(spec)
    assert sources.fingerprint(spec) == before
    assert sources.fingerprint(f"{a}:1,{b}:1,{c}:3") != before
    write_jsonl(b, _chat("beta", 11))
    assert sources.fingerprint(spec) != before
