"""Assistant-only loss masks: exactly the assistant turns and their end-of-turn token, for several templates."""

from __future__ import annotations

import copy


from lora_cli.chat import IGNORE_INDEX, chatml_template, encode, resolve_chat_template

from .conftest import CHAT, INST_TEMPLATE


def trained_runs(tokenizer, enc) -> list[str]:
    """The decoded text of each maximal run of consecutive trained tokens."""
    runs, current = [], []
    for token, label in zip(enc.input_ids, enc.labels):
        if label != IGNORE_INDEX:
            assert label == token  # a trained label is the token itself (the model shifts it)
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def test_chatml_masks_exactly_assistant_turns_and_im_end(tokenizer):
    enc = encode(tokenizer, CHAT)
    # Content plus <|im_end|> is trained; the "\n" after it, the headers, system and user text are not.
    assert trained_runs(tokenizer, enc) == ["Paris<|im_end|>", "Rome, of course.<|im_end|>"]
    assert enc.turns == enc.turns_with_end == 2
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert sum(1 for t, lab in zip(enc.input_ids, enc.labels) if t == im_end and lab == im_end) == 2
    # Every untrained token is outside the assistant turns: the masked text holds all user and system content.
    masked = tokenizer.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX])
    for message in CHAT:
        if message["role"] != "assistant":
            assert message["content"] in masked
    assert "Paris" not in masked and "Rome" not in masked


def test_default_system_prompt_of_template_is_masked(tokenizer):
    # SmolLM2's template injects its own system prompt when the conversation has none.
    enc = encode(tokenizer, CHAT[1:3])
    assert trained_runs(tokenizer, enc) == ["Paris<|im_end|>"]
    assert "SmolLM" in tokenizer.decode(enc.input_ids)


def test_llama3_style_template_trains_eot_id(llama3_tokenizer):
    enc = encode(llama3_tokenizer, CHAT)
    assert trained_runs(llama3_tokenizer, enc) == ["Paris<|eot_id|>", "Rome, of course.<|eot_id|>"]
    assert enc.turns_with_end == 2


def test_template_without_generation_prompt(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = INST_TEMPLATE
    enc = encode(tok, CHAT[1:])  # this template ignores system messages
    assert trained_runs(tok, enc) == [" Paris<|im_end|>", " Rome, of course.<|im_end|>"]


def test_train_on_inputs_trains_every_token(tokenizer):
    enc = encode(tokenizer, CHAT, train_on_inputs=True)
    assert enc.labels == enc.input_ids


def test_token_ids_equal_plain_tokenisation_of_rendered_text(tokenizer):
    # Masking must not change what the model sees: ids are the tokenizer's own for the rendered conversation.
    enc = encode(tokenizer, CHAT)
    text = tokenizer.apply_chat_template(CHAT, tokenize=False)
    assert enc.input_ids == tokenizer(text, add_special_tokens=False)["input_ids"]


def test_repeated_content_is_located_in_the_right_turn(tokenizer):
    chat = [{"role": "user", "content": "yes"}, {"role": "assistant", "content": "yes"},
            {"role": "user", "content": "yes"}, {"role": "assistant", "content": "yes"}]
    enc = encode(tokenizer, chat)
    assert trained_runs(tokenizer, enc) == ["yes<|im_end|>", "yes<|im_end|>"]


def test_template_that_renders_earlier_turns_differently(tokenizer):
    # Like Qwen3: reasoning is removed from earlier assistant turns, so prefixes are not prefixes of the whole.
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\\n' + m['content'].split('</think>')[-1] + '<|im_end|>\\n' }}"
        "{% else %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>x</think>first"},
            {"role": "user", "content": "b"}, {"role": "assistant", "content": "second"}]
    # Each turn is trained as the template renders it in this conversation: the earlier one without its reasoning.
    enc = encode(tok, chat, where="f.jsonl:1")
    assert trained_runs(tok, enc) == ["first<|im_end|>", "second<|im_end|>"]
    assert (enc.reasoning_turns, enc.reasoning_trained) == (1, 0)
    chat[1]["content"] = "first"
    assert trained_runs(tok, encode(tok, chat)) == ["first<|im_end|>", "second<|im_end|>"]


def test_missing_template_falls_back_to_chatml_with_warning(tokenizer, caplog):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = None
    with caplog.at_level("WARNING", logger="lora_cli"):
        template = resolve_chat_template(tok, "")
    assert template == chatml_template("<|im_end|>") and "no chat template" in caplog.text
    assert trained_runs(tok, encode(tok, CHAT)) == ["Paris<|im_end|>", "Rome, of course.<|im_end|>"]


def test_chat_template_override_from_file(tokenizer, tmp_path):
    tok = copy.deepcopy(tokenizer)
    path = tmp_path / "inst.jinja"
    path.write_text(INST_TEMPLATE)
    assert resolve_chat_template(tok, str(path)) == INST_TEMPLATE
    assert tok.chat_template == INST_TEMPLATE


def test_collator_keeps_eos_labels_although_pad_is_eos(tokenizer):
    # SmolLM2 pads with <|im_end|>, its end-of-turn token: padding must not mask the trained end-of-turn tokens.
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    assert tokenizer.pad_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")
    short, long = encode(tokenizer, CHAT[1:3]), encode(tokenizer, CHAT)
    collator = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)
    batch = collator([{"input_ids": e.input_ids, "labels": e.labels} for e in (short, long)])
    assert batch["labels"][0, : len(short.labels)].tolist() == short.labels
    assert (batch["labels"][0, len(short.labels):] == IGNORE_INDEX).all()
    assert batch["labels"][1].tolist() == long.labels


def test_first_answer_token_trained_when_the_prompt_ends_in_a_space(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    enc = encode(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello there, friend"}])
    assert trained_runs(tok, enc) == [" Hello there, friend<|im_end|>"]
    one = encode(tok, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Yes"}])
    assert trained_runs(tok, one) == [" Yes<|im_end|>"]


def test_slow_tokenizer_path_trains_the_same_tokens(tokenizer):
    # Tokenizers without offset mappings are encoded piece by piece at the span boundaries: same trained tokens.
    class Slow:
        is_fast = False

        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __call__(self, *args, **kwargs):
            kwargs.pop("return_offsets_mapping", None)
            return tokenizer(*args, **kwargs)

    fast, slow = encode(tokenizer, CHAT), encode(Slow(), CHAT)
    assert trained_runs(tokenizer, slow) == trained_runs(tokenizer, fast) == ["Paris<|im_end|>",
                                                                                "Rome, of course.<|im_end|>"]


def test_phi3_mini_own_tokens_and_template_are_masked():
    """Phi-3-mini as it ships: its template closes a conversation with EOS when no generation prompt is asked for,
    and its end-of-turn token takes the newline after it (rstrip). Each answer and its <|end|> are trained, nothing
    of the next turn."""
    from tokenizers import AddedToken
    from transformers import AutoTokenizer

    from lora_cli.chat import encode

    from .conftest import CHAT
    from .test_export_families import PHI3_MINI_TEMPLATE, PHI3_TOKENS, _tokenizer_folder

    tok = AutoTokenizer.from_pretrained(_tokenizer_folder("llama2"))
    tok.add_special_tokens({"additional_special_tokens": [
        AddedToken(t, special=True, normalized=False, rstrip=t != "<|endoftext|>") for t in PHI3_TOKENS]},
        replace_extra_special_tokens=False)
    tok.chat_template, tok.eos_token = PHI3_MINI_TEMPLATE, "<|endoftext|>"
    encoded = encode(tok, CHAT)
    trained = [tok.decode([t]) for t, label in zip(encoded.input_ids, encoded.labels) if label != -100]
    assert trained == ["Paris", "<|end|>", "Rome", ",", "of", "course", ".", "<|end|>"]
    assert encoded.turns == encoded.turns_with_end == 2
