"""Read what lora-train leaves in an adapter folder: the PEFT adapter, the run config and the tokenizer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import integrity, models
from .errors import UsageError
from .filenames import ADAPTER_CONFIG, ADAPTER_WEIGHTS, MODEL_CONFIG, RUN_CONFIG

# Initialisations that move part of the base weights into the adapter (peft's names; "pissa_niter_4" etc. too).
BASE_MODIFYING_INITS = ("pissa", "olora", "corda", "lora_ga")


@dataclass
class Adapter:
    path: Path
    peft_config: dict[str, Any]  # adapter_config.json as saved by peft
    run_config: dict[str, Any] | None  # run_config.yaml as saved by lora-train (None for adapters from elsewhere)

    @property
    def base_spec(self) -> str:
        """The base model as the user gave it to lora-train ("" = demo model), else what peft recorded."""
        if self.run_config is not None and "base_model" in self.run_config:
            return self.run_config["base_model"] or ""
        return self.peft_config.get("base_model_name_or_path") or ""

    @property
    def quantization(self) -> str | None:
        """'4bit' or '8bit' when the adapter was trained on a quantised base (QLoRA), else None."""
        quantization = (self.run_config or {}).get("quantization", "none")
        return None if quantization == "none" else quantization

    @property
    def eval_path(self) -> str:
        return (self.run_config or {}).get("eval_path") or ""

    @property
    def base_modifying_init(self) -> str | None:
        """The initialisation (pissa, olora, ...) of an adapter saved as trained on the base that initialisation
        modified (a lora-train checkpoint, an adapter from elsewhere): right only on that base, which peft rebuilds
        when it loads the adapter. None for plain LoRA, e.g. lora-train's final adapters, saved converted."""
        init = self.peft_config.get("init_lora_weights")
        return init if isinstance(init, str) and init.lower().startswith(BASE_MODIFYING_INITS) else None

    @property
    def has_tokenizer(self) -> bool:
        return (self.path / "tokenizer_config.json").is_file()


def read_adapter(path: str | Path, flag: str = "ADAPTER_DIR") -> Adapter:
    """The adapter at `path`, or a UsageError saying why that folder is not one."""
    import yaml

    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag} {path}: not found")
    if not p.is_dir():
        raise UsageError(f"{flag} {path}: not a folder")
    cfg_file = p / ADAPTER_CONFIG
    if not cfg_file.is_file():
        hint = " (it looks like a merged model: pass it as --base_model)" if (p / MODEL_CONFIG).is_file() else ""
        raise UsageError(f"{flag} {path}: no {ADAPTER_CONFIG}, not a LoRA adapter folder{hint}")
    if not (p / ADAPTER_WEIGHTS).is_file() and not (p / "adapter_model.bin").is_file():
        raise UsageError(f"{flag} {path}: {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}: the adapter is incomplete")
    check_intact(p, flag)
    try:
        peft_config = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {path}: {ADAPTER_CONFIG} is not valid JSON ({exc})") from None
    if peft_config.get("peft_type", "LORA") != "LORA":
        raise UsageError(f"{flag} {path}: a {peft_config.get('peft_type')} adapter; only LoRA adapters are supported")
    run_config = None
    run_file = p / RUN_CONFIG
    if run_file.is_file():
        from .config.runfile import upgrade

        run_config = upgrade(yaml.safe_load(run_file.read_text(encoding="utf-8")) or {})
    return Adapter(p, peft_config, run_config)


def check_intact(p: Path, flag: str) -> None:
    """The files lora-train recorded in the folder's marker (else the weight files' structure), before anything loads
    them: a cut copy or a failing disk ends in one line naming the file."""
    integrity.require_intact(p, flag, "copy the adapter again, or train it again",
                             names=[n for n in (ADAPTER_WEIGHTS, "adapter_model.bin") if (p / n).is_file()])


def resolve_base(adapter: Adapter, override: str | None = None) -> models.BaseModel:
    """The base model to apply the adapter to: `override` when given, else the one the adapter records."""
    spec = override if override is not None and override != "" else adapter.base_spec
    return models.resolve(spec)


def load_adapter_tokenizer(adapter: Adapter, base: models.BaseModel, trust_remote_code: bool = False) -> Any:
    """The tokenizer saved with the adapter (it carries the exact chat template trained with), else the base's."""
    if adapter.has_tokenizer:
        return models.load_tokenizer(models.BaseModel(str(adapter.path), str(adapter.path), "folder"),
                                     trust_remote_code)
    return models.load_tokenizer(base, trust_remote_code)


def load_adapter_weights(adapter: Adapter) -> dict[str, Any]:
    """The adapter's tensors as peft saved them (keys start with base_model.model.), on the CPU."""
    safetensors_file = adapter.path / ADAPTER_WEIGHTS
    if safetensors_file.is_file():
        from safetensors.torch import load_file

        return load_file(str(safetensors_file))
    import torch

    return torch.load(adapter.path / "adapter_model.bin", map_location="cpu", weights_only=True)
