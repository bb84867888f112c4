"""lora-merge's flags, and the checks on ADAPTER_DIR and OUT_DIR that need no model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import adapters
from ..config import opt, refine
from ..config.options import BaseModelOptions, RunOptions
from ..errors import UsageError
from ..filenames import ADAPTER_CONFIG, MERGE_REPORT, MODEL_CONFIG
from ..fsutil import existing_ancestor


# Bases are listed last-group-first: a dataclass takes the fields of its bases in reverse order.
@dataclass
class MergeConfig(BaseModelOptions, RunOptions):
    PROG = "lora-merge"
    DESCRIPTION = ("Merge a LoRA or QLoRA adapter into its base model and write a standalone model folder "
                   "(safetensors, config, generation config, and the tokenizer with the chat template used in "
                   "training) that loads without peft. The merge streams tensor by tensor, so memory stays near one "
                   "tensor; the result is then checked against base+adapter.")
    EPILOG = "Example: lora-merge runs/demo runs/demo-merged"
    GROUPS = {"io": "input and output", "model": "base model", "merge": "merge", "verify": "verification",
              "run": "run"}

    adapter_dir: str = opt("", "Adapter folder written by lora-train (or any peft LoRA adapter).", group="io",
                           metavar="ADAPTER_DIR", positional=True)
    out_dir: str = opt("", "Folder to write the merged model to; it must not exist unless --overwrite.", group="io",
                       metavar="OUT_DIR", positional=True)
    overwrite: bool = opt(False, "Replace an existing OUT_DIR that holds a model, once the new one is complete.",
                          group="io")
    base_model: str = refine(BaseModelOptions, "base_model", note="The model merged into ('demo': the embedded "
                                                                  "demo model). Empty: the base the adapter was "
                                                                  "trained on.")
    dtype: str = opt("auto", "Precision of the merged weights. auto: that of the base checkpoint.", group="merge",
                     choices=("auto", "bf16", "fp16", "fp32"))
    simulate_nf4: bool = opt(False, "QLoRA adapters: round the base weights through NF4 (as in the 4-bit base the "
                                    "adapter was trained against) before adding the adapter. Off: merge into the "
                                    "full-precision weights.", group="merge")
    verify: bool = opt(True, "Compare the merged model with base+adapter (peft) on a few prompts and exit 1 beyond "
                             "tolerance. Skipped with a warning when the model would not fit in memory.",
                       group="verify")

    def problems(self) -> list[str]:
        errors: list[str] = []
        adapter = None
        if not self.adapter_dir:
            errors.append("ADAPTER_DIR is required (the adapter folder lora-train wrote)")
        elif (Path(self.adapter_dir) / MODEL_CONFIG).is_file() and \
                not (Path(self.adapter_dir) / ADAPTER_CONFIG).is_file():
            errors.append(f"ADAPTER_DIR {self.adapter_dir}: a full model (config.json, no "
                          f"{ADAPTER_CONFIG}), already merged or never an adapter: nothing to merge")
        else:
            try:
                adapter = adapters.read_adapter(self.adapter_dir)
            except UsageError as exc:
                errors.append(str(exc))
        if not self.out_dir:
            errors.append("OUT_DIR is required (where the merged model is written)")
        else:
            errors += out_dir_problems(Path(self.out_dir), self.overwrite,
                                       [adapter.path] if adapter else [])
        if adapter is not None and self.simulate_nf4 and adapter.run_config is not None \
                and adapter.quantization != "4bit":
            errors.append(f"--simulate_nf4: {self.adapter_dir} was trained on a full-precision base (its run config "
                          "has no quantization 4bit), so there is no NF4 base to reproduce")
        return errors


def out_dir_problems(out: Path, overwrite: bool, protected: list[Path]) -> list[str]:
    """Why OUT_DIR cannot be written (or replaced); never lets --overwrite delete an input or a non-model folder."""
    if out.exists() and not out.is_dir():
        return [f"OUT_DIR {out}: exists and is not a folder"]
    for path in protected:
        if out.resolve() == path.resolve() or out.resolve() in path.resolve().parents:
            return [f"OUT_DIR {out}: would replace {path}, an input of this merge; choose another folder"]
    if not os.access(existing_ancestor(out), os.W_OK):
        return [f"OUT_DIR {out}: not writable"]
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if not overwrite:
        return [f"OUT_DIR {out}: already exists; pass --overwrite to replace it, or choose a new folder"]
    if not (out / MODEL_CONFIG).is_file() and not (out / MERGE_REPORT).is_file():
        return [f"OUT_DIR {out}: not a model folder (no config.json); --overwrite only replaces a model folder"]
    return []
