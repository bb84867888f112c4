"""The LoRA adapter on the loaded base model, and the training-only settings it runs under."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from .. import attention
from ..adapters import BASE_MODIFYING_INITS
from ..config import TrainConfig, split_list, typed
from ..errors import UsageError
from .plan import StepPlan

log = logging.getLogger("lora_cli")


def check_quantization_available(cfg: TrainConfig) -> None:
    if cfg.quantization != "none":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise UsageError(f"{typed(cfg, 'quantization')} needs bitsandbytes: pip install bitsandbytes") from None


def attach_lora(model: Any, cfg: TrainConfig) -> Any:
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if cfg.quantization != "none":
        # Casts norms to fp32 and enables input gradients, which gradient checkpointing on a frozen base needs.
        # Gradient checkpointing is left to the trainer (decided once the adapter's size is known); non-reentrant
        # checkpointing needs no input gradients.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if cfg.adapter:
        return continue_adapter(model, cfg.adapter)
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
    for trap in serving_traps(cfg):
        log.warning(trap)
    trainable, total = model.get_nb_trainable_parameters()
    log.info("LoRA r=%d alpha=%d on %s: %s trainable parameters (%.2f%% of %s)", cfg.lora_r, cfg.lora_alpha,
             cfg.target_modules, f"{trainable:,}", 100 * trainable / total, f"{total:,}")
    return model


def save_initial_adapter(model: Any, cfg: TrainConfig, folder: Path) -> str | None:
    """A PiSSA/OLoRA adapter as initialised, before any training, saved into `folder`/initial_adapter; the final save
    converts the trained adapter against it (save_as_plain_lora). None for other initialisations and --adapter."""
    if cfg.adapter or not cfg.init_lora_weights.startswith(BASE_MODIFYING_INITS):
        return None
    path = folder / "initial_adapter"  # the name peft gives the initial adapter while converting: not "default"
    model.save_pretrained(str(path))
    return str(path)


def save_as_plain_lora(model: Any, folder: str, initial: str) -> None:
    """Save the trained PiSSA/OLoRA adapter in `folder` converted to plain LoRA on the unmodified base, by peft's own
    conversion: delta W = B A - B0 A0 = [B | -B0] [A ; A0], so the saved adapter has twice the rank (and alpha,
    keeping the scale); its config says init_lora_weights=true, and peft, lora-merge, vLLM and llama.cpp apply it to
    the original base."""
    from safetensors.torch import load_file, save_file

    from peft import get_peft_model_state_dict

    from ..filenames import ADAPTER_WEIGHTS

    model.save_pretrained(folder, path_initial_model_for_weight_conversion=initial)
    # peft's conversion (subtract_mutated_init) keeps only lora_A/lora_B; the other saved tensors (modules_to_save
    # copies, DoRA magnitudes) do not depend on the moved part of the base, so they are put back as trained.
    weights = Path(folder) / ADAPTER_WEIGHTS
    converted = load_file(str(weights))
    dropped = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(model).items()
               if k not in converted}
    if dropped:
        save_file({**converted, **dropped}, str(weights), metadata={"format": "pt"})


def serving_traps(cfg: TrainConfig) -> list[str]:
    """Adapters vLLM refuses as they are, said when training starts rather than found at deployment."""
    flags = [flag for flag, on in (("--use_dora", cfg.use_dora), ("--modules_to_save", bool(cfg.modules_to_save)))
             if on]
    return [f"{' and '.join(flags)}: vLLM cannot serve this adapter as it is (it serves plain LoRA weights only); "
            "merge it with lora-merge and serve the merged model"] if flags else []


def continue_adapter(model: Any, path: str) -> Any:
    """--adapter: the adapter trained further, with the rank, targets and weights it was saved with."""
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, path, is_trainable=True)
    except (RuntimeError, ValueError, KeyError) as exc:  # shape mismatches and missing modules
        raise UsageError(f"--adapter {path}: does not fit the base model ({' '.join(str(exc).split())[:200]}); "
                         "pass the --base_model it was trained on") from None
    trainable, total = model.get_nb_trainable_parameters()
    log.info("continuing the LoRA adapter %s (r=%d; the --lora_* flags do not apply): %s trainable parameters",
             path, model.peft_config["default"].r, f"{trainable:,}")
    return model


@contextmanager
def training_only(model: Any, plan: StepPlan, precision: str, use_dora: bool,
                  cheaper_dropout: bool = False) -> Iterator[bool]:
    """The model's training-only settings, undone on leaving (also on failure) for code that keeps using the model:
    per-conversation sdpa in padding-free batches (it needs the collator's sequence boundaries), no fp32 copies of
    the adapter inputs under bf16/fp16 autocast, and with `cheaper_dropout` on CPU LoRA dropout drawn and kept the
    cheaper way (train/dropout.py; not for TRL's preference trainers, which switch nn.Dropout off themselves), and on
    CPU the gated MLPs' silu(gate) * up kept smaller (train/gated_mlp.py), and 4-bit weights never repacked for
    bitsandbytes' CPU inference kernel (keep_4bit_weights_unpacked).
    Yields whether sdpa runs per conversation."""
    per_sequence = plan.padding_free and attention.use_per_sequence_sdpa(model)
    undo = keep_4bit_weights_unpacked(model)
    if next(model.parameters()).device.type == "cpu":
        from .dropout import use_cheaper_lora_dropout
        from .gated_mlp import use_silu_product

        undo += use_silu_product(model)  # its check runs the MLPs: after the above, before the autocast settings
        if cheaper_dropout:
            undo += use_cheaper_lora_dropout(model, fuse=precision == "fp32")
    if precision in ("bf16", "fp16") and not use_dora:
        cast_adapter_inputs(model, False)
    try:
        yield per_sequence
    finally:
        attention.use_plain_sdpa(model)
        cast_adapter_inputs(model, True)
        for step in undo:  # closures: nothing is imported while the interpreter may be exiting
            step()


def keep_4bit_weights_unpacked(model: Any) -> list[Callable[[], None]]:
    """bitsandbytes repacks a 4-bit weight for its CPU inference kernel at the first eval-mode forward without
    gradients (CPUs with AVX512-BF16), for good, and that kernel has no backward: training after an evaluation gets
    wrong gradients (measured: LoRA gradients 17-47% off after one eval forward). Training keeps the weights as they
    are; returns the steps that undo it."""
    changed = [m for m in model.modules() if getattr(m, "support_avx512bf16_for_cpu", False)]
    for module in changed:
        module.support_avx512bf16_for_cpu = False
    return [lambda m=module: setattr(m, "support_avx512bf16_for_cpu", True) for module in changed]


def cast_adapter_inputs(model: Any, enabled: bool) -> None:
    """peft's copy of every LoRA input to the adapter weights' dtype (fp32). Under autocast the adapter matmuls run in
    bf16/fp16 whatever their input, and the copies kept for the backward are about a third of the activation memory:
    training_only turns them off for bf16/fp16 runs, and back on when training ends."""
    for module in model.modules():
        if hasattr(module, "cast_input_dtype_enabled"):
            module.cast_input_dtype_enabled = enabled
