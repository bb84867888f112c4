"""lora-train's SFTTrainer: the compact loss, trained-token counting, atomic checkpoints, and its construction."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .. import chat, checkpoints, distributed, errors, tokenizer_files
from ..config import TrainConfig, trainer_args
from ..errors import UsageError
from ..filenames import CHECKPOINT_STAGING
from .dataset import Prepared
from .optimizer import optimizer_name
from .plan import StepPlan, cuda_available

log = logging.getLogger("lora_cli")


class LoraCliTrainer:
    """What every lora-train trainer (SFT, DPO, ORPO, KTO) adds to TRL's, mixed in before it: it counts the tokens
    that carry a loss (TRL counts every input token), saves checkpoints atomically (transformers writes them in place
    and prunes old ones before the new one is whole) and prints each log as one short line."""

    LOGGED = ("loss", "eval_loss", "learning_rate", "grad_norm")
    initial_adapter: str | None = None  # PiSSA/OLoRA: the adapter as initialised, for the final save's conversion

    def __init__(self, *args, keep_checkpoints: int = 0, trained_tokens_resumed: int = 0, **kwargs):
        self.keep_checkpoints = keep_checkpoints  # pruned here, only once the newest checkpoint is complete
        self.trained_tokens_resumed = trained_tokens_resumed  # before the checkpoint this run resumed from
        self.trained_tokens = 0  # in this process
        self._staging: Path | None = None
        super().__init__(*args, **kwargs)
        from transformers.trainer_callback import PrinterCallback, ProgressCallback

        self.remove_callback(PrinterCallback)  # the trainer always adds its own printer: ours replace it
        self.remove_callback(ProgressCallback)
        for callback in progress_callbacks(self.LOGGED):
            self.add_callback(callback)

    def count_trained(self, inputs: dict[str, Any]) -> Any:
        """How many tokens of this micro-batch carry the loss."""
        return (inputs["labels"] != chat.IGNORE_INDEX).sum()

    def training_step(self, model, inputs, num_items_in_batch=None):
        trained = self.count_trained(inputs)
        self.trained_tokens += int(self.accelerator.reduce(trained, reduction="sum"))  # over all processes
        return super().training_step(model, inputs, num_items_in_batch)

    def _save_checkpoint(self, model, trial):
        out = Path(self.args.output_dir)
        step = self.state.global_step
        self._staging = out / CHECKPOINT_STAGING
        then = "add --resume to the same command" if checkpoints.complete_checkpoints(out) else \
            "re-run with --overwrite"
        with errors.writing(f"saving checkpoint-{step} into {out}", then):
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()  # every process has written its part (e.g. its RNG state)
            if self.args.should_save:
                checkpoints.finish_checkpoint(out / CHECKPOINT_STAGING / f"checkpoint-{step}", out, step,
                                              self.keep_checkpoints, self.trained_tokens_total)

    @property
    def trained_tokens_total(self) -> int:
        return self.trained_tokens_resumed + self.trained_tokens

    def _save(self, output_dir=None, state_dict=None):
        super()._save(output_dir, state_dict)
        if self.initial_adapter and self._staging is None and self.args.should_save:  # the final adapter only:
            # checkpoints stay as trained, on the modified base that --resume rebuilds
            from .adapter import save_as_plain_lora

            save_as_plain_lora(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir,
                               self.initial_adapter)
        tokenizer_files.make_portable(Path(output_dir or self.args.output_dir))  # adapters and checkpoints alike

    def _get_output_dir(self, trial):
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)


def _trainer_class():
    from trl import SFTTrainer

    class LoraSFTTrainer(LoraCliTrainer, SFTTrainer):
        """SFTTrainer with lora-train's checkpoints and token counts, and a compact loss off Triton devices."""

        LOGGED = ("loss", "eval_loss", "learning_rate", "grad_norm", "mean_token_accuracy",
                  "eval_mean_token_accuracy")
        compact_loss_usable = True

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # TRL's fused LM head scores only the trained positions on Triton devices; elsewhere (CPU) it projects
            # every position onto the vocabulary, in fp32, for the forward and twice in the backward. Here the
            # model's own head projects only the positions that have a next-token label: the same loss, a fraction
            # of the work. TRL's head stays where it is leaner (GPUs, or logits too large to hold).
            # MoE models keep TRL's head, which adds the router's load-balancing loss.
            usable = self.compact_loss_usable and not return_outputs and not self.aux_loss_enabled
            compact = compact_loss_positions(model, inputs) if usable else None
            if compact is None:
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            import torch

            keep, targets = compact
            forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            try:
                logits = model(**forward_inputs, use_cache=False, logits_to_keep=keep).logits.float()
            except (IndexError, TypeError) as exc:  # a model whose forward takes only an int logits_to_keep
                log.debug("compact loss not supported by this model (%s); using TRL's head", exc)
                self.compact_loss_usable = False
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            logits = logits.reshape(-1, logits.size(-1))
            per_token = torch.nn.functional.cross_entropy(logits, targets, reduction="none")
            loss = per_token.sum() / (max(1, targets.numel()) if num_items_in_batch is None else num_items_in_batch)
            if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                loss = loss * self.accelerator.num_processes  # as TRL and Trainer: DDP averages the gradients
            self._log_compact_metrics(logits.detach(), targets, inputs)
            return loss

        def _log_compact_metrics(self, logits, targets, inputs) -> None:
            """The metrics TRL logs with its own head (token accuracy, entropy, tokens seen), from the kept logits."""
            import torch

            mode = "train" if self.model.training else "eval"
            gather = self.accelerator.gather_for_metrics
            entropy = torch.zeros((), device=logits.device)
            for rows in logits.split(4096):  # a log-softmax copy of a few rows at a time, not of all of them
                log_probs = torch.log_softmax(rows, dim=-1)
                entropy -= (log_probs.exp() * log_probs).sum()
            valid = gather(torch.tensor(targets.numel(), device=logits.device)).sum()
            correct = gather((logits.argmax(-1) == targets).sum()).sum()
            entropy = gather(entropy).sum()
            self._metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
            self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
            if mode == "train":
                mask = inputs.get("attention_mask")
                local = mask.sum() if mask is not None else torch.tensor(inputs["input_ids"].numel(),
                                                                        device=logits.device)
                self._total_train_tokens += int(gather(local).sum())
                self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    return LoraSFTTrainer


COMPACT_LOGITS_LIMIT = 1 << 27  # kept logits (512 MiB in fp32); beyond that TRL's tiled head holds less memory


def compact_loss_positions(model: Any, inputs: dict[str, Any]) -> tuple[Any, Any] | None:
    """(positions whose next token is trained, those tokens) for lora-train's compact loss, or None where TRL's fused
    head is the better choice: on Triton devices (it compacts there itself), for models whose forward cannot keep
    chosen positions, or when even the kept logits would be large."""
    import inspect

    labels = inputs.get("labels")
    if labels is None or labels.device.type in ("cuda", "xpu"):
        return None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:
        return None
    next_labels = labels[:, 1:]
    trained = next_labels != chat.IGNORE_INDEX
    if int(trained.sum()) * base.config.get_text_config().vocab_size > COMPACT_LOGITS_LIMIT:
        return None
    keep = labels.new_zeros(labels.shape, dtype=bool)
    keep[:, :-1] = trained  # position t predicts token t + 1
    return keep, next_labels[trained]


def build_trainer(cfg: TrainConfig, model: Any, prepared: Prepared, plan: StepPlan, precision: str,
                  trained_tokens_resumed: int = 0) -> Any:
    """The trainer for this run; the model is already in its training-only state (adapter.training_only)."""
    from trl import SFTConfig

    args = SFTConfig(**trainer_args.apply(cfg, dict(
        **training_arguments(cfg, plan, precision, has_eval=prepared.eval is not None),
        padding_free=plan.padding_free,  # one row per micro-batch, position ids restart per conversation, no padding
        use_liger_kernel=_liger_available(),  # fused RMSNorm/SwiGLU/RoPE kernels on CUDA; TRL fuses the LM head
        # Rows are already cut to --max_seq_length (and counted) by encode_rows; packing needs it as the bin size.
        max_length=cfg.max_seq_length if cfg.packing else None,
        packing=cfg.packing,
        packing_strategy="bfd",  # whole conversations only; with padding-free batches, no cross-attention
    )))
    trainer = _trainer_class()(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                               processing_class=prepared.tokenizer,
                               keep_checkpoints=cfg.save_total_limit, trained_tokens_resumed=trained_tokens_resumed)
    check_launch(cfg, args)
    return trainer


def training_arguments(cfg: TrainConfig, plan: StepPlan, precision: str, has_eval: bool) -> dict[str, Any]:
    """The TrainingArguments every lora-train method shares (SFTConfig, DPOConfig, ORPOConfig, KTOConfig take them)."""
    optim = optimizer_name(cfg.optim, cuda_available())
    if optim != cfg.optim:
        log.info("optimizer: torch's AdamW for --optim %s (paging needs a CUDA GPU; the updates are the same)",
                 cfg.optim)
    return dict(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=plan.micro_batch,
        per_device_eval_batch_size=plan.micro_batch,
        gradient_accumulation_steps=plan.accumulation,
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a fraction of the steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=optim,
        seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=plan.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=None,  # pruned by LoraCliTrainer, only once the newest checkpoint is complete
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps or cfg.save_steps,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in each step: skip DDP's extra graph walk
        use_cpu=not cuda_available(),  # without it transformers ignores a torchrun/accelerate launch on CPU
        dataset_num_proc=None,
        model_init_kwargs=None,
    )


def check_launch(cfg: TrainConfig, args: Any) -> None:
    launched = distributed.world_size()
    if launched != args.world_size:  # never train N independent copies that overwrite each other's outputs
        raise UsageError(f"launched as {launched} processes but training sees {args.world_size}; check the "
                         "launcher (torchrun/accelerate) and the device settings")
    if args.world_size > 1:
        log.info("%d processes: effective batch %d conversations (micro-batch %d x accumulation %d x %d processes)",
                 args.world_size, cfg.batch_size * cfg.gradient_accumulation_steps * args.world_size,
                 cfg.batch_size, cfg.gradient_accumulation_steps, args.world_size)


def _liger_available() -> bool:
    import importlib.util

    return cuda_available() and importlib.util.find_spec("liger_kernel") is not None


def progress_callbacks(logged: tuple[str, ...]) -> list[Any]:
    """Keep the progress bar, but print each log as one short line instead of the trainer's metric dicts."""
    from transformers.trainer_callback import ProgressCallback

    class CompactProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            parts = [f"{key} {logs[key]:.4g}" for key in logged if isinstance((logs or {}).get(key), (int, float))]
            # Outside train() (the evaluation before it, "step 0/0") run_training reports the loss in its own words.
            if state.is_world_process_zero and parts and self.training_bar is not None:
                self.training_bar.write(f"step {state.global_step}/{state.max_steps}: " + ", ".join(parts))

    return [CompactProgress()]
