"""The one typed config of lora-train: flags, YAML keys, --help text and the saved run config all come from here.

Order of precedence: field defaults < `--config file.yaml` < command-line flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .chat import TEMPLATE_KWARGS_HELP, template_kwargs_problem
from .errors import UsageError

METHODS = ("sft", "dpo", "orpo", "kto")
# TRL 1.x's loss variants per trainer (DPOConfig.loss_type, KTOConfig.loss_type); the first is the default.
LOSS_TYPES = {"dpo": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
              "kto": ("kto", "apo_zero_unpaired")}

# Keys that steer the command itself: flags only, never YAML keys or part of the saved run config.
CLI_ONLY = ("config", "debug", "dry_run", "resume", "resume_from_checkpoint", "resume_force")


def opt(default: Any, help: str, *, group: str, choices: tuple[str, ...] | None = None, metavar: str | None = None,
        positional: bool = False, repeatable: bool = False):
    """A config field: its default, its --help text, its help group, the allowed values (for strings), whether
    it is given by position (lora-merge ADAPTER_DIR OUT_DIR) rather than as --name, and whether a string flag may be
    given several times (the values are joined with commas, as a comma-separated list would be).

    A bool field whose default is None is three-state: --name, --no-name, or not given (None: decided later)."""
    return field(default=default, metadata={"help": help, "group": group, "choices": choices, "metavar": metavar,
                                            "positional": positional, "repeatable": repeatable})


@dataclass
class TrainConfig:
    PROG = "lora-train"
    DESCRIPTION = ("Fine-tune a causal language model with LoRA or QLoRA on a chat dataset. Loss is computed on "
                   "assistant turns only (end-of-turn token included) unless --train_on_inputs.")
    EPILOG = "Every flag is also a YAML key for --config. Example: lora-train --config configs/demo.yaml"
    GROUPS = {"run": "run", "model": "base model", "data": "data and chat template", "lora": "LoRA",
              "training": "training", "preference": "preference tuning (--method dpo, orpo, kto)",
              "logging": "logging and checkpoints"}

    # --- run ---------------------------------------------------------------------------------------------------------
    config: str = opt("", "YAML file whose keys are these flag names; flags given on the command line win.",
                      group="run", metavar="FILE")
    output_dir: str = opt("", "Where the adapter, tokenizer, run config, metrics and checkpoints are written "
                              "(required).", group="run", metavar="DIR")
    overwrite: bool = opt(False, "Allow writing into a non-empty --output_dir (its old checkpoints are removed).",
                          group="run")
    debug: bool = opt(False, "Show full tracebacks and library warnings.", group="run")
    dry_run: bool = opt(False, "Check the data and the settings, print the data statistics, trainable parameters and "
                               "a GPU memory estimate, then stop (no weights are loaded, nothing is written).",
                        group="run")
    resume: bool = opt(False, "Continue the run in --output_dir from its newest complete checkpoint (weights, "
                              "optimizer, scheduler, RNG and data position).", group="run")
    resume_from_checkpoint: str = opt("", "Continue from this checkpoint folder instead of the newest one.",
                                      group="run", metavar="DIR")
    resume_force: bool = opt(False, "Resume even though the run config or the data changed since the checkpoint.",
                             group="run")

    # --- model -------------------------------------------------------------------------------------------------------
    base_model: str = opt("", "Base model: a Hub id, a local Hugging Face folder or a .gguf file. Empty: the "
                              "embedded demo model (SmolLM2-135M-Instruct, works offline).", group="model",
                          metavar="MODEL")
    trust_remote_code: bool = opt(False, "Run model code shipped with the model repository (off: only code in "
                                         "transformers is used).", group="model")
    load_in_4bit: bool = opt(False, "QLoRA: load the base model in 4-bit NF4 with double quantisation "
                                    "(bitsandbytes).", group="model")
    load_in_8bit: bool = opt(False, "Load the base model in 8-bit (bitsandbytes LLM.int8).", group="model")
    precision: str = opt("auto", "Compute precision (bf16/fp16 are mixed: the adapter weights stay fp32). auto: bf16 "
                                 "on GPUs that support it, else fp16 on GPU, fp32 on CPU.", group="model",
                         choices=("auto", "bf16", "fp16", "fp32"))
    attn_implementation: str = opt("auto", "Attention kernel passed to transformers. auto: flash_attention_2 on "
                                           "CUDA when the flash-attn package is installed, else sdpa (run once per "
                                           "conversation in padding-free batches).", group="model",
                                   choices=("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3"))

    # --- data --------------------------------------------------------------------------------------------------------
    train_path: str = opt("", "Training data (required): .jsonl/.json/.parquet/.csv with OpenAI messages, "
                              "ShareGPT conversations, Alpaca or prompt/completion rows.", group="data",
                          metavar="FILE")
    eval_path: str = opt("", "Held-out evaluation data, same formats as --train_path.", group="data",
                         metavar="FILE")
    val_split: float = opt(0.0, "Hold out this fraction of --train_path for evaluation (instead of --eval_path).",
                           group="data")
    max_seq_length: int = opt(2048, "Longest tokenised conversation trained on.", group="data")
    truncation: str = opt("drop", "What happens to conversations longer than --max_seq_length: drop them, or "
                                  "truncate them (their end is lost). Either way the count is reported.",
                          group="data", choices=("drop", "truncate"))
    chat_template: str = opt("", "Override the model's chat template: 'chatml' or a path to a .jinja file. Empty: "
                                 "the model's own (ChatML with a warning when it has none).", group="data",
                             metavar="NAME|PATH")
    chat_template_kwargs: str = opt("", TEMPLATE_KWARGS_HELP, group="data", metavar="JSON")
    train_on_inputs: bool = opt(False, "Train on every token (system and user text too) instead of only the "
                                       "assistant turns and their end-of-turn token.", group="data")
    data_cache: bool = opt(True, "Keep the tokenised rows in ~/.cache/lora_cli/datasets (or "
                                 "$LORA_CLI_DATA_CACHE) and reuse them while the rows, tokenizer, chat template and "
                                 "these data settings are unchanged; --no-data_cache always tokenises afresh.",
                           group="data")

    # --- LoRA --------------------------------------------------------------------------------------------------------
    lora_r: int = opt(16, "LoRA rank.", group="lora")
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with --use_rslora).",
                          group="lora")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.", group="lora")
    target_modules: str = opt("all-linear", "Modules that get adapters: 'all-linear' or a comma-separated list "
                                            "such as q_proj,v_proj.", group="lora", metavar="MODULES")
    use_rslora: bool = opt(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).", group="lora")
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA).", group="lora")
    init_lora_weights: str = opt("default", "Initialisation of the adapter weights.", group="lora",
                                 choices=("default", "gaussian", "pissa", "olora"))
    modules_to_save: str = opt("", "Comma-separated modules trained in full and saved with the adapter (e.g. "
                                   "embed_tokens,lm_head).", group="lora", metavar="MODULES")

    # --- training ----------------------------------------------------------------------------------------------------
    learning_rate: float = opt(1e-4, "Peak learning rate.", group="training")
    num_train_epochs: float = opt(3.0, "Passes over the training data (ignored when --max_steps > 0).",
                                  group="training")
    max_steps: int = opt(-1, "Stop after this many optimizer steps (-1: use --num_train_epochs).",
                         group="training")
    batch_size: int = opt(1, "Conversations per device per micro-batch.", group="training")
    gradient_accumulation_steps: int = opt(4, "Micro-batches per optimizer step.", group="training")
    optim: str = opt("paged_adamw_32bit", "Optimizer (any name transformers accepts, e.g. adamw_torch).",
                     group="training")
    lr_scheduler_type: str = opt("cosine", "Learning-rate schedule (e.g. cosine, linear, constant).",
                                 group="training")
    warmup_ratio: float = opt(0.03, "Fraction of the steps spent warming the learning rate up.", group="training")
    weight_decay: float = opt(0.0, "AdamW weight decay.", group="training")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).", group="training")
    gradient_checkpointing: bool = opt(None, "Recompute activations in the backward pass to save memory. Not given "
                                             "(auto): on when the GPU memory estimate without it exceeds 80%% of the "
                                             "free GPU memory; off on CPU, where it only costs time.",
                                       group="training")
    tokens_per_batch: int = opt(8192, "Token budget of a micro-batch: the --batch_size x "
                                      "--gradient_accumulation_steps conversations of each optimizer step are "
                                      "regrouped, padding-free, into as few micro-batches as fit this many tokens "
                                      "(same optimizer steps, less overhead). 0: micro-batches of exactly "
                                      "--batch_size, padded.", group="training")
    packing: bool = opt(False, "Pack conversations into sequences of --max_seq_length tokens, padding-free, with no "
                               "attention across conversations (fewer, fuller optimizer steps).", group="training")
    seed: int = opt(42, "Random seed for data order, splits and adapter initialisation.", group="training")

    # --- preference tuning -------------------------------------------------------------------------------------------
    method: str = opt("sft", "What to train on: sft (chat rows), dpo or orpo (rows with prompt, chosen, rejected) or "
                             "kto (rows with prompt, completion, label), with TRL's trainer of that name.",
                      group="preference", choices=METHODS)
    adapter: str = opt("", "Start from this LoRA adapter folder (e.g. an SFT run of lora-train) and continue "
                           "training it instead of attaching a new one; with dpo and kto the starting adapter, "
                           "frozen, is the reference model.", group="preference", metavar="DIR")
    beta: float = opt(0.1, "dpo/kto: how far the model may move from the reference (higher: less); orpo: weight of "
                           "the odds-ratio term.", group="preference")
    loss_type: str = opt("", "TRL's loss variant. dpo: sigmoid, ipo, hinge, robust, ...; kto: kto or "
                             "apo_zero_unpaired. Empty: sigmoid for dpo, kto for kto.", group="preference",
                         metavar="NAME")
    max_prompt_length: int = opt(0, "Longest prompt of a preference row in tokens (0: only --max_seq_length "
                                     "limits); longer prompts follow --truncation (truncate keeps their end).",
                                 group="preference")

    # --- logging and checkpoints -------------------------------------------------------------------------------------
    logging_steps: int = opt(10, "Log the training loss every N optimizer steps.", group="logging")
    eval_steps: int = opt(0, "Evaluate every N optimizer steps (0: every --save_steps). The eval loss is also "
                             "measured before and after training.", group="logging")
    save_steps: int = opt(100, "Write a checkpoint every N optimizer steps.", group="logging")
    save_total_limit: int = opt(2, "Keep at most this many checkpoints (0: keep all).", group="logging")
    report_to: str = opt("none", "Experiment tracker.", group="logging", choices=("none", "tensorboard", "wandb"))

    def problems(self) -> list[str]:
        return _train_problems(self)


def fields(cls: type = None) -> list[dataclasses.Field]:
    return list(dataclasses.fields(cls or TrainConfig))


def _types(cls: type) -> dict[str, type]:
    names = {f.name for f in dataclasses.fields(cls)}
    return {k: _unwrap_optional(v) for k, v in typing.get_type_hints(cls).items() if k in names}


def _unwrap_optional(kind: Any) -> Any:
    """`bool | None` -> bool: None only marks a value the user did not give."""
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    return args[0] if len(args) == 1 and type(None) in typing.get_args(kind) else kind


def build_parser(cls: type = None) -> argparse.ArgumentParser:
    cls = cls or TrainConfig
    parser = argparse.ArgumentParser(
        prog=cls.PROG, description=cls.DESCRIPTION, epilog=getattr(cls, "EPILOG", None),
        argument_default=argparse.SUPPRESS,  # only flags the user typed appear in the namespace
        allow_abbrev=False,
    )
    groups = {key: parser.add_argument_group(title) for key, title in cls.GROUPS.items()}
    types = _types(cls)
    for f in fields(cls):
        meta, kind = f.metadata, types[f.name]
        group = groups[meta["group"]]
        if meta.get("positional"):  # optional for argparse: a missing one is reported with every other problem
            group.add_argument(f.name, nargs="?", metavar=meta["metavar"] or f.name.upper(), help=meta["help"])
            continue
        help_text = meta["help"] + (f" (default: {f.default!r})" if not isinstance(f.default, bool) else "")
        if kind is bool:
            default = "" if f.default is None else f" (default: {'on' if f.default else 'off'})"
            group.add_argument(f"--{f.name}", action=argparse.BooleanOptionalAction, help=meta["help"] + default)
        else:
            metavar = meta["metavar"] or ("{" + ",".join(meta["choices"]) + "}" if meta["choices"] else
                                          kind.__name__.upper())
            # Values stay strings here: _coerce checks types and validate() checks choices, so that every
            # problem is reported at once instead of argparse stopping at the first.
            group.add_argument(f"--{f.name}", type=str, metavar=metavar, help=help_text,
                               action="append" if meta.get("repeatable") else "store")
    return parser


def _suggest(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _coerce(name: str, value: Any, kind: type, where: str, nullable: bool = False) -> tuple[Any, str | None]:
    """Convert a YAML or flag value to the field's type; return (value, error). A nullable (three-state) bool also
    takes null or 'auto'."""
    if kind is bool:
        if nullable and (value is None or (isinstance(value, str) and value.lower() == "auto")):
            return None, None
        if isinstance(value, bool):
            return value, None
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
            return value.lower() in ("true", "yes", "on", "1"), None
        return None, f"{where}: expected true or false, got {value!r}"
    if kind is int:
        if isinstance(value, bool):
            return None, f"{where}: expected an integer, got {value!r}"
        try:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value if not isinstance(value, str) else value.strip()), None
        except (TypeError, ValueError):
            return None, f"{where}: expected an integer, got {value!r}"
    if kind is float:
        if isinstance(value, bool):
            return None, f"{where}: expected a number, got {value!r}"
        try:
            return float(value), None
        except (TypeError, ValueError):
            return None, f"{where}: expected a number, got {value!r}"
    if isinstance(value, dict) and name == "chat_template_kwargs":  # a YAML mapping; flags give it as JSON text
        return json.dumps(value), None
    if isinstance(value, (list, tuple)) and name in ("target_modules", "modules_to_save"):
        return ",".join(str(v) for v in value), None
    if not isinstance(value, (str, int, float)) or isinstance(value, bool):
        return None, f"{where}: expected a string, got {value!r}"
    return str(value), None


def _read_yaml(path: str, errors: list[str]) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        errors.append(f"--config: file not found: {path}")
        return {}
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        errors.append(f"--config {path}: not valid YAML: {' '.join(str(exc).split())}")
        return {}
    if data is None:
        return {}
    if not isinstance(data, dict):
        errors.append(f"--config {path}: expected a mapping of flag names to values, got {type(data).__name__}")
        return {}
    return data


def parse_args(argv: list[str] | None = None, cls: type = None) -> Any:
    """Parse flags (and the YAML they name), validate everything, and raise one UsageError listing every problem."""
    cls = cls or TrainConfig
    parser = build_parser(cls)
    ns, unknown = parser.parse_known_args(argv)
    given = vars(ns)
    errors: list[str] = []
    known_flags = [f"--{f.name}" for f in fields(cls) if not f.metadata.get("positional")]
    after_flag = False
    for token in unknown:
        if token.startswith("-"):
            flag = token.split("=", 1)[0]
            errors.append(f"unknown flag {flag}{_suggest(flag, known_flags)}")
            after_flag = "=" not in token
        elif not after_flag:  # a value right after an unknown flag belongs to it
            errors.append(f"unexpected argument {token!r} (every option is a --flag)")
        else:
            after_flag = False

    types = _types(cls)
    nullable = {f.name: f.default is None for f in fields(cls)}
    values: dict[str, Any] = {}
    config_path = given.get("config", "")
    if config_path:
        for key, value in _read_yaml(config_path, errors).items():
            if key not in types or key in CLI_ONLY:
                errors.append(f"--config {config_path}: unknown key '{key}'{_suggest(str(key), list(types))}")
                continue
            coerced, err = _coerce(key, value, types[key], f"--config {config_path}: {key}", nullable[key])
            if err:
                errors.append(err)
            else:
                values[key] = coerced
    for key, value in given.items():
        if isinstance(value, list):  # a repeatable flag given several times
            value = ",".join(value)
        coerced, err = _coerce(key, value, types[key], f"--{key}", nullable[key])
        if err:
            errors.append(err)
        else:
            values[key] = coerced

    cfg = cls(**values)
    errors.extend(validate(cfg))
    if errors:
        raise UsageError("\n".join(errors) if len(errors) == 1 else
                         f"{len(errors)} problems with the arguments:\n  " + "\n  ".join(errors))
    return cfg


def validate(cfg: Any) -> list[str]:
    """Every problem with a config, each naming the flag as the user types it."""
    errors: list[str] = []
    for f in fields(type(cfg)):
        choices = f.metadata["choices"]
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            errors.append(f"--{f.name}: {value!r} is not one of {', '.join(choices)}")
    return errors + cfg.problems()


def data_file_problem(flag: str, path: str, required: bool) -> str | None:
    """What is wrong with a data-file flag (lora-train, lora-eval, lora-data): missing when required, or no file."""
    if not path:
        return f"--{flag} is required (a .jsonl/.json/.parquet/.csv chat dataset)" if required else None
    return None if os.path.isfile(path) else f"--{flag}: file not found: {path}"


def _train_problems(cfg: TrainConfig) -> list[str]:
    errors: list[str] = []

    if not cfg.output_dir:
        errors.append("--output_dir is required (where the adapter is written)")
    if (cfg.resume or cfg.resume_from_checkpoint) and cfg.overwrite:
        errors.append("--resume and --overwrite both set: resuming keeps the output dir, overwriting clears it")
    if cfg.resume_from_checkpoint and not os.path.isdir(cfg.resume_from_checkpoint):
        errors.append(f"--resume_from_checkpoint: folder not found: {cfg.resume_from_checkpoint}")
    errors += filter(None, (data_file_problem("train_path", cfg.train_path, required=True),
                            data_file_problem("eval_path", cfg.eval_path, required=False)))
    if cfg.eval_path and cfg.val_split > 0:
        errors.append("--eval_path and --val_split both set: choose one source of evaluation data")
    if not 0 <= cfg.val_split < 1:
        errors.append(f"--val_split: must be in [0, 1), got {cfg.val_split}")
    if cfg.load_in_4bit and cfg.load_in_8bit:
        errors.append("--load_in_4bit and --load_in_8bit both set: choose one")
    if (cfg.load_in_4bit or cfg.load_in_8bit) and cfg.init_lora_weights in ("pissa", "olora"):
        errors.append(f"--init_lora_weights {cfg.init_lora_weights} needs full-precision base weights: drop it or "
                      "drop --load_in_4bit/--load_in_8bit")
    positive = ("max_seq_length", "lora_r", "lora_alpha", "batch_size", "gradient_accumulation_steps",
                "logging_steps", "save_steps")
    for name in positive:
        if getattr(cfg, name) <= 0:
            errors.append(f"--{name}: must be > 0, got {getattr(cfg, name)}")
    for name in ("eval_steps", "save_total_limit", "weight_decay", "max_grad_norm", "tokens_per_batch"):
        if getattr(cfg, name) < 0:
            errors.append(f"--{name}: must be >= 0, got {getattr(cfg, name)}")
    if cfg.learning_rate <= 0:
        errors.append(f"--learning_rate: must be > 0, got {cfg.learning_rate}")
    if not 0 <= cfg.lora_dropout < 1:
        errors.append(f"--lora_dropout: must be in [0, 1), got {cfg.lora_dropout}")
    if not 0 <= cfg.warmup_ratio < 1:
        errors.append(f"--warmup_ratio: must be in [0, 1), got {cfg.warmup_ratio}")
    if cfg.max_steps <= 0 and cfg.max_steps != -1:
        errors.append(f"--max_steps: must be > 0, or -1 to train for --num_train_epochs, got {cfg.max_steps}")
    if cfg.max_steps == -1 and cfg.num_train_epochs <= 0:
        errors.append(f"--num_train_epochs: must be > 0, got {cfg.num_train_epochs}")
    if not split_list(cfg.target_modules):
        errors.append("--target_modules: empty; use all-linear or a list such as q_proj,v_proj")
    if cfg.chat_template and cfg.chat_template != "chatml" and not os.path.isfile(cfg.chat_template):
        errors.append(f"--chat_template: {cfg.chat_template!r} is neither 'chatml' nor an existing .jinja file")
    errors += [p for p in [template_kwargs_problem(cfg.chat_template_kwargs)] if p]
    return errors + _preference_problems(cfg)


def _preference_problems(cfg: TrainConfig) -> list[str]:
    errors: list[str] = []
    if cfg.adapter and not os.path.isfile(os.path.join(cfg.adapter, "adapter_config.json")):
        errors.append(f"--adapter {cfg.adapter}: not a LoRA adapter folder (no adapter_config.json)")
    kind = _preference_kind(cfg.train_path)
    if cfg.method == "sft":
        if kind:
            errors.append(f"--train_path {cfg.train_path} holds preference rows ("
                          f"{'prompt, chosen, rejected' if kind == 'paired' else 'prompt, completion, label'}): add "
                          f"--method {'dpo or --method orpo' if kind == 'paired' else 'kto'}")
        return errors
    allowed = LOSS_TYPES.get(cfg.method, ())
    if cfg.loss_type and cfg.loss_type not in allowed:
        errors.append(f"--loss_type {cfg.loss_type!r} is not a {cfg.method} loss" +
                      (f"; choose one of {', '.join(allowed)}" if allowed else f" ({cfg.method} has one loss)"))
    if cfg.beta <= 0:
        errors.append(f"--beta: must be > 0, got {cfg.beta}")
    if cfg.max_prompt_length < 0 or cfg.max_prompt_length >= cfg.max_seq_length:
        errors.append(f"--max_prompt_length: must be >= 0 and below --max_seq_length {cfg.max_seq_length}, "
                      f"got {cfg.max_prompt_length}")
    for flag in ("packing", "train_on_inputs"):
        if getattr(cfg, flag):
            errors.append(f"--{flag} is for --method sft; {cfg.method} scores whole answers")
    if cfg.method == "kto" and cfg.batch_size < 2:
        errors.append("--method kto needs --batch_size >= 2 (its KL term pairs each prompt with another row's answer)")
    return errors


def _preference_kind(path: str) -> str | None:
    """The kind of preference rows a data file holds (None: chat rows, or unreadable: reported when it is read)."""
    if not path or not os.path.isfile(path):
        return None
    from .errors import DataError
    from .preference import rows

    try:
        return rows.file_kind(path)
    except DataError:
        return None


def split_list(value: str) -> list[str]:
    return [part.strip() for part in value.split(",") if part.strip()]


def to_dict(cfg: Any) -> dict[str, Any]:
    """The run config as saved next to the adapter; it is itself a valid --config file."""
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in CLI_ONLY}


def save(cfg: TrainConfig, path: Path) -> None:
    import yaml

    header = "# lora-train run config: reuse with  lora-train --config THIS_FILE\n"
    path.write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False), encoding="utf-8")
