"""lora-eval: score a base model and LoRA adapters on the same held-out chat rows, the way lora-train saw them.

Each model gets the assistant-token loss and perplexity (lora-train's chat template, masking and length rules,
token-weighted over the whole set) and answers generated from each row's prompt (the conversation up to its final
assistant turn), scored against that turn by exact match, contains-match and ROUGE-L F1, with generation speed.
The base loads once; adapters are switched on and off on top of it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from . import chat, data, fsutil, models
from .adapters import Adapter, load_adapter_tokenizer, read_adapter
from .config import data_file_problem, opt, split_list
from .encode import EncodeStats, encode_rows
from .errors import DataError, UsageError, one_line
from .filenames import GENERATIONS

log = logging.getLogger("lora_cli")

BASE = "base"


@dataclass
class EvalConfig:
    PROG = "lora-eval"
    DESCRIPTION = ("Compare a base model with LoRA adapters on held-out chat data, on the same rows: assistant-token "
                   "loss and perplexity exactly as lora-train computes them, and answers to each row's final "
                   "assistant turn (greedy by default) scored by exact match, contains-match and ROUGE-L.")
    EPILOG = ("Example: lora-eval --adapter runs/demo --eval_path data/sample/eval.jsonl --output "
              "runs/demo-eval/report.json")
    GROUPS = {"run": "run", "model": "models", "data": "data and chat template", "generation": "generation"}

    # --- run ---------------------------------------------------------------------------------------------------------
    output: str = opt("report.json", "Where the JSON report with every number is written; generations.jsonl (each "
                                     "row's prompt, reference and every model's answer) goes into the same folder.",
                      group="run", metavar="FILE")
    debug: bool = opt(False, "Show full tracebacks and library warnings.", group="run")

    # --- models ------------------------------------------------------------------------------------------------------
    base_model: str = opt("", "Base model: a Hub id, a local Hugging Face folder (a merged model too) or a .gguf "
                              "file. Empty: the base the adapters record, else the embedded demo model.",
                          group="model", metavar="MODEL")
    adapter: str = opt("", "LoRA adapter folder (as written by lora-train) to evaluate on the base model. Repeat the "
                           "flag, or give a comma-separated list, to compare several.", group="model",
                       metavar="DIR", repeatable=True)
    load_in_4bit: bool | None = opt(None, "Load the base model in 4-bit NF4 (QLoRA). Not given: as the adapters were "
                                          "trained; --no-load_in_4bit evaluates on full-precision weights.",
                                    group="model")
    load_in_8bit: bool | None = opt(None, "Load the base model in 8-bit. Not given: as the adapters were trained.",
                                    group="model")
    precision: str = opt("auto", "Compute precision. auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on "
                                 "CPU.", group="model", choices=("auto", "bf16", "fp16", "fp32"))
    trust_remote_code: bool = opt(False, "Run model code shipped with the model repository.", group="model")
    attn_implementation: str = opt("sdpa", "Attention kernel passed to transformers.", group="model",
                                   choices=("sdpa", "eager", "flash_attention_2", "flash_attention_3"))

    # --- data --------------------------------------------------------------------------------------------------------
    eval_path: str = opt("", "Evaluation data (required), in any format lora-train reads: .jsonl/.json/.parquet/.csv "
                             "with OpenAI messages, ShareGPT, Alpaca or prompt/completion rows.", group="data",
                         metavar="FILE")
    limit: int = opt(0, "Evaluate only the first N rows of --eval_path (0: all).", group="data")
    max_seq_length: int = opt(2048, "Longest tokenised conversation scored, as in lora-train.", group="data")
    truncation: str = opt("drop", "Rows longer than --max_seq_length: drop them or truncate them, as lora-train "
                                  "does. Dropped rows are left out of every metric.", group="data",
                          choices=("drop", "truncate"))
    chat_template: str = opt("", "Override the chat template: 'chatml' or a .jinja file. Empty: the template the "
                                 "adapters were trained with (saved with their tokenizer), else the base model's.",
                             group="data", metavar="NAME|PATH")
    chat_template_kwargs: str = opt("", chat.TEMPLATE_KWARGS_HELP + " Empty: those the adapter was trained with "
                                        "(its run config), else none.", group="data", metavar="JSON")

    # --- generation --------------------------------------------------------------------------------------------------
    max_new_tokens: int = opt(256, "Longest generated answer, in tokens; generation also stops at the chat "
                                   "template's end-of-turn token and at EOS.", group="generation")
    batch_size: int = opt(8, "Rows per forward pass, for the loss and for generation.", group="generation")
    temperature: float = opt(0.0, "Sampling temperature; 0 decodes greedily.", group="generation")
    top_p: float = opt(1.0, "Nucleus sampling threshold (with --temperature > 0).", group="generation")
    seed: int = opt(42, "Random seed for sampling.", group="generation")

    @property
    def adapter_paths(self) -> list[str]:
        return split_list(self.adapter)

    def problems(self) -> list[str]:
        problem = data_file_problem("eval_path", self.eval_path, required=True)
        errors: list[str] = [problem] if problem else []
        paths = self.adapter_paths
        errors += [f"--adapter {p}: given twice" for p in dict.fromkeys(paths) if paths.count(p) > 1]
        for path in dict.fromkeys(paths):
            try:
                read_adapter(path, "--adapter")
            except UsageError as exc:
                errors.append(str(exc))
        if self.load_in_4bit and self.load_in_8bit:
            errors.append("--load_in_4bit and --load_in_8bit both set: choose one")
        for name in ("max_seq_length", "batch_size", "max_new_tokens"):
            if getattr(self, name) <= 0:
                errors.append(f"--{name}: must be > 0, got {getattr(self, name)}")
        if self.limit < 0:
            errors.append(f"--limit: must be >= 0 (0: every row), got {self.limit}")
        if self.temperature < 0:
            errors.append(f"--temperature: must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            errors.append(f"--top_p: must be in (0, 1], got {self.top_p}")
        if self.chat_template and self.chat_template != "chatml" and not os.path.isfile(self.chat_template):
            errors.append(f"--chat_template: {self.chat_template!r} is neither 'chatml' nor an existing .jinja file")
        errors += [p for p in [chat.template_kwargs_problem(self.chat_template_kwargs)] if p]
        if not self.output:
            errors.append("--output: empty; give the report's file name, e.g. report.json")
        elif os.path.isdir(self.output):
            errors.append(f"--output {self.output}: is a folder; give the report's file name, e.g. "
                          f"{os.path.join(self.output, 'report.json')}")
        return errors


# --- before any model loads ------------------------------------------------------------------------------------------

@dataclass
class Prepared:
    """Everything known before the model loads: fast to build, so bad input fails in seconds."""

    base: models.BaseModel
    adapters: list[Adapter]
    quantization: str | None  # "4bit", "8bit" or None
    tokenizer: Any
    rows: list[data.Conversation]  # the rows scored: after --limit and lora-train's length rules
    loss: dict[str, list]  # input_ids and labels of those rows, exactly as lora-train encodes them
    prompts: list[list[int]]  # per row: the conversation up to its final assistant turn, plus the generation prompt
    references: list[str]  # per row: the final assistant turn
    stats: EncodeStats
    rows_read: int  # rows in --eval_path (before --limit)


def prepare(cfg: EvalConfig) -> Prepared:
    """Read the adapters and the data, choose the base, tokenise: every bad-input error surfaces here."""
    adapters = [read_adapter(path, "--adapter") for path in cfg.adapter_paths]
    spec = base_spec(cfg, adapters)
    quantization = choose_quantization(cfg, adapters)
    rows = data.load_conversations(cfg.eval_path)
    rows_read = len(rows)
    rows = rows[:cfg.limit] if cfg.limit else rows
    _check_output(Path(cfg.output))
    base = models.resolve(spec)
    tokenizer = load_tokenizer(cfg, base, adapters)
    columns, stats = encode_rows(tokenizer, rows, max_seq_length=cfg.max_seq_length, truncation=cfg.truncation,
                                 train_on_inputs=False, name=cfg.eval_path, row_index=True)
    rows = [rows[i] for i in columns.pop("row")]  # every metric covers the same rows
    prompts, references = [], []
    for row in rows:
        prompt, reference = split_final_turn(row.messages)
        try:
            prompts.append(chat.encode_prompt(tokenizer, prompt, row.tools))
        except Exception as exc:  # jinja raises several types, e.g. for a template that wants a user turn first
            raise DataError(f"{row.where}: the chat template cannot render the prompt before the final assistant "
                            f"turn: {exc}") from None
        references.append(reference)
    return Prepared(base, adapters, quantization, tokenizer, rows, columns, prompts, references, stats, rows_read)


def base_spec(cfg: EvalConfig, adapters: list[Adapter]) -> str:
    """--base_model, else the base model the adapters record (they must agree), else "" (the demo model)."""
    recorded: dict[str, list[str]] = {}
    for adapter in adapters:
        recorded.setdefault(adapter.base_spec, []).append(str(adapter.path))
    if cfg.base_model:
        for spec, paths in recorded.items():
            if spec != cfg.base_model:
                log.info("%s: trained on %s; evaluating on --base_model %s", ", ".join(paths), _spec_name(spec),
                         cfg.base_model)
        return cfg.base_model
    if len(recorded) > 1:
        listing = "; ".join(f"{', '.join(paths)}: {_spec_name(spec)}" for spec, paths in recorded.items())
        raise UsageError(f"--adapter: the adapters record different base models ({listing}); evaluate them "
                         "separately, or pass --base_model to put them all on one")
    return next(iter(recorded), "")


def _spec_name(spec: str) -> str:
    return spec or "the embedded demo model"


def choose_quantization(cfg: EvalConfig, adapters: list[Adapter]) -> str | None:
    """Either quantisation flag decides; when neither is given, the base is loaded as the adapters were trained."""
    if cfg.load_in_4bit is not None or cfg.load_in_8bit is not None:
        return "4bit" if cfg.load_in_4bit else "8bit" if cfg.load_in_8bit else None
    recorded: dict[str | None, list[str]] = {}
    for adapter in adapters:
        recorded.setdefault(adapter.quantization, []).append(str(adapter.path))
    if len(recorded) > 1:
        listing = "; ".join(f"{', '.join(paths)}: {q or 'full precision'}" for q, paths in recorded.items())
        raise UsageError(f"--adapter: the adapters were trained on differently quantised bases ({listing}); pass "
                         "--load_in_4bit, --load_in_8bit or --no-load_in_4bit to evaluate them all one way")
    quantization = next(iter(recorded), None)
    if quantization:
        log.info("loading the base in %s as the adapters were trained (QLoRA); --no-%s evaluates on full-precision "
                 "weights", quantization, "load_in_4bit" if quantization == "4bit" else "load_in_8bit")
    return quantization


def load_tokenizer(cfg: EvalConfig, base: models.BaseModel, adapters: list[Adapter]) -> Any:
    """One tokenizer for every model, so that all score the same tokens: the adapters' own (it carries the chat
    template they were trained with), else the base model's; --chat_template overrides the template."""
    if not adapters:
        tokenizer = models.load_tokenizer(base, cfg.trust_remote_code)
    else:
        tokenizers = [load_adapter_tokenizer(a, base, cfg.trust_remote_code) for a in adapters]
        if not cfg.chat_template and len({t.chat_template for t in tokenizers}) > 1:
            raise UsageError("--adapter: the adapters were trained with different chat templates, so they would not "
                             "score the same tokens; pass --chat_template to evaluate all with one")
        tokenizer = tokenizers[0]
    chat.resolve_chat_template(tokenizer, cfg.chat_template, _template_kwargs(cfg, adapters))
    return tokenizer


def _template_kwargs(cfg: EvalConfig, adapters: list[Adapter]) -> dict[str, Any]:
    """--chat_template_kwargs, else those the (first) adapter was trained with, so prompts render as in training."""
    if cfg.chat_template_kwargs or not adapters:
        return chat.parse_template_kwargs(cfg.chat_template_kwargs)
    saved = (adapters[0].run_config or {}).get("chat_template_kwargs") or ""
    return dict(saved) if isinstance(saved, dict) else chat.parse_template_kwargs(saved)


def split_final_turn(messages: list[dict]) -> tuple[list[dict], str]:
    """The conversation before its final assistant turn (the prompt), and that turn's text (the reference)."""
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last], messages[last]["content"]


def _check_output(path: Path) -> None:
    """Create the report's folder now, so that an unwritable --output fails before the models load."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output {path}: cannot create its folder ({exc.strerror or exc})") from None
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise UsageError(f"--output {path}: not writable")


# --- metrics ---------------------------------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """Lower case, whitespace runs collapsed to one space, ends stripped."""
    return " ".join(text.lower().split())


def exact_match(answer: str, reference: str) -> bool:
    return normalise(answer) == normalise(reference)


def contains_match(answer: str, reference: str) -> bool:
    """The reference appears in the answer (after normalisation): right, with extra words around it."""
    return normalise(reference) in normalise(answer)


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 on normalised whitespace tokens: the longest common subsequence against both lengths."""
    a, r = normalise(answer).split(), normalise(reference).split()
    common = _lcs_length(a, r)
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _lcs_length(a: list[str], b: list[str]) -> int:
    if len(b) > len(a):
        a, b = b, a  # the row is the shorter list: O(len(b)) memory
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def perplexity(loss: float) -> float | None:
    """exp(loss), or None where it overflows a float (JSON has no infinity)."""
    return math.exp(loss) if loss < 709 else None


# --- scoring ---------------------------------------------------------------------------------------------------------

@dataclass
class ModelScore:
    name: str  # "base", or the adapter folder as given
    adapter: str | None
    loss: float
    perplexity: float | None
    trained_tokens: int
    exact_match: float  # fractions of the rows
    contains: float
    rouge_l: float
    generated_tokens: int
    generation_seconds: float
    tokens_per_second: float
    answers: list[str] = field(repr=False)
    row_scores: list[dict[str, Any]] = field(repr=False)

    def metrics(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in ("answers", "row_scores")}


# What the table and the differences to the base show, and whether a higher value is better.
METRICS = {"loss": False, "perplexity": False, "exact_match": True, "contains": True, "rouge_l": True,
           "tokens_per_second": True}


def evaluate(cfg: EvalConfig) -> dict[str, Any]:
    from .preference import rows as preference_rows

    if preference_rows.file_kind(cfg.eval_path) == preference_rows.PAIRED:  # prompt, chosen, rejected
        from .preference.evaluation import evaluate_preferences

        return evaluate_preferences(cfg)
    start = time.perf_counter()
    prepared = prepare(cfg)
    # (name, adapter index): the base first, with every adapter switched off, then each adapter on it.
    runs = [(BASE, None)] + [(str(a.path), i) for i, a in enumerate(prepared.adapters)]
    log.info("evaluating %d model%s on %d rows of %s (%d trained tokens)", len(runs), "s" * (len(runs) > 1),
             len(prepared.rows), cfg.eval_path, prepared.stats.trained_tokens)
    precision = models.choose_precision(cfg.precision)
    model = load_models(cfg, prepared, precision)
    stop_ids = chat.end_of_turn_ids(prepared.tokenizer)
    scores = []
    for name, adapter_index in runs:
        with _active(model, adapter_index):
            scores.append(score_model(model, prepared, cfg, name, stop_ids))
    report = build_report(cfg, prepared, scores, precision, stop_ids, time.perf_counter() - start)
    write_outputs(Path(cfg.output), report, prepared, scores)
    print_table(report)
    return report


def load_models(cfg: EvalConfig, prepared: Prepared, precision: str) -> Any:
    """The base model, once, with every adapter loaded on top under its own name (peft's multi-adapter model)."""
    q = prepared.quantization
    log.info("loading %s (%s%s)", prepared.base.display, precision,
             ", 4-bit NF4" if q == "4bit" else ", 8-bit" if q == "8bit" else "")
    model = models.load_model(prepared.base, precision=precision, load_in_4bit=q == "4bit", load_in_8bit=q == "8bit",
                              trust_remote_code=cfg.trust_remote_code, attn_implementation=cfg.attn_implementation)
    if q is None:  # quantised weights were placed at load time
        model.to(_device())
    for index, adapter in enumerate(prepared.adapters):
        model = _load_adapter(model, adapter, index, prepared.base)
    model.eval()
    return model


def _load_adapter(model: Any, adapter: Adapter, index: int, base: models.BaseModel) -> Any:
    from peft import PeftModel

    name = _adapter_name(index)
    try:
        if index == 0:
            return PeftModel.from_pretrained(model, str(adapter.path), adapter_name=name, is_trainable=False)
        model.load_adapter(str(adapter.path), adapter_name=name, is_trainable=False)
        return model
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches and missing modules
        detail = one_line(exc)
        raise UsageError(f"--adapter {adapter.path}: does not fit {base.display} ({detail}); pass the --base_model "
                         f"it was trained on ({_spec_name(adapter.base_spec)})") from None


def _adapter_name(index: int) -> str:
    return f"adapter_{index}"  # peft names must be valid module names; folders are not


def _active(model: Any, adapter_index: int | None) -> contextlib.AbstractContextManager:
    """A context in which `model` is the plain base (None) or the base with one adapter."""
    if not hasattr(model, "peft_config"):  # no adapter was given: a plain transformers model
        return contextlib.nullcontext()
    if adapter_index is None:
        return model.disable_adapter()
    model.set_adapter(_adapter_name(adapter_index))
    return contextlib.nullcontext()


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def score_model(model: Any, prepared: Prepared, cfg: EvalConfig, name: str, stop_ids: list[int]) -> ModelScore:
    tokenizer = prepared.tokenizer
    nll, count = assistant_nll(model, prepared.loss, tokenizer.pad_token_id, cfg.batch_size)
    loss = nll / count
    answers, new_tokens, seconds = generate(model, tokenizer, prepared.prompts, cfg, stop_ids, label=name)
    row_scores = [{"exact_match": exact_match(a, r), "contains": contains_match(a, r), "rouge_l": rouge_l(a, r)}
                  for a, r in zip(answers, prepared.references)]
    n = len(row_scores)
    score = ModelScore(
        name=name, adapter=None if name == BASE else name, loss=loss, perplexity=perplexity(loss),
        trained_tokens=count, exact_match=sum(s["exact_match"] for s in row_scores) / n,
        contains=sum(s["contains"] for s in row_scores) / n, rouge_l=sum(s["rouge_l"] for s in row_scores) / n,
        generated_tokens=new_tokens, generation_seconds=seconds,
        tokens_per_second=new_tokens / seconds if seconds else 0.0, answers=answers, row_scores=row_scores)
    log.info("%s: loss %.4f, exact match %.1f%%, contains %.1f%%, ROUGE-L %.3f, %.1f tokens/s", name, loss,
             100 * score.exact_match, 100 * score.contains, score.rouge_l, score.tokens_per_second)
    return score


def _batches(lengths: list[int], batch_size: int) -> Iterator[list[int]]:
    """Row indices in batches of similar length (less padding), longest first (out of memory shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


def _pad(rows: list[list[int]], value: int, left: bool = False):
    import torch

    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        cols = slice(width - len(r), width) if left else slice(0, len(r))
        out[i, cols] = torch.tensor(r, dtype=torch.long)
        mask[i, cols] = 1
    return out, mask


def assistant_nll(model: Any, columns: dict[str, list], pad_id: int, batch_size: int) -> tuple[float, int]:
    """Summed negative log-likelihood of every labelled token, and how many there are: the loss lora-train
    minimises, over the same labels, token-weighted across the whole set rather than averaged per batch."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    total, count = 0.0, 0
    for batch in _batches([len(ids) for ids in columns["input_ids"]], batch_size):
        ids, mask = _pad([columns["input_ids"][i] for i in batch], pad_id)
        labels, _ = _pad([columns["labels"][i] for i in batch], chat.IGNORE_INDEX)
        with torch.inference_mode():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        targets = labels[:, 1:].to(logits.device)  # the logits at position t predict token t + 1
        total += F.cross_entropy(logits[:, :-1].float().flatten(0, 1), targets.flatten(),
                                 ignore_index=chat.IGNORE_INDEX, reduction="sum").item()
        count += int((targets != chat.IGNORE_INDEX).sum())
    return total, count


def generate(model: Any, tokenizer: Any, prompts: list[list[int]], cfg: EvalConfig, stop_ids: list[int],
             label: str = "") -> tuple[list[str], int, float]:
    """Each prompt's answer (left-padded batches, stopping at end-of-turn), the tokens generated and the seconds."""
    import torch
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    sampling = ({"do_sample": True, "temperature": cfg.temperature, "top_p": cfg.top_p} if cfg.temperature > 0
                else {"do_sample": False})
    config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, eos_token_id=stop_ids,
                              pad_token_id=tokenizer.pad_token_id, **sampling)
    device = next(model.parameters()).device
    answers, new_tokens, seconds = [""] * len(prompts), 0, 0.0
    torch.manual_seed(cfg.seed)  # the same samples for every model when sampling
    # The slow part on CPU: a bar on terminals only (disable=None), gone when done.
    bar = tqdm(total=len(prompts), desc=f"{label}: answering", unit="row", leave=False, disable=None)
    for batch in _batches([len(p) for p in prompts], cfg.batch_size):
        ids, mask = _pad([prompts[i] for i in batch], tokenizer.pad_token_id, left=True)
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config)
        seconds += time.perf_counter() - start
        for i, tokens in zip(batch, out[:, ids.shape[1]:].tolist()):
            tokens = _until_stop(tokens, stop_ids)
            new_tokens += len(tokens)
            answers[i] = tokenizer.decode(tokens, skip_special_tokens=True).strip()
        bar.update(len(batch))
    bar.close()
    return answers, new_tokens, seconds


def _until_stop(tokens: list[int], stop_ids: list[int]) -> list[int]:
    """The generated tokens up to and including the first stop token (what follows is padding)."""
    for i, token in enumerate(tokens):
        if token in stop_ids:
            return tokens[:i + 1]
    return tokens


# --- report ----------------------------------------------------------------------------------------------------------

def build_report(cfg: EvalConfig, prepared: Prepared, scores: list[ModelScore], precision: str,
                 stop_ids: list[int], seconds: float) -> dict[str, Any]:
    base = scores[0]
    entries = []
    for score in scores:
        entry = score.metrics()
        if score is not base:
            entry["vs_base"] = {k: _difference(entry[k], getattr(base, k)) for k in METRICS}
        entries.append(entry)
    output = Path(cfg.output)
    return {
        "eval_path": cfg.eval_path,
        "rows": len(prepared.rows),
        "rows_read": prepared.rows_read,
        "limit": cfg.limit or None,
        "base_model": prepared.base.display,
        "base_model_path": prepared.base.path,
        "quantization": prepared.quantization,
        "precision": precision,
        "generation": {"max_new_tokens": cfg.max_new_tokens, "temperature": cfg.temperature, "top_p": cfg.top_p,
                       "batch_size": cfg.batch_size, "seed": cfg.seed,
                       "stop_tokens": prepared.tokenizer.convert_ids_to_tokens(stop_ids)},
        "data": prepared.stats.as_dict(),
        "models": entries,
        "generations": str(output.parent / GENERATIONS),
        "seconds": seconds,
    }


def _difference(value: float | None, base: float | None) -> float | None:
    return None if value is None or base is None else value - base


def write_outputs(output: Path, report: dict[str, Any], prepared: Prepared, scores: list[ModelScore]) -> None:
    fsutil.atomic_write(output, json.dumps(report, indent=2) + "\n")
    with fsutil.staged_file(Path(report["generations"])) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for i, (row, reference) in enumerate(zip(prepared.rows, prepared.references)):
            prompt, _ = split_final_turn(row.messages)
            line = {"where": row.where, "prompt": chat.render(prepared.tokenizer, prompt, True, row.tools),
                    "reference": reference,
                    "answers": {s.name: {"answer": s.answers[i], **s.row_scores[i]} for s in scores}}
            f.write(json.dumps(line, ensure_ascii=False) + "\n")
    log.info("report: %s; answers per row: %s", output, report["generations"])


def print_table(report: dict[str, Any]) -> None:
    """Models side by side; under each adapter, its difference to the base (green: better, red: worse)."""
    from rich.console import Console
    from rich import box
    from rich.table import Table

    console = Console()
    if not console.is_terminal:  # a file or a pipe: as wide as the table, not cut at 80 columns
        console = Console(width=400)
    quant = {"4bit": ", 4-bit NF4", "8bit": ", 8-bit"}.get(report["quantization"] or "", "")
    table = Table(title=f"{report['eval_path']}: {report['rows']} rows",
                  caption=f"base: {report['base_model']} ({report['precision']}{quant})", title_justify="left",
                  caption_justify="left", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
                  collapse_padding=True)  # fits 80 columns
    table.add_column("model", overflow="fold", min_width=12)  # a path is its name: wrap it, never cut it
    headers = {"loss": "loss", "perplexity": "perplexity", "exact_match": "exact match", "contains": "contains",
               "rouge_l": "ROUGE-L", "tokens_per_second": "tokens/s"}
    for key in METRICS:
        table.add_column(headers[key], justify="right", no_wrap=True)
    for entry in report["models"]:
        table.add_row(entry["name"], *(_format(key, entry[key]) for key in METRICS))
        if "vs_base" in entry:
            table.add_row("  vs base", *(_format_difference(key, entry["vs_base"][key]) for key in METRICS))
    console.print(table)


DIGITS = {"loss": 4, "perplexity": 2, "rouge_l": 3, "tokens_per_second": 1}


def _format(key: str, value: float | None, difference: bool = False) -> str:
    if value is None:
        return "inf" if key == "perplexity" and not difference else "n/a"
    sign = "+" if difference else ""
    if key in ("exact_match", "contains"):
        return f"{100 * value:{sign}.1f}" + (" pts" if difference else "%")
    return f"{value:{sign}.{DIGITS[key]}f}"


def _format_difference(key: str, value: float | None) -> str:
    text = _format(key, value, difference=True)
    if value is None or value == 0 or key == "tokens_per_second":  # speed is not a quality
        return f"[dim]{text}[/dim]"
    better = (value > 0) == METRICS[key]
    return f"[green]{text}[/green]" if better else f"[red]{text}[/red]"
