"""lora-export's flags, and the checks on MODEL_DIR and OUT that read files only (no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..chat import template_kwargs_problem
from ..config import opt
from ..config.options import RunOptions
from ..filenames import ADAPTER_CONFIG, MODEL_CONFIG, SAFETENSORS_INDEX, SAFETENSORS_WEIGHTS
from ..safetensors_io import has_safetensors
from .source import ARCHS, SUPPORTED

OUTTYPES = ("f16", "bf16", "q8_0", "q4_0", "f32")



@dataclass
class ExportConfig(RunOptions):
    PROG = "lora-export"
    DESCRIPTION = ("Convert a merged model folder (from lora-merge, or any Hugging Face Llama, Mistral, Qwen2 or "
                   "SmolLM model) to one GGUF file for llama.cpp, Ollama and LM Studio, with its tokenizer and chat "
                   "template; optionally write an Ollama Modelfile next to it. The file is then loaded back with "
                   "transformers and compared with the source model.")
    EPILOG = "Example: lora-export runs/demo-merged runs/demo.gguf --ollama"
    GROUPS = {"io": "input and output", "export": "export", "verify": "verification", "run": "run"}

    model_dir: str = opt("", "Model folder to convert (config.json, safetensors and tokenizer), e.g. what "
                             "lora-merge wrote.", group="io", metavar="MODEL_DIR", positional=True)
    out: str = opt("", "GGUF file to write (.gguf); it must not exist unless --overwrite.", group="io",
                   metavar="OUT", positional=True)
    overwrite: bool = opt(False, "Replace an existing OUT (and Modelfile), once the new one is complete.", group="io")
    outtype: str = opt("f16", "Weight type of the 2-D tensors: f16, bf16, q8_0 (8-bit, about half the size of f16), "
                              "q4_0 (4-bit, about a quarter) or f32; norms always stay f32.", group="export",
                       choices=OUTTYPES)
    ollama: bool = opt(False, "Also write an Ollama Modelfile next to OUT (OUT without .gguf, plus .Modelfile): "
                              "FROM, the chat template as a Go TEMPLATE, the default system prompt and the stop "
                              "tokens.", group="export")
    chat_template_kwargs: str = opt("", "Variables for the chat template as a JSON object, as given to lora-train "
                                        "(e.g. '{\"enable_thinking\": false}'): the Ollama TEMPLATE is derived "
                                        "from the template rendered with them.", group="export", metavar="JSON")
    verify: bool = opt(True, "Load OUT back with transformers and compare next-token logits and token ids with the "
                             "source model on chat-formatted prompts; exit 1 beyond tolerance. Skipped with a "
                             "warning when the model would not fit in memory.", group="verify")

    def problems(self) -> list[str]:
        errors = model_dir_problems(self.model_dir) if self.model_dir else \
            ["MODEL_DIR is required (a merged model folder, e.g. from lora-merge)"]
        if not self.out:
            errors.append("OUT is required (the .gguf file to write)")
        else:
            errors += out_problems(Path(self.out), self.overwrite, self.ollama)
        errors += [p for p in [template_kwargs_problem(self.chat_template_kwargs)] if p]
        return errors


def model_dir_problems(model_dir: str) -> list[str]:
    """Why MODEL_DIR cannot be exported, read from its files alone (no torch)."""
    folder = Path(model_dir)
    if not folder.exists():
        return [f"MODEL_DIR {model_dir}: not found"]
    if folder.is_file():
        if folder.suffix.lower() == ".gguf":
            return [f"MODEL_DIR {model_dir}: already a GGUF file; lora-export converts a Hugging Face model folder"]
        return [f"MODEL_DIR {model_dir}: a file, not a model folder"]
    if not (folder / MODEL_CONFIG).is_file():
        if (folder / ADAPTER_CONFIG).is_file():
            return [f"MODEL_DIR {model_dir}: a LoRA adapter, not a model; merge it first "
                    f"(lora-merge {model_dir} {folder.with_name(folder.name + '-merged')}) and export the merged "
                    "folder"]
        return [f"MODEL_DIR {model_dir}: no config.json, not a Hugging Face model folder"]
    try:
        config = json.loads((folder / MODEL_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return [f"MODEL_DIR {model_dir}: config.json cannot be read ({exc})"]
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type not in ARCHS:
        return [f"MODEL_DIR {model_dir}: architecture {model_type!r} is not supported; lora-export supports "
                f"{SUPPORTED}"]
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantised")
        return [f"MODEL_DIR {model_dir}: a pre-quantised ({method}) checkpoint; export the full-precision model"]
    if not has_safetensors(folder):
        return [f"MODEL_DIR {model_dir}: no safetensors weights ({SAFETENSORS_WEIGHTS} or {SAFETENSORS_INDEX}); save "
                "the model with save_pretrained() first"]
    return []


def modelfile_path(out: Path) -> Path:
    return out.with_suffix(".Modelfile")


def out_problems(out: Path, overwrite: bool, ollama: bool) -> list[str]:
    if out.suffix.lower() != ".gguf":
        return [f"OUT {out}: must end in .gguf"]
    if out.is_dir():
        return [f"OUT {out}: is a folder; give the file name to write, ending in .gguf"]
    errors = []
    for path in [out] + ([modelfile_path(out)] if ollama else []):
        if path.exists() and not overwrite:
            errors.append(f"{'OUT' if path == out else 'Modelfile'} {path}: already exists; pass --overwrite to "
                          "replace it, or choose another name")
    return errors
