"""Option groups shared by several commands, each declared once; a command's config composes the groups it takes
(dataclass inheritance) and may refine a shared option's default or help with fields.refine.

    RunOptions        --debug                                        all five commands
    BaseModelOptions  --base_model --trust_remote_code               lora-train, lora-eval, lora-data, lora-merge
    ComputeOptions    --quantization --precision --attn_implementation   lora-train, lora-eval
    TrainDataOptions  --train_path --train_on_inputs                 lora-train, lora-data
    EvalDataOptions   --eval_path                                    lora-train, lora-eval
    TemplateOptions   --max_seq_length --truncation --chat_template --chat_template_kwargs
                                                                     lora-train, lora-eval, lora-data
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chat import TEMPLATE_KWARGS_HELP
from .fields import opt

DATA_FORMATS = (".jsonl/.json/.parquet/.csv with OpenAI messages, ShareGPT conversations, Alpaca or "
                "prompt/completion rows")
PRECISIONS = ("auto", "bf16", "fp16", "fp32")
ATTENTION = ("auto", "sdpa", "eager", "flash_attention_2", "flash_attention_3")


@dataclass
class RunOptions:
    debug: bool = opt(False, "Show full tracebacks and library warnings.", group="run", cli_only=True)


@dataclass
class BaseModelOptions:
    base_model: str = opt("", "Base model: a Hub id, a local Hugging Face folder or a .gguf file.", group="model",
                          metavar="MODEL", aliases=("model_name_or_path",))
    trust_remote_code: bool = opt(False, "Run model code shipped with the model repository (off: only code in "
                                         "transformers is used).", group="model")


QUANTIZATIONS = ("none", "4bit", "8bit")


@dataclass
class ComputeOptions:
    quantization: str = opt("none", "Load the base model quantised with bitsandbytes: 4bit (NF4 with double "
                                    "quantisation: QLoRA) or 8bit (LLM.int8); none: full precision.", group="model",
                            choices=QUANTIZATIONS,
                            switches={"load_in_4bit": ("4bit", "none"), "load_in_8bit": ("8bit", "none")})
    precision: str = opt("auto", "Compute precision. auto: bf16 on GPUs that support it, else fp16 on GPU, fp32 on "
                                 "CPU.", group="model", choices=PRECISIONS)
    attn_implementation: str = opt("auto", "Attention kernel passed to transformers. auto: flash_attention_2 on "
                                           "CUDA when the flash-attn package is installed, else sdpa (run once per "
                                           "conversation in padding-free batches).", group="model",
                                   choices=ATTENTION, resumable=True)


@dataclass
class TrainDataOptions:
    train_path: str = opt("", f"Training data (required): {DATA_FORMATS}.", group="data", metavar="FILE")
    train_on_inputs: bool = opt(False, "Train on every token (system and user text too) instead of only the "
                                       "assistant turns and their end-of-turn token.", group="data",
                                switches={"assistant_only_loss": (False, True)})


@dataclass
class EvalDataOptions:
    eval_path: str = opt("", f"Held-out evaluation data: {DATA_FORMATS}.", group="data", metavar="FILE")


@dataclass
class TemplateOptions:
    max_seq_length: int = opt(2048, "Longest tokenised conversation trained on (and scored, in lora-eval).",
                              group="data", aliases=("max_length",))
    truncation: str = opt("drop", "What happens to conversations longer than --max_seq_length: drop them, or "
                                  "truncate them (their end is lost). Either way the count is reported.",
                          group="data", choices=("drop", "truncate"))
    chat_template: str = opt("", "Override the model's chat template: 'chatml' or a path to a .jinja file.",
                             group="data", metavar="NAME|PATH")
    chat_template_kwargs: str = opt("", TEMPLATE_KWARGS_HELP, group="data", metavar="JSON")


# What an empty --base_model / --chat_template means in the commands that load the model named by the flag.
DEMO_BASE = "Empty: the embedded demo model (SmolLM2-135M-Instruct, works offline)."
OWN_TEMPLATE = "Empty: the model's own (ChatML with a warning when it has none)."
