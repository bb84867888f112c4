"""lora-train's config: the shared option groups plus the LoRA, training, preference and checkpoint options.

Order of precedence: field defaults < `--config file.yaml` < command-line flags."""

from __future__ import annotations

from dataclasses import dataclass

from .fields import opt, refine
from .trainer_args import HELP as TRAINER_ARGS_HELP
from .options import (DEMO_BASE, OWN_TEMPLATE, BaseModelOptions, ComputeOptions, EvalDataOptions, RunOptions,
                      TemplateOptions, TrainDataOptions)

METHODS = ("sft", "dpo", "orpo", "kto")
# TRL 1.x's loss variants per trainer (DPOConfig.loss_type, KTOConfig.loss_type); the first is the default.
LOSS_TYPES = {"dpo": ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                      "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
              "kto": ("kto", "apo_zero_unpaired")}


# Bases are listed last-group-first: a dataclass takes the fields of its bases in reverse order.
@dataclass
class TrainConfig(TemplateOptions, EvalDataOptions, TrainDataOptions, ComputeOptions, BaseModelOptions, RunOptions):
    PROG = "lora-train"
    DESCRIPTION = ("Fine-tune a causal language model with LoRA or QLoRA on a chat dataset. Loss is computed on "
                   "assistant turns only (end-of-turn token included) unless --train_on_inputs.")
    EPILOG = "Every flag is also a YAML key for --config. Example: lora-train --config configs/demo.yaml"
    GROUPS = {"run": "run", "model": "base model", "data": "data and chat template", "lora": "LoRA",
              "training": "training", "preference": "preference tuning (--method dpo, orpo, kto)",
              "logging": "logging and checkpoints"}

    # --- run ---------------------------------------------------------------------------------------------------------
    config: str = opt("", "YAML file whose keys are these flag names; flags given on the command line win.",
                      group="run", metavar="FILE", cli_only=True)
    output_dir: str = opt("", "Where the adapter, tokenizer, run config, metrics and checkpoints are written "
                              "(required).", group="run", metavar="DIR", resumable=True)
    overwrite: bool = opt(False, "Allow writing into a non-empty --output_dir (its old checkpoints are removed).",
                          group="run", resumable=True)
    dry_run: bool = opt(False, "Check the data and the settings, print the data statistics, trainable parameters and "
                               "a GPU memory estimate, then stop (no weights are loaded, nothing is written).",
                        group="run", cli_only=True)
    resume: bool = opt(False, "Continue the run in --output_dir from its newest complete checkpoint (weights, "
                              "optimizer, scheduler, RNG and data position).", group="run", cli_only=True)
    resume_from_checkpoint: str = opt("", "Continue from this checkpoint folder instead of the newest one.",
                                      group="run", metavar="DIR", cli_only=True)
    resume_force: bool = opt(False, "Resume even though the run config or the data changed since the checkpoint.",
                             group="run", cli_only=True)

    # --- model -------------------------------------------------------------------------------------------------------
    base_model: str = refine(BaseModelOptions, "base_model", note=DEMO_BASE)
    precision: str = refine(ComputeOptions, "precision", note="bf16/fp16 are mixed: the adapter weights stay fp32.")

    # --- data --------------------------------------------------------------------------------------------------------
    eval_path: str = refine(EvalDataOptions, "eval_path", note="Optional.")
    val_split: float = opt(0.0, "Hold out this fraction of --train_path for evaluation (instead of --eval_path).",
                           group="data")
    chat_template: str = refine(TemplateOptions, "chat_template", note=OWN_TEMPLATE)
    data_cache: bool = opt(True, "Keep the tokenised rows in ~/.cache/lora_cli/datasets (or "
                                 "$LORA_CLI_DATA_CACHE) and reuse them while the rows, tokenizer, chat template and "
                                 "these data settings are unchanged; --no-data_cache always tokenises afresh.",
                           group="data", resumable=True)
    num_proc: int = opt(0, "Processes that tokenise the data (0: the cores available). Output is the same for any "
                           "number.", group="data", resumable=True)
    streaming: bool = opt(False, "Train from the data as it is read (an iterable dataset), for data larger than memory "
                                 "or the data cache: needs --max_steps; rows are tokenised as training takes them, a "
                                 "bad row stops the run when it is reached, and the counts in train_metrics.json "
                                 "cover the rows read.", group="data")

    # --- LoRA --------------------------------------------------------------------------------------------------------
    lora_r: int = opt(16, "LoRA rank.", group="lora")
    lora_alpha: int = opt(32, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with --use_rslora).",
                          group="lora")
    lora_dropout: float = opt(0.05, "Dropout on the LoRA input.", group="lora")
    target_modules: str = opt("all-linear", "Modules that get adapters: 'all-linear' or a comma-separated list "
                                            "such as q_proj,v_proj.", group="lora", metavar="MODULES",
                              aliases=("lora_target_modules",))
    use_rslora: bool = opt(False, "Rank-stabilised LoRA scaling (alpha / sqrt(r)).", group="lora")
    use_dora: bool = opt(False, "Weight-decomposed LoRA (DoRA).", group="lora")
    init_lora_weights: str = opt("default", "Initialisation of the adapter weights.", group="lora",
                                 choices=("default", "gaussian", "pissa", "olora"))
    modules_to_save: str = opt("", "Comma-separated modules trained in full and saved with the adapter (e.g. "
                                   "embed_tokens,lm_head).", group="lora", metavar="MODULES",
                               aliases=("lora_modules_to_save",))

    # --- training ----------------------------------------------------------------------------------------------------
    learning_rate: float = opt(1e-4, "Peak learning rate.", group="training")
    num_train_epochs: float = opt(3.0, "Passes over the training data (ignored when --max_steps > 0).",
                                  group="training")
    max_steps: int = opt(-1, "Stop after this many optimizer steps (-1: use --num_train_epochs).",
                         group="training")
    batch_size: int = opt(1, "Conversations per device per micro-batch.", group="training",
                          aliases=("per_device_train_batch_size",))
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
    trainer_args: str = opt("", TRAINER_ARGS_HELP, group="training", metavar="K=V,...|JSON")

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
    logging_steps: int = opt(10, "Log the training loss every N optimizer steps.", group="logging", resumable=True)
    eval_steps: int = opt(0, "Evaluate every N optimizer steps (0: every --save_steps). The eval loss is also "
                             "measured before and after training.", group="logging", resumable=True)
    save_steps: int = opt(100, "Write a checkpoint every N optimizer steps.", group="logging", resumable=True)
    save_total_limit: int = opt(2, "Keep at most this many checkpoints (0: keep all).", group="logging",
                                resumable=True)
    report_to: str = opt("none", "Experiment tracker.", group="logging", choices=("none", "tensorboard", "wandb"),
                         resumable=True)

    def problems(self) -> list[str]:
        from .validation import train_problems

        return train_problems(self)
