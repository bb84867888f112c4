"""lora-train: parse -> validate -> load data -> load model -> attach LoRA -> train -> save."""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import attention, chat, checkpoints, config, data, models
from .config import TrainConfig, split_list
from .encode import EncodeStats, encode_rows, report
from .errors import UsageError

log = logging.getLogger("lora_cli")

RUN_CONFIG = "run_config.yaml"
METRICS = "train_metrics.json"


@dataclass
class Prepared:
    """Everything known before the model loads: fast to build, so bad input fails in seconds."""

    base: models.BaseModel
    tokenizer: Any
    train: Any  # datasets.Dataset with input_ids and labels
    eval: Any
    train_stats: EncodeStats
    eval_stats: EncodeStats | None


def train(cfg: TrainConfig) -> dict[str, Any]:
    out = Path(cfg.output_dir)
    resuming = cfg.resume or bool(cfg.resume_from_checkpoint)
    check_output_dir(out, cfg.overwrite or resuming)
    precision = models.choose_precision(cfg.precision)
    check_quantization_available(cfg)
    prepared = prepare(cfg)
    if cfg.dry_run:
        return dry_run(cfg, prepared, precision)
    data_hashes = checkpoints.fingerprint(train_path=cfg.train_path, eval_path=cfg.eval_path)
    resume_from = find_resume_checkpoint(cfg, out, data_hashes) if resuming else None
    log.info("loading %s (%s%s)", prepared.base.display, precision,
             ", 4-bit NF4" if cfg.load_in_4bit else ", 8-bit" if cfg.load_in_8bit else "")
    from transformers import set_seed

    set_seed(cfg.seed)  # the trainer seeds only later: without this the adapter's initial weights vary per run
    model = models.load_model(prepared.base, precision=precision, load_in_4bit=cfg.load_in_4bit,
                              load_in_8bit=cfg.load_in_8bit, trust_remote_code=cfg.trust_remote_code,
                              attn_implementation=cfg.attn_implementation)
    model = attach_lora(model, cfg)
    check_disk_space(out, model, cfg.save_total_limit)
    trainer = build_trainer(cfg, model, prepared, precision)
    try:
        return run_training(cfg, trainer, prepared, out, resume_from, data_hashes)
    finally:
        restore_for_inference(model)


def dry_run(cfg: TrainConfig, prepared: Prepared, precision: str) -> dict[str, Any]:
    from . import estimate

    model = attach_lora(estimate.meta_model(prepared.base.path, cfg.trust_remote_code), cfg)
    stats = prepared.train_stats
    micro, accumulation, _, seq_len, gc = step_plan(cfg, model, precision, stats)
    est = estimate.estimate(model, precision=precision, quantization=quantization(cfg), optim=cfg.optim,
                            batch_size=micro, seq_len=seq_len, gradient_checkpointing=gc,
                            trained_fraction=stats.trained_tokens / max(1, stats.tokens))
    steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(
        stats.kept / (cfg.batch_size * cfg.gradient_accumulation_steps) * cfg.num_train_epochs)
    log.info("dry run: %s optimizer steps of %d conversations (micro-batches of %d x accumulation %d)", steps,
             cfg.batch_size * cfg.gradient_accumulation_steps, micro, accumulation)
    log.info("GPU memory per device, %s%s, micro-batch %d x %d tokens%s:\n%s", precision,
             " + 4-bit base" if cfg.load_in_4bit else " + 8-bit base" if cfg.load_in_8bit else "", micro,
             seq_len, ", gradient checkpointing" if gc else "", "\n".join(est.lines()))
    return {"dry_run": True, "optimizer_steps": steps, "trainable_params": est.trainable_params,
            "total_params": est.total_params, "estimated_peak_bytes": est.total, "data": stats.as_dict()}


def quantization(cfg: TrainConfig) -> str | None:
    return "4bit" if cfg.load_in_4bit else "8bit" if cfg.load_in_8bit else None


def step_plan(cfg: TrainConfig, model: Any, precision: str,
              stats: EncodeStats) -> tuple[int, int, bool, int, bool]:
    """(micro-batch, accumulation, padding-free, longest sequence, gradient checkpointing) of each optimizer step;
    one function, so that --dry_run estimates exactly the run that training would do."""
    micro, accumulation, padding_free = micro_batching(cfg, stats.longest)
    seq_len = cfg.max_seq_length if cfg.packing else min(stats.longest, cfg.max_seq_length)
    return micro, accumulation, padding_free, seq_len, decide_gradient_checkpointing(cfg, model, precision, micro,
                                                                                      seq_len)


def micro_batching(cfg: TrainConfig, longest: int) -> tuple[int, int, bool]:
    """(micro-batch, accumulation steps, padding-free): the effective batch of --batch_size x
    --gradient_accumulation_steps conversations, regrouped into the fewest padding-free micro-batches whose longest
    possible size fits --tokens_per_batch. Same conversations per optimizer step, far fewer forward passes."""
    if cfg.packing:  # packed rows are already full sequences of --max_seq_length tokens
        return cfg.batch_size, cfg.gradient_accumulation_steps, True
    if cfg.tokens_per_batch == 0:
        return cfg.batch_size, cfg.gradient_accumulation_steps, False
    effective = cfg.batch_size * cfg.gradient_accumulation_steps
    fit = max(1, cfg.tokens_per_batch // max(1, min(longest, cfg.max_seq_length)))
    micro = max(d for d in range(1, effective + 1) if effective % d == 0 and d <= fit)
    return micro, effective // micro, True


def decide_gradient_checkpointing(cfg: TrainConfig, model: Any, precision: str, micro: int, seq_len: int) -> bool:
    """--gradient_checkpointing as given; else on only where memory needs it (never on CPU, where it costs time)."""
    if cfg.gradient_checkpointing is not None:
        return cfg.gradient_checkpointing
    if not _cuda_available():
        return False
    import torch

    from . import estimate

    without = estimate.estimate(model, precision=precision, quantization=quantization(cfg), optim=cfg.optim,
                                batch_size=micro, seq_len=seq_len, gradient_checkpointing=False)
    free, _ = torch.cuda.mem_get_info()
    return without.total > 0.8 * (free + torch.cuda.memory_allocated())  # the weights already on the GPU count too


def check_quantization_available(cfg: TrainConfig) -> None:
    if cfg.load_in_4bit or cfg.load_in_8bit:
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            flag = "--load_in_4bit" if cfg.load_in_4bit else "--load_in_8bit"
            raise UsageError(f"{flag} needs bitsandbytes: pip install bitsandbytes") from None


def find_resume_checkpoint(cfg: TrainConfig, out: Path, data_hashes: dict[str, str]) -> str:
    """The checkpoint to resume from, after checking that config and data are those of the interrupted run."""
    checkpoints.check_resume(out, config.to_dict(cfg), data_hashes, cfg.resume_force)
    if is_main_process():  # the others only read; they skip incomplete checkpoints all the same
        checkpoints.remove_incomplete(out)
    if cfg.resume_from_checkpoint:
        chosen = Path(cfg.resume_from_checkpoint)
        if not (chosen / checkpoints.COMPLETE).is_file():
            raise UsageError(f"--resume_from_checkpoint {chosen}: not a complete lora-train checkpoint")
    else:
        found = checkpoints.complete_checkpoints(out)
        if not found:
            raise UsageError(f"--resume: no complete checkpoint in {out} (checkpoints are written every "
                             "--save_steps); start again without --resume")
        chosen = found[-1]
    log.info("resuming from %s", chosen)
    return str(chosen)


def check_disk_space(out: Path, model: Any, keep: int) -> None:
    """Checkpoints hold the adapter and its two Adam moments in fp32: refuse to start a run that cannot save them."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    per_checkpoint = trainable * 4 * 3 + (64 << 20)  # + tokenizer, RNG and trainer state
    need = per_checkpoint * ((keep or 1) + 1)  # pruning happens after the next checkpoint is complete
    free = shutil.disk_usage(out if out.exists() else _existing_parent(out)).free
    if free < need:
        raise UsageError(f"--output_dir {out}: about {need / 2**30:.1f} GiB is needed for checkpoints but only "
                         f"{free / 2**30:.1f} GiB is free; free space, choose another disk or lower "
                         "--save_total_limit")


def is_main_process() -> bool:
    """True in a single process, and in the first process of a torchrun/accelerate launch."""
    return os.environ.get("RANK", "0") == "0"


def check_output_dir(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--output_dir {out}: exists and is not a folder")
    # Only the first process checks: the others may start after it has created the folder.
    if is_main_process() and out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UsageError(f"--output_dir {out}: not empty; pass --overwrite to write into it, or choose a new folder")
    if not os.access(out if out.exists() else _existing_parent(out), os.W_OK):
        raise UsageError(f"--output_dir {out}: not writable")


def _existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def prepare(cfg: TrainConfig) -> Prepared:
    """Read, validate and tokenise the data (and the tokenizer it needs), before any model weights load."""
    train_rows = data.load_conversations(cfg.train_path)
    eval_rows = data.load_conversations(cfg.eval_path) if cfg.eval_path else []
    if cfg.val_split > 0:
        train_rows, eval_rows = data.split_validation(train_rows, cfg.val_split, cfg.seed)
    base = models.resolve(cfg.base_model)
    tokenizer = models.load_tokenizer(base, cfg.trust_remote_code)
    chat.resolve_chat_template(tokenizer, cfg.chat_template)
    train_cols, train_stats = encode_dataset(cfg, tokenizer, train_rows, cfg.train_path)
    eval_cols = eval_stats = None
    if eval_rows:
        eval_cols, eval_stats = encode_dataset(cfg, tokenizer, eval_rows, cfg.eval_path or "validation split")
    log.info("data: %d training conversations (%s tokens, %s trained = %.0f%%, longest %d)%s", train_stats.kept,
             f"{train_stats.tokens:,}", f"{train_stats.trained_tokens:,}",
             100 * train_stats.trained_tokens / train_stats.tokens, train_stats.longest,
             f", {eval_stats.kept} evaluation conversations" if eval_stats else "")
    return Prepared(base, tokenizer, train_cols, eval_cols, train_stats, eval_stats)


def encode_dataset(cfg: TrainConfig, tokenizer: Any, rows: list[data.Conversation],
                   name: str) -> tuple[Any, EncodeStats]:
    """The rows' token ids and labels as a Dataset: from the data cache when these rows were encoded before with
    the same tokenizer, template and settings, else encoded now (and cached, except in a dry run)."""
    from datasets import Dataset

    from . import datacache

    settings = dict(max_seq_length=cfg.max_seq_length, truncation=cfg.truncation, train_on_inputs=cfg.train_on_inputs)
    digest = datacache.key(tokenizer, rows, settings) if cfg.data_cache else ""
    cached = datacache.load(digest) if digest else None
    if cached is not None:
        dataset, stats = cached
        report(stats, name, cfg.max_seq_length, cfg.truncation)  # the same warnings as when it was encoded
        log.info("%s: tokenised rows reused from the data cache (%s)", name, datacache.root() / digest)
        return dataset, stats
    columns, stats = encode_rows(tokenizer, rows, name=name, **settings)
    if digest and not cfg.dry_run:
        return datacache.save(digest, columns, stats), stats
    return Dataset.from_dict(columns), stats


def attach_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.load_in_4bit or cfg.load_in_8bit:
        # Casts norms to fp32 and enables input gradients, which gradient checkpointing on a frozen base needs.
        # Gradient checkpointing is left to the trainer (decided once the adapter's size is known); non-reentrant
        # checkpointing needs no input gradients.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    targets: str | list[str] = "all-linear" if cfg.target_modules == "all-linear" else split_list(cfg.target_modules)
    lora = LoraConfig(
        r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
        bias="none", task_type="CAUSAL_LM", use_rslora=cfg.use_rslora, use_dora=cfg.use_dora,
        init_lora_weights=True if cfg.init_lora_weights == "default" else cfg.init_lora_weights,
        modules_to_save=split_list(cfg.modules_to_save) or None)
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target module" in str(exc):
            names = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if type(m).__name__ in
                            ("Linear", "Linear4bit", "Linear8bitLt")})
            raise UsageError(f"--target_modules {cfg.target_modules}: not found in the model; its linear modules "
                             f"are {','.join(names)}") from None
        raise
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%d on %s: %s trainable parameters (%.2f%% of %s)", cfg.lora_r, cfg.lora_alpha,
             cfg.target_modules, f"{trainable:,}", 100 * trainable / total, f"{total:,}")
    return model


def _trainer_class():
    from trl import SFTTrainer

    class LoraSFTTrainer(SFTTrainer):
        """SFTTrainer that counts the tokens that carry a loss (TRL counts every input token) and saves checkpoints
        atomically (transformers writes them in place and prunes old ones before the new one is whole)."""

        trained_tokens = 0  # in this process
        compact_loss_usable = True
        trained_tokens_resumed = 0  # before the checkpoint this run resumed from
        keep_checkpoints = 0
        _staging: Path | None = None

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

        def training_step(self, model, inputs, num_items_in_batch=None):
            trained = (inputs["labels"] != chat.IGNORE_INDEX).sum()
            self.trained_tokens += int(self.accelerator.reduce(trained, reduction="sum"))  # over all processes
            return super().training_step(model, inputs, num_items_in_batch)

        def _save_checkpoint(self, model, trial):
            out = Path(self.args.output_dir)
            self._staging = out / checkpoints.STAGING
            try:
                super()._save_checkpoint(model, trial)
            finally:
                self._staging = None
            self.accelerator.wait_for_everyone()  # every process has written its part (e.g. its RNG state)
            if self.args.should_save:
                step = self.state.global_step
                checkpoints.finish_checkpoint(out / checkpoints.STAGING / f"checkpoint-{step}", out, step,
                                              self.keep_checkpoints, self.trained_tokens_total)

        @property
        def trained_tokens_total(self) -> int:
            return self.trained_tokens_resumed + self.trained_tokens

        def _get_output_dir(self, trial):
            return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

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


def build_trainer(cfg: TrainConfig, model: Any, prepared: Prepared, precision: str) -> Any:
    from trl import SFTConfig

    has_eval = prepared.eval is not None
    micro, accumulation, padding_free, _, checkpointing = step_plan(cfg, model, precision, prepared.train_stats)
    per_sequence = padding_free and attention.use_per_sequence_sdpa(model)
    if precision in ("bf16", "fp16") and not cfg.use_dora:
        cast_adapter_inputs(model, False)
    log.info("each optimizer step: %d conversations in %d %s micro-batch%s of %d%s%s", micro * accumulation,
             accumulation, "padding-free" if padding_free else "padded", "es" if accumulation > 1 else "", micro,
             ", gradient checkpointing" if checkpointing else "", ", sdpa per conversation" if per_sequence else "")
    args = SFTConfig(
        output_dir=cfg.output_dir,
        per_device_train_batch_size=micro,
        per_device_eval_batch_size=micro,
        gradient_accumulation_steps=accumulation,
        padding_free=padding_free,  # one row per micro-batch, position ids restart per conversation, no padding
        learning_rate=cfg.learning_rate,
        num_train_epochs=cfg.num_train_epochs,
        max_steps=cfg.max_steps,
        lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a float below 1 is a fraction of the steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=cfg.optim,
        seed=cfg.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        activation_checkpointing=checkpointing,
        use_liger_kernel=_liger_available(),  # fused RMSNorm/SwiGLU/RoPE kernels on CUDA; TRL fuses the LM head
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=cfg.logging_steps,
        save_steps=cfg.save_steps,
        save_total_limit=None,  # pruned by LoraSFTTrainer, only once the newest checkpoint is complete
        eval_strategy="steps" if has_eval else "no",
        eval_steps=cfg.eval_steps or cfg.save_steps,
        report_to=[] if cfg.report_to == "none" else [cfg.report_to],
        ddp_find_unused_parameters=False,  # every LoRA weight takes part in each step: skip DDP's extra graph walk
        use_cpu=not _cuda_available(),  # without it transformers ignores a torchrun/accelerate launch on CPU
        # Rows are already cut to --max_seq_length (and counted) by encode_rows; packing needs it as the bin size.
        max_length=cfg.max_seq_length if cfg.packing else None,
        packing=cfg.packing,
        packing_strategy="bfd",  # whole conversations only; with padding-free batches, no cross-attention
        dataset_num_proc=None,
        model_init_kwargs=None,
    )
    trainer = _trainer_class()(model=model, args=args, train_dataset=prepared.train, eval_dataset=prepared.eval,
                               processing_class=prepared.tokenizer)
    trainer.keep_checkpoints = cfg.save_total_limit
    _use_compact_progress(trainer)
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != args.world_size:  # never train N independent copies that overwrite each other's outputs
        raise UsageError(f"launched as {launched} processes but training sees {args.world_size}; check the "
                         "launcher (torchrun/accelerate) and the device settings")
    if args.world_size > 1:
        log.info("%d processes: effective batch %d conversations (micro-batch %d x accumulation %d x %d processes)",
                 args.world_size, cfg.batch_size * cfg.gradient_accumulation_steps * args.world_size,
                 cfg.batch_size, cfg.gradient_accumulation_steps, args.world_size)
    return trainer


def restore_for_inference(model: Any) -> None:
    """Undo build_trainer's training-only settings (per-conversation attention needs the collator's sequence
    boundaries; uncast adapter inputs need autocast), for code that keeps using the model after training."""
    attention.use_plain_sdpa(model)
    cast_adapter_inputs(model, True)


def cast_adapter_inputs(model: Any, enabled: bool) -> None:
    """peft's copy of every LoRA input to the adapter weights' dtype (fp32). Under autocast the adapter matmuls run in
    bf16/fp16 whatever their input, and the copies kept for the backward are about a third of the activation memory:
    build_trainer turns them off for bf16/fp16 runs, restore_for_inference back on."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = enabled


def _liger_available() -> bool:
    import importlib.util

    return _cuda_available() and importlib.util.find_spec("liger_kernel") is not None


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


LOGGED = ("loss", "eval_loss", "learning_rate", "grad_norm", "mean_token_accuracy", "eval_mean_token_accuracy")


def _use_compact_progress(trainer: Any) -> None:
    """Keep the progress bar, but print each log as one short line instead of the trainer's metric dicts."""
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    class CompactProgress(ProgressCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            parts = [f"{key} {logs[key]:.4g}" for key in LOGGED if isinstance((logs or {}).get(key), (int, float))]
            if state.is_world_process_zero and parts:
                line = f"step {state.global_step}/{state.max_steps}: " + ", ".join(parts)
                (self.training_bar.write if self.training_bar is not None else log.info)(line)

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(CompactProgress())


def run_training(cfg: TrainConfig, trainer: Any, prepared: Prepared, out: Path, resume_from: str | None = None,
                 data_hashes: dict[str, str] | None = None) -> dict[str, Any]:
    main_process = trainer.is_world_process_zero()
    state = checkpoints.read_state(out) if resume_from else {}
    if main_process and not resume_from:
        if cfg.overwrite and out.is_dir():
            checkpoints.clear_previous_run(out)
        out.mkdir(parents=True, exist_ok=True)
        config.save(cfg, out / RUN_CONFIG)
        state = {"data": data_hashes or {}}
        checkpoints.write_state(out, state)
    metrics: dict[str, Any] = {}
    if trainer.eval_dataset is not None:
        if "eval_loss_before" not in state:
            state["eval_loss_before"] = trainer.evaluate()["eval_loss"]
            if main_process:
                checkpoints.write_state(out, state)
        metrics["eval_loss_before"] = state["eval_loss_before"]
        log.info("eval loss before training: %.4f", metrics["eval_loss_before"])
    if resume_from:
        trainer.trained_tokens_resumed = checkpoints.checkpoint_info(resume_from).get("trained_tokens", 0)
    stopper = checkpoints.stop_on_signal_callback()
    trainer.add_callback(stopper)
    stopper.install()
    start = time.perf_counter()
    try:
        result = trainer.train(resume_from_checkpoint=resume_from)
    finally:
        stopper.uninstall()
    seconds = time.perf_counter() - start
    if stopper.signum is not None:
        name = signal.Signals(stopper.signum).name
        raise checkpoints.Interrupted(
            f"stopped by {name} at step {trainer.state.global_step}; checkpoint saved in "
            f"{out / f'checkpoint-{trainer.state.global_step}'}. Continue with the same command plus --resume",
            stopper.signum)
    metrics.update(result.metrics)
    if trainer.eval_dataset is not None:
        evals = [e for e in trainer.state.log_history if "eval_loss" in e]
        if evals and evals[-1].get("step") == trainer.state.global_step:  # the trainer just evaluated
            metrics["eval_loss"] = evals[-1]["eval_loss"]
        else:
            metrics["eval_loss"] = trainer.evaluate()["eval_loss"]
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    metrics.update(
        train_loss_last=losses[-1] if losses else metrics.get("train_loss"),
        trained_tokens=trainer.trained_tokens_total,
        trained_tokens_per_second=trainer.trained_tokens / seconds if seconds else 0.0,  # this process's speed
        resumed_from=resume_from,
        train_seconds=seconds,
        peak_memory_bytes=peak_memory_bytes(),
        optimizer_steps=trainer.state.global_step,
        data=prepared.train_stats.as_dict(),
        eval_data=prepared.eval_stats.as_dict() if prepared.eval_stats else None,
        base_model=prepared.base.display,
        base_model_path=prepared.base.path,
    )
    checkpoints.save_final(trainer, out, main_process)  # adapter_model.safetensors, adapter_config.json, tokenizer
    if main_process:
        (out / METRICS).write_text(json.dumps(_finite(metrics), indent=2) + "\n", encoding="utf-8")
    log.info(summary_line(metrics, out))
    return metrics


def summary_line(m: dict[str, Any], out: Path) -> str:
    evals = (f", eval loss {m['eval_loss_before']:.4f} -> {m['eval_loss']:.4f}" if "eval_loss" in m else "")
    return (f"done: {m['optimizer_steps']} steps, {m['trained_tokens']:,} trained tokens in {m['train_seconds']:.1f} s "
            f"({m['trained_tokens_per_second']:.1f} tokens/s), train loss {m['train_loss_last']:.4f}{evals}, "
            f"peak memory {m['peak_memory_bytes'] / 2**30:.2f} GiB; adapter in {out}")


def peak_memory_bytes() -> int:
    """Peak GPU memory allocated when on CUDA, else the process's peak resident set size."""
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _finite(value: Any) -> Any:
    """JSON has no NaN or infinity: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


