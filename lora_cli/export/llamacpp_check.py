"""The written GGUF run in llama.cpp itself and compared with the source model run in transformers: the same ids for
the same text, the same chat prompts from the GGUF's own template, the same most likely next token at every position
of a few conversations, and the same greedy answers."""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from .. import chat, llamacpp
from ..errors import DataError
from ..verification import BUILTIN_PROMPTS, logit_differences, next_token_logits
from .source import Source
from .tensors import plan_tensors, round_as_stored
from .verify import ROUNDED_REFERENCE, TRICKY_STRINGS, probe_conversations
from .vocab import Vocab

log = logging.getLogger("lora_cli")

ANSWER_TOKENS = 24
TOP_K = 8
# How far llama.cpp's next-token logits may be from the source's (fp32, transformers), relative to the logit scale
# (the largest |logit| of the source): the rounding of the weights to --outtype plus llama.cpp's own arithmetic (it
# multiplies in f16, or quantises activations to 8 bits for quantised weights). Where the two disagree on the most
# likely token, the source itself must be within this margin of a tie there.
# q4_0 is compared with the source rounded as the file stores it (verify.ROUNDED_REFERENCE), which leaves llama.cpp's
# arithmetic (activations rounded to 8 bits): up to 10.0% of the logit scale (gap 1.2%) on the demo model and 1.2%
# (1.0%) on tiny ones, against 34-80% (gap 29-40%) with q/k rows in the wrong order (docs/benchmarks.md, "q4_0
# verification"); the 20% margin sits between.
TOLERANCES = {"f32": 2e-2, "f16": 2e-2, "bf16": 6e-2, "q8_0": 1e-1, "q4_0": 2e-1}


def verify_in_llamacpp(runtime: llamacpp.Runtime, source: Source, gguf_path: Path, tokenizer: Any, vocab: Vocab,
                       outtype: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    conversations = probe_conversations(tokenizer)
    specials = chat._special_strings(tokenizer)[:8]
    texts = rendered_conversations(tokenizer) + TRICKY_STRINGS + specials
    prompts = [messages[:-1] for messages in BUILTIN_PROMPTS] if getattr(tokenizer, "chat_template", None) else []
    log.info("verifying in llama.cpp (node-llama-cpp %s, CPU): %d texts, %d conversations, %d greedy answers, "
             "against the source model in transformers (fp32)", runtime.version, len(texts), len(conversations),
             len(prompts))
    ran = llamacpp.run(runtime, gguf_path, tokenize=texts, sequences=conversations, chats=prompts,
                       max_tokens=ANSWER_TOKENS, top_k=TOP_K)
    model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32)
    reference = next_token_logits(model, conversations)
    rounding = None
    if outtype in ROUNDED_REFERENCE:
        round_as_stored(model, plan_tensors(source, outtype))
        rounded = next_token_logits(model, conversations)
        rounding = logit_differences(reference, rounded)  # what --outtype itself costs: reported, not judged
        reference = rounded
    stops = stop_ids(tokenizer, vocab) if prompts else [tokenizer.eos_token_id]
    # The same prompt ids as llama.cpp's chat session rendered: runtimes render some templates their own way (e.g.
    # node-llama-cpp closes Qwen3's empty <think> block in the prompt), which is no property of the file.
    expected = [greedy(model, answer.prompt, stops) for answer in ran.answers]
    del model
    gc.collect()
    margin = TOLERANCES[outtype]
    result = {"runtime": f"llama.cpp (node-llama-cpp {runtime.version})", "metadata": ran.metadata,
              "tokenizer": compare_ids(tokenizer, texts, ran.tokens, vocab.model == "llama"),
              "logits": compare_top(reference, ran.top, margin),
              "answers": [compare_answer(tokenizer, p, e, a, margin, chat.encode_prompt(tokenizer, p))
                          for p, e, a in zip(prompts, expected, ran.answers)],
              "reference": f"source rounded as the file stores {outtype}" if rounding else "source"}
    if rounding:
        result["rounding"] = {k: rounding[k] for k in ("top1_agreement", "max_rel_logit_diff", "mean_kl")}
    result["passed"] = result["tokenizer"]["passed"] and result["logits"]["passed"] and \
        all(a["passed"] for a in result["answers"])
    return result


def stop_ids(tokenizer: Any, vocab: Vocab) -> list[int]:
    """Where the source's greedy answers stop: the end of a turn as training finds it, else (a template training
    cannot mask: probe_conversations has warned) the GGUF's end-of-turn and EOS tokens."""
    try:
        return chat.end_of_turn_ids(tokenizer)
    except DataError:
        return [i for i in (vocab.special.get("eot"), tokenizer.eos_token_id) if i is not None]


def greedy(model: Any, prompt: list[int], stops: list[int]) -> dict[str, Any]:
    """The source's greedy answer and its logits at each step (to tell a real divergence from a near tie)."""
    import torch
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=ANSWER_TOKENS, do_sample=False, eos_token_id=stops,
                              pad_token_id=stops[-1], output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), generation_config=config)
    ids = out.sequences[0, len(prompt):].tolist()
    return {"prompt": prompt, "ids": [i for i in ids if i not in stops],
            "logits": [step[0].to(torch.float32) for step in out.logits]}


def rendered_conversations(tokenizer: Any) -> list[str]:
    """The probe conversations as text, as training renders them (decoding ids would add spaces of its own)."""
    if getattr(tokenizer, "chat_template", None):
        try:
            return [chat.render(tokenizer, messages) for messages in BUILTIN_PROMPTS]
        except Exception:  # noqa: BLE001 - probe_conversations has already warned about this template
            pass
    return [" ".join(m["content"] for m in messages) for messages in BUILTIN_PROMPTS]


def compare_ids(tokenizer: Any, texts: list[str], llama_ids: list[list[int]], sentencepiece: bool) -> dict[str, Any]:
    """Texts llama.cpp tokenises differently. For SentencePiece vocabularies, text that starts with a space is set
    apart: transformers 5 writes no "▁" before text that already starts with one, SentencePiece and llama.cpp do."""
    mismatched = [t for t, ids in zip(texts, llama_ids) if tokenizer(t, add_special_tokens=False)["input_ids"] != ids]
    leading = [t for t in mismatched if sentencepiece and t[:1].isspace()]
    mismatched = [t for t in mismatched if t not in leading]
    return {"texts": len(texts), "mismatched": mismatched, "leading_space": leading, "passed": not mismatched}


def compare_top(reference: list[Any], top: list[list[list[tuple[int, float]]]], margin: float) -> dict[str, Any]:
    """Top-1 agreement at every position; where llama.cpp's choice differs, how far the source's logit for it is below
    the source's best (a near tie is no error); the largest difference over llama.cpp's top-k logits."""
    scale = max(float(r.abs().max()) for r in reference) or 1.0
    positions = agree = 0
    worst_gap = max_diff = 0.0
    for ref, seq in zip(reference, top):
        for logits, pairs in zip(ref, seq):
            positions += 1
            choice = pairs[0][0]
            best = float(logits.max())
            agree += int(choice == int(logits.argmax()))
            worst_gap = max(worst_gap, (best - float(logits[choice])) / scale)
            max_diff = max(max_diff, *(abs(v - float(logits[i])) / scale for i, v in pairs))
    return {"positions": positions, "top1_agreement": agree / max(positions, 1), "max_rel_logit_diff": max_diff,
            "worst_rel_gap": worst_gap, "logit_scale": scale, "tolerance": margin,
            "passed": positions > 0 and max_diff <= margin and worst_gap <= margin}


def compare_answer(tokenizer: Any, messages: list[dict], expected: dict[str, Any], answer: llamacpp.Answer,
                   margin: float, training_prompt: list[int]) -> dict[str, Any]:
    """llama.cpp's greedy answer against the source's on the same prompt ids: the same answer up to where the source
    itself was within `margin` of a tie. Whether llama.cpp's rendering equals training's is reported alongside."""
    got, want = answer.tokens, expected["ids"]
    diverged = next((k for k, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if diverged is None and len(got) != len(want) and min(len(got), len(want)) < ANSWER_TOKENS:
        diverged = min(len(got), len(want))  # one stopped where the other went on
    near_tie = False
    if diverged is not None and diverged < len(got) and diverged < len(expected["logits"]):
        logits = expected["logits"][diverged]
        scale = float(logits.abs().max()) or 1.0
        near_tie = (float(logits.max()) - float(logits[got[diverged]])) / scale <= margin
    return {"question": messages[-1]["content"], "source": tokenizer.decode(want), "llama_cpp": answer.text,
            "same_prompt": answer.prompt == training_prompt, "llama_cpp_prompt": tokenizer.decode(answer.prompt),
            "same": diverged is None, "diverged_at": diverged, "near_tie": near_tie,
            "passed": diverged is None or near_tie}


def log_llamacpp_verification(result: dict[str, Any], outtype: str) -> None:
    tk, lg, answers = result["tokenizer"], result["logits"], result["answers"]
    meta = result["metadata"]
    log.info("llama.cpp loaded it: architecture %s, pre-tokenizer %s", meta.get("architecture"), meta.get("pre"))
    if tk.get("leading_space"):
        log.warning("llama.cpp tokenizer: %d text(s) starting with a space get a different first token, e.g. %r: "
                    "transformers 5 adds no \"▁\" before text that already starts with a space, SentencePiece and "
                    "llama.cpp do (chat templates rarely start a segment with a space)", len(tk["leading_space"]),
                    tk["leading_space"][0])
    log.info("llama.cpp tokenizer: %s -> %s", f"ids differ on {len(tk['mismatched'])} of {tk['texts']} texts (e.g. "
             f"{tk['mismatched'][0]!r})" if tk["mismatched"] else "same ids as the source on "
             f"{tk['texts'] - len(tk.get('leading_space', []))} of {tk['texts']} texts "
             "(chat prompts, unicode, whitespace, special tokens)", "PASS" if tk["passed"] else "FAIL")
    if "rounding" in result:
        rd = result["rounding"]
        log.info("%s itself, in transformers: top-1 agreement with the unrounded source %.1f%%, max |diff| %.3g%% of "
                 "the logit scale, mean KL %.2e (reported, not judged: llama.cpp is judged against the rounded "
                 "source)", outtype, 100 * rd["top1_agreement"], 100 * rd["max_rel_logit_diff"], rd["mean_kl"])
    log.info("llama.cpp next tokens vs %s (%d positions): top-1 agreement %.1f%%, largest gap to the source's "
             "best where they differ %.3g%%, max |diff| over top-%d logits %.3g%% of the logit scale %.3g (limit "
             "%.3g%% for %s) -> %s", result.get("reference", "source"), lg["positions"], 100 * lg["top1_agreement"],
             100 * lg["worst_rel_gap"], TOP_K, 100 * lg["max_rel_logit_diff"], lg["logit_scale"],
             100 * lg["tolerance"], outtype, "PASS" if lg["passed"] else "FAIL")
    if answers:
        same = sum(a["same"] for a in answers)
        log.info("llama.cpp greedy answers (GGUF's own chat template): %d of %d identical to transformers%s -> %s",
                 same, len(answers), "" if same == len(answers) else
                 f", {sum(a['near_tie'] for a in answers)} part at a near tie of the source",
                 "PASS" if all(a["passed"] for a in answers) else "FAIL")
        differs = [a for a in answers if not a["same_prompt"]]
        if differs:
            log.info("  llama.cpp's chat session renders %d of %d prompts unlike training (answers compared on its "
                     "prompt), e.g. %r", len(differs), len(answers), differs[0]["llama_cpp_prompt"][-80:])
        for a in answers:
            if not a["same"]:
                log.info("  %r: transformers %r, llama.cpp %r (from token %d)", a["question"], a["source"],
                         a["llama_cpp"], a["diverged_at"])
        first = answers[0]
        log.info("  e.g. %r -> %r", first["question"], first["llama_cpp"])
