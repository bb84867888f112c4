"""lora-train --method dpo|orpo|kto: the data, the step plan and TRL's preference trainer, with lora-train's own
checkpoints, token counts and logs.

TRL tokenises preference rows itself, keeping whatever the template renders after the end-of-turn token and cutting
long rows silently; lora-train hands it rows already encoded (lora_cli.preference.encoding) and skips that step.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from .. import chat, data
from ..config import LOSS_TYPES, TrainConfig, trainer_args
from ..train.dataset import Prepared, load_tokenizer
from ..train.plan import StepPlan, decide_gradient_checkpointing
from ..train.trainer import LoraCliTrainer, check_launch, training_arguments
from . import encoding, rows

log = logging.getLogger("lora_cli")

KIND = {"dpo": rows.PAIRED, "orpo": rows.PAIRED, "kto": rows.UNPAIRED}
REFERENCE = "ref"  # the name TRL gives the frozen copy of a starting adapter


def prepare(cfg: TrainConfig) -> Prepared:
    """Read, validate and encode the preference rows (and the tokenizer they need) before any weights load."""
    kind = KIND[cfg.method]
    train_rows = rows.load(cfg.train_path, kind, cfg.seed)
    eval_rows = rows.load(cfg.eval_path, kind, cfg.seed) if cfg.eval_path else []
    if cfg.val_split > 0:
        train_rows, eval_rows = data.split_validation(train_rows, cfg.val_split, cfg.seed)
    base, tokenizer = load_tokenizer(cfg)
    train, train_stats = encode_dataset(cfg, tokenizer, train_rows, cfg.train_path)
    evaluation = eval_stats = None
    if eval_rows:
        evaluation, eval_stats = encode_dataset(cfg, tokenizer, eval_rows, cfg.eval_path or "validation split")
    what = "preference pairs" if kind == rows.PAIRED else "judged answers"
    log.info("data: %d training %s (%s tokens, %s in answers, longest %d)%s", train_stats.kept, what,
             f"{train_stats.tokens:,}", f"{train_stats.trained_tokens:,}", train_stats.longest,
             f", {eval_stats.kept} evaluation rows" if eval_stats else "")
    return Prepared(base, tokenizer, train, evaluation, train_stats, eval_stats)


def encode_dataset(cfg: TrainConfig, tokenizer: Any, rows_: list, name: str) -> tuple[Any, Any]:
    from datasets import Dataset

    examples, stats = encoding.encode_examples(tokenizer, rows_, max_length=cfg.max_seq_length,
                                               max_prompt_length=cfg.max_prompt_length, truncation=cfg.truncation,
                                               name=name)
    if cfg.method == "kto":
        # KTO reads its batches in order (each answer's KL partner is its neighbour): shuffle once, by the seed.
        import random

        random.Random(cfg.seed).shuffle(examples)
        return Dataset.from_dict(encoding.judged_columns(examples)), stats
    return Dataset.from_dict(encoding.pair_columns(examples)), stats


def step_plan(cfg: TrainConfig, model: Any, precision: str, stats: encoding.PreferenceStats) -> StepPlan:
    """--batch_size rows per padded micro-batch; each pair is two sequences, and dpo/kto add a reference forward."""
    seq_len = min(stats.longest, cfg.max_seq_length)
    # A pair is two sequences; a KTO row one, plus its KL sequence (its prompt with another row's answer) under the
    # kto loss.
    sequences = 2 if cfg.method != "kto" or (cfg.loss_type or "kto") == "kto" else 1
    checkpointing = decide_gradient_checkpointing(cfg, model, precision, cfg.batch_size * sequences, seq_len)
    return StepPlan(cfg.batch_size, cfg.gradient_accumulation_steps, False, seq_len, checkpointing,
                    sequences_per_row=sequences, reference_forward=cfg.method != "orpo")


def build_trainer(cfg: TrainConfig, model: Any, prepared: Prepared, plan: StepPlan, precision: str,
                  trained_tokens_resumed: int = 0) -> Any:
    """TRL's trainer for --method, on the LoRA model; the reference is the base (adapter disabled) or, with
    --adapter, a frozen copy of the starting adapter."""
    common = training_arguments(cfg, plan, precision, has_eval=prepared.eval is not None)
    # Rows already fit --max_seq_length (encoding applied and counted every length rule): TRL's cut never acts.
    common.update(max_length=cfg.max_seq_length, remove_unused_columns=False, beta=cfg.beta)
    trainer_class, config = _classes(cfg.method)
    if cfg.method in LOSS_TYPES:
        common["loss_type"] = cfg.loss_type or LOSS_TYPES[cfg.method][0]
    args = config(**trainer_args.apply(cfg, common))
    trainer = trainer_class(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                            processing_class=prepared.tokenizer, keep_checkpoints=cfg.save_total_limit,
                            trained_tokens_resumed=trained_tokens_resumed)
    if cfg.method != "orpo":
        _choose_reference(trainer.model, fresh=not cfg.adapter and cfg.init_lora_weights == "default")
    check_launch(cfg, args)
    return trainer


def _choose_reference(model: Any, fresh: bool) -> None:
    """TRL copies the adapter as the frozen reference. A freshly initialised adapter leaves the base unchanged, so
    the copy is dropped and the reference is the base with the adapter disabled (one adapter fewer in each forward).
    An adapter given with --adapter (or initialised from the weights, e.g. pissa) keeps its frozen copy."""
    if fresh and REFERENCE in model.peft_config:
        model.delete_adapter(REFERENCE)
    log.info("reference model: %s", "the starting adapter, frozen" if REFERENCE in model.peft_config else
             "the base model (adapter disabled)")


class PreferenceTrainer(LoraCliTrainer):
    """lora-train's additions for the preference trainers: rows come encoded, the frozen reference copy is never
    saved, and the log shows how often the chosen answer wins."""

    LOGGED = ("loss", "eval_loss", "rewards/accuracies", "eval_rewards/accuracies", "rewards/margins",
              "learning_rate", "grad_norm")

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # encoded by lora_cli.preference.encoding with the template's own assistant-turn masks

    def count_trained(self, inputs):
        return inputs["completion_mask"].sum()

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        # peft saves every adapter it holds, the frozen reference copy in a subfolder: it is not the result (a
        # resumed run copies it again from --adapter).
        shutil.rmtree(Path(output_dir or self.args.output_dir) / REFERENCE, ignore_errors=True)


def _classes(method: str) -> tuple[type, type]:
    if method == "dpo":
        from trl import DPOConfig, DPOTrainer

        return type("LoraDPOTrainer", (PreferenceTrainer, DPOTrainer), {}), DPOConfig
    if method == "kto":
        from trl import KTOConfig, KTOTrainer

        return type("LoraKTOTrainer", (KTOPreparation, PreferenceTrainer, KTOTrainer), {}), KTOConfig
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # ORPO lives in trl.experimental in TRL 1.x

    return type("LoraORPOTrainer", (ORPOPreparation, PreferenceTrainer, ORPOTrainer), {}), ORPOConfig


class KTOPreparation:
    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if not self.calculate_KL:
            return dataset
        # TRL's KL pairs (its _prepare_dataset does this after tokenising, which lora-train has done): each answer
        # of a batch is matched with the previous row's prompt.
        def rotate(batch):
            batch["KL_completion_ids"] = [batch["completion_ids"][-1]] + batch["completion_ids"][:-1]
            return batch

        return dataset.map(rotate, batched=True, batch_size=args.per_device_train_batch_size)


class ORPOPreparation:
    LOGGED = ("loss", "eval_loss", "rewards/accuracies", "eval_rewards/accuracies", "log_odds_ratio",
              "learning_rate", "grad_norm")

    def tokenize_row(self, feature, model=None):
        """ORPO's columns from lora-train's encoding (TRL's own re-tokenises the rendered text)."""
        prompt = feature["prompt_ids"]
        out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for name in ("chosen", "rejected"):
            answer = feature[f"{name}_ids"]
            out[f"{name}_input_ids"] = prompt + answer
            out[f"{name}_attention_mask"] = [1] * (len(prompt) + len(answer))
            out[f"{name}_labels"] = [chat.IGNORE_INDEX] * len(prompt) + answer
        return out

    def count_trained(self, inputs):
        return sum((inputs[f"{n}_labels"] != chat.IGNORE_INDEX).sum() for n in ("chosen", "rejected"))
