"""lora-merge: fold a LoRA/QLoRA adapter into its base model, tensor by tensor, and check the result matches.

The streaming path reads the base's safetensors one tensor at a time and writes each output shard as it goes, so peak
memory is about the largest tensor plus the adapter, whatever the model's size. peft's merge_and_unload() (whole model
in memory) is used only where the streaming path cannot map the adapter onto the checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import adapters, chat, data, models
from .adapters import Adapter
from .config import opt
from .errors import DataError, RunFailure, UsageError

log = logging.getLogger("lora_cli")

REPORT = "merge_report.json"
INDEX = "model.safetensors.index.json"
PEFT_PREFIX = "base_model.model."
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# The merged weights are evaluated in fp32, so the gates measure the merge plus the rounding of storing the weights
# in --dtype (compute precision is the deployment's choice). fp32 leaves summation-order noise only (about 1e-4 on
# the demo model). Rounding every weight to bf16 moves the demo's logits by up to 1.3 and its mean KL to 6e-4, about
# what a 10% error in the LoRA scale does; a missing adapter or a halved scale gives mean KL near 0.1.
TOLERANCES = {"fp32": {"max_abs_logit_diff": 1e-3, "mean_kl": 1e-6},
              "fp16": {"max_abs_logit_diff": 0.5, "mean_kl": 1e-4},
              "bf16": {"max_abs_logit_diff": 4.0, "mean_kl": 5e-3}}
N_PROMPTS = 4
MAX_NEW_TOKENS = 32
BUILTIN_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain what a hash table is in one sentence."},
     {"role": "assistant", "content": "A hash table stores values under keys and finds them by hashing the key."}],
    [{"role": "user", "content": "Write a haiku about autumn."},
     {"role": "assistant", "content": "Red leaves drift and fall,\ncool wind hums through bare trees,\n"
                                      "the year exhales slow."}],
    [{"role": "user", "content": "List three prime numbers."},
     {"role": "assistant", "content": "2, 3 and 5."}],
]
# peft features whose merge the streaming path does not reimplement: peft's own merge handles them.
PEFT_ONLY_FEATURES = ("layer_replication", "target_parameters", "trainable_token_indices", "use_qalora",
                      "use_bdlora", "arrow_config")


@dataclass
class MergeConfig:
    PROG = "lora-merge"
    DESCRIPTION = ("Merge a LoRA or QLoRA adapter into its base model and write a standalone model folder "
                   "(safetensors, config, generation config, and the tokenizer with the chat template used in "
                   "training) that loads without peft. The merge streams tensor by tensor, so memory stays near one "
                   "tensor; the result is then checked against base+adapter.")
    EPILOG = "Example: lora-merge runs/demo runs/demo-merged"
    GROUPS = {"io": "input and output", "merge": "merge", "verify": "verification", "run": "run"}

    adapter_dir: str = opt("", "Adapter folder written by lora-train (or any peft LoRA adapter).", group="io",
                           metavar="ADAPTER_DIR", positional=True)
    out_dir: str = opt("", "Folder to write the merged model to; it must not exist unless --overwrite.", group="io",
                       metavar="OUT_DIR", positional=True)
    overwrite: bool = opt(False, "Replace an existing OUT_DIR that holds a model, once the new one is complete.",
                          group="io")
    base_model: str = opt("", "Base model to merge into: a Hub id, a local Hugging Face folder, a .gguf file or "
                              "'demo'. Empty: the base the adapter was trained on.", group="merge", metavar="MODEL")
    dtype: str = opt("auto", "Precision of the merged weights. auto: that of the base checkpoint.", group="merge",
                     choices=("auto", "bf16", "fp16", "fp32"))
    simulate_nf4: bool = opt(False, "QLoRA adapters: round the base weights through NF4 (as in the 4-bit base the "
                                    "adapter was trained against) before adding the adapter. Off: merge into the "
                                    "full-precision weights.", group="merge")
    trust_remote_code: bool = opt(False, "Run model code shipped with the base model repository.", group="merge")
    verify: bool = opt(True, "Compare the merged model with base+adapter (peft) on a few prompts and exit 1 beyond "
                             "tolerance. Skipped with a warning when the model would not fit in memory.",
                       group="verify")
    debug: bool = opt(False, "Show full tracebacks and library warnings.", group="run")

    def problems(self) -> list[str]:
        errors: list[str] = []
        adapter = None
        if not self.adapter_dir:
            errors.append("ADAPTER_DIR is required (the adapter folder lora-train wrote)")
        elif (Path(self.adapter_dir) / "config.json").is_file() and \
                not (Path(self.adapter_dir) / adapters.ADAPTER_CONFIG).is_file():
            errors.append(f"ADAPTER_DIR {self.adapter_dir}: a full model (config.json, no "
                          f"{adapters.ADAPTER_CONFIG}), already merged or never an adapter: nothing to merge")
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
                          "has no load_in_4bit), so there is no NF4 base to reproduce")
        return errors


def out_dir_problems(out: Path, overwrite: bool, protected: list[Path]) -> list[str]:
    """Why OUT_DIR cannot be written (or replaced); never lets --overwrite delete an input or a non-model folder."""
    if out.exists() and not out.is_dir():
        return [f"OUT_DIR {out}: exists and is not a folder"]
    for path in protected:
        if out.resolve() == path.resolve() or out.resolve() in path.resolve().parents:
            return [f"OUT_DIR {out}: would replace {path}, an input of this merge; choose another folder"]
    if not os.access(_existing_ancestor(out), os.W_OK):
        return [f"OUT_DIR {out}: not writable"]
    if not out.is_dir() or not any(out.iterdir()):
        return []
    if not overwrite:
        return [f"OUT_DIR {out}: already exists; pass --overwrite to replace it, or choose a new folder"]
    if not (out / "config.json").is_file() and not (out / REPORT).is_file():
        return [f"OUT_DIR {out}: not a model folder (no config.json); --overwrite only replaces a model folder"]
    return []


def _existing_ancestor(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path if path.is_dir() else path.parent


# --- reading and writing safetensors with plain file reads/writes -------------------------------------------------
# safetensors' own API maps whole files and serialises whole shards in memory; these stream one tensor at a time.

_ST_CODES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
             "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "U16": "uint16",
             "U32": "uint32", "U64": "uint64", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}


def _torch_dtype(code: str) -> Any:
    import torch

    name = _ST_CODES.get(code)
    if name is None or not hasattr(torch, name):
        raise UsageError(f"safetensors dtype {code} is not supported by this merge")
    return getattr(torch, name)


def _st_code(dtype: Any) -> str:
    name = str(dtype).removeprefix("torch.")
    return next(code for code, n in _ST_CODES.items() if n == name)


class SafetensorsFile:
    """One .safetensors file: its header, and tensors read one at a time (no memory map)."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        header.pop("__metadata__", None)
        self.entries: dict[str, dict] = header  # name -> dtype, shape, data_offsets
        self.data_start = 8 + size
        self._file = None

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> Any:
        return _torch_dtype(self.entries[name]["dtype"])

    def nbytes(self, name: str) -> int:
        begin, end = self.entries[name]["data_offsets"]
        return end - begin

    def read(self, name: str) -> Any:
        import torch

        begin, end = self.entries[name]["data_offsets"]
        dtype, shape = self.dtype(name), self.shape(name)
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        if self._file is None:
            self._file = open(self.path, "rb")
        self._file.seek(self.data_start + begin)
        buffer = bytearray(end - begin)
        if self._file.readinto(buffer) != len(buffer):
            raise RunFailure(f"{self.path}: truncated file (tensor {name} is cut short)")
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_safetensors(path: Path, entries: list[tuple[str, tuple, Any]], produce) -> int:
    """Write tensors (name, shape, dtype) that `produce(name)` builds one at a time; returns the bytes of data."""
    import torch

    # Larger items first keeps every tensor aligned to its item size, as safetensors itself orders them.
    ordered = sorted(entries, key=lambda e: (-e[2].itemsize, e[0]))
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape, dtype in ordered:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": _st_code(dtype), "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype in ordered:
            tensor = produce(name)
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                raise RunFailure(f"internal error: {name} came out {tuple(tensor.shape)} {tensor.dtype}, planned "
                                 f"{tuple(shape)} {dtype}")
            if tensor.numel():
                f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().data)
            del tensor
    return offset


@dataclass
class Checkpoint:
    """The base model's safetensors shards, their tensor names, shapes and dtypes."""

    folder: Path
    files: list[SafetensorsFile]
    where: dict[str, SafetensorsFile]

    @classmethod
    def open(cls, folder: Path) -> Checkpoint | None:
        """None when the folder has no safetensors weights (e.g. only pytorch_model.bin)."""
        index = folder / INDEX
        if index.is_file():
            names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        elif (folder / "model.safetensors").is_file():
            names = ["model.safetensors"]
        else:
            return None
        missing = [n for n in names if not (folder / n).is_file()]
        if missing:
            raise UsageError(f"--base_model {folder}: shard {missing[0]} listed in {INDEX} is missing")
        files = [SafetensorsFile(folder / n) for n in names]
        return cls(folder, files, {name: f for f in files for name in f.entries})

    def close(self) -> None:
        for f in self.files:
            f.close()


# --- the adapter as tensors to add ----------------------------------------------------------------------------------

@dataclass
class LoraModule:
    name: str  # module path in the base model, e.g. model.layers.0.self_attn.q_proj
    A: Any = None  # (r, in) for Linear; (r, num_embeddings) for Embedding
    B: Any = None  # (out, r); (embedding_dim, r)
    scale: float = 1.0
    kind: str = "linear"  # linear | embedding
    bias: Any = None  # lora_B bias (lora_bias=True), added to the base bias
    magnitude: Any = None  # DoRA magnitude vector, one value per output row
    transpose: bool = False  # Conv1D (GPT-2 style) stores its weight as (in, out)

    def delta_shape(self) -> tuple[int, int]:
        """The shape of the base weight this module's delta has (before any Conv1D transpose)."""
        if self.kind == "embedding":
            return self.A.shape[1], self.B.shape[0]
        return self.B.shape[0], self.A.shape[1]


@dataclass
class AdapterTensors:
    modules: dict[str, LoraModule]  # by module name
    replacements: dict[str, Any]  # base tensor name -> tensor saved whole with the adapter (modules_to_save)
    unsupported: list[str]  # adapter keys the streaming merge does not apply

    @property
    def touched(self) -> set[str]:
        """Base tensor names the adapter changes."""
        names = set(self.replacements)
        for m in self.modules.values():
            names.add(f"{m.name}.weight")
            if m.bias is not None:
                names.add(f"{m.name}.bias")
        return names


_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|lora_embedding_A|"
                       r"lora_embedding_B|lora_magnitude_vector(?:\.weight)?)$")
_BASE_LAYER_KEY = re.compile(r"^(?P<module>.+)\.base_layer\.(?P<param>weight|bias)$")


def parse_adapter(adapter: Adapter, weights: dict[str, Any]) -> AdapterTensors:
    """Group peft's saved tensors by module and work out each module's scale (alpha / r, or / sqrt(r) for rsLoRA)."""
    cfg = adapter.peft_config
    modules: dict[str, LoraModule] = {}
    replacements: dict[str, Any] = {}
    unsupported: list[str] = []
    for key, tensor in weights.items():
        name = key.removeprefix(PEFT_PREFIX)
        lora, base_layer = _LORA_KEY.match(name), _BASE_LAYER_KEY.match(name)
        if lora:
            m = modules.setdefault(lora["module"], LoraModule(lora["module"]))
            part = lora["part"]
            if part.startswith("lora_magnitude_vector"):
                m.magnitude = tensor
            elif part == "lora_B.bias":
                m.bias = tensor
            else:
                setattr(m, "A" if part in ("lora_A.weight", "lora_embedding_A") else "B", tensor)
                if part.startswith("lora_embedding"):
                    m.kind = "embedding"
        elif base_layer:
            # peft saves an embedding's base weight next to its LoRA; loading the adapter puts it in the base.
            replacements[f"{base_layer['module']}.{base_layer['param']}"] = tensor
        elif "lora_" in name or "token_adapter" in name or "trainable_tokens" in name:
            unsupported.append(key)
        else:  # modules_to_save: the trained copy of a whole module
            replacements[name] = tensor
    for m in list(modules.values()):
        if m.A is None or m.B is None or m.A.dim() != 2:
            unsupported.append(f"{m.name} (LoRA on a layer that is not Linear or Embedding)")
            del modules[m.name]
            continue
        r = m.A.shape[0]
        alpha = _pattern_value(cfg.get("alpha_pattern") or {}, m.name, cfg.get("lora_alpha", 8))
        m.scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    return AdapterTensors(modules, replacements, unsupported)


def _pattern_value(patterns: dict[str, Any], name: str, default: Any) -> Any:
    """peft's rank/alpha patterns: a key matches a module name at a dot boundary, as a regular expression."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


# --- planning -------------------------------------------------------------------------------------------------------

@dataclass
class Plan:
    streaming: bool
    reason: str = ""  # why peft's merge is used instead of streaming
    weights: dict[str, LoraModule] = field(default_factory=dict)  # base weight name -> its LoRA
    biases: dict[str, LoraModule] = field(default_factory=dict)  # base bias name -> its LoRA (lora_bias)
    replacements: dict[str, Any] = field(default_factory=dict)
    untie: dict[str, str] = field(default_factory=dict)  # tied name -> source, when the adapter splits the pair
    nf4: set[str] = field(default_factory=set)  # base weights rounded through NF4 (--simulate_nf4)


def plan_merge(adapter: Adapter, parsed: AdapterTensors, ckpt: Checkpoint | None, skeleton: Any,
               simulate_nf4: bool) -> Plan:
    """Map every adapter tensor onto a base tensor, check shapes, and decide between streaming and peft's merge.

    Adapter modules that the base model does not have, and shapes that differ, are errors (exit 2)."""
    modules = dict(skeleton.named_modules())
    unknown = [m for m in parsed.modules if m not in modules]
    unknown += [n for n in parsed.replacements if n.rsplit(".", 1)[0] not in modules]
    if unknown:
        raise UsageError(f"ADAPTER_DIR {adapter.path}: {len(unknown)} adapter module(s) match nothing in the base "
                         f"model (e.g. {unknown[0]}): it was trained on another model; pass that one as --base_model")
    _set_layer_kinds(parsed, modules)
    _check_shapes(adapter, parsed, skeleton)
    tied = dict(getattr(skeleton, "all_tied_weights_keys", None) or {})
    touched = parsed.touched
    untie = {t: s for t, s in tied.items() if t in touched or s in touched}
    nf4 = {f"{name}.weight" for name in nf4_module_names(skeleton)} if simulate_nf4 else set()
    plan = Plan(streaming=True, untie=untie, nf4=nf4, replacements=parsed.replacements)
    for m in parsed.modules.values():
        plan.weights[f"{m.name}.weight"] = m
        if m.bias is not None:
            plan.biases[f"{m.name}.bias"] = m
    plan.reason = _streaming_obstacle(adapter, parsed, ckpt, plan, tied)
    plan.streaming = not plan.reason
    return plan


def _check_shapes(adapter: Adapter, parsed: AdapterTensors, skeleton: Any) -> None:
    params = dict(skeleton.named_parameters(remove_duplicate=False))
    wrong = []
    for m in parsed.modules.values():
        weight = params.get(f"{m.name}.weight")
        if weight is None:
            continue
        expected = tuple(weight.shape)
        got = m.delta_shape()[::-1] if m.transpose else m.delta_shape()
        if expected != got or m.A.shape[0] != m.B.shape[1]:
            wrong.append(f"{m.name}: base weight {list(expected)}, adapter "
                         f"A {list(m.A.shape)} B {list(m.B.shape)}")
        elif m.bias is not None and params.get(f"{m.name}.bias") is None:
            raise UsageError(f"ADAPTER_DIR {adapter.path}: {m.name} has a LoRA bias (lora_bias) but the base layer "
                             "has no bias to merge it into")
    for name, tensor in parsed.replacements.items():
        if name in params and tuple(params[name].shape) != tuple(tensor.shape):
            wrong.append(f"{name}: base {list(params[name].shape)}, adapter {list(tensor.shape)}")
    if wrong:
        raise UsageError(f"ADAPTER_DIR {adapter.path}: shapes differ from the base model in {len(wrong)} place(s), "
                         f"e.g. {wrong[0]}: the adapter was trained on another model; pass that one as --base_model")


def _set_layer_kinds(parsed: AdapterTensors, modules: dict[str, Any]) -> None:
    """Note Conv1D layers (weights stored transposed); LoRA on other layer types is left to peft's merge."""
    import torch
    from transformers.pytorch_utils import Conv1D

    for m in list(parsed.modules.values()):
        layer = modules[m.name]
        if isinstance(layer, Conv1D):
            m.transpose = True  # peft sets fan_in_fan_out for these whatever the config says
        elif isinstance(layer, torch.nn.Embedding) != (m.kind == "embedding") or \
                not isinstance(layer, (torch.nn.Linear, torch.nn.Embedding)):
            parsed.unsupported.append(f"{m.name} (LoRA on a {type(layer).__name__} layer)")
            del parsed.modules[m.name]


def _streaming_obstacle(adapter: Adapter, parsed: AdapterTensors, ckpt: Checkpoint | None, plan: Plan,
                        tied: dict[str, str]) -> str:
    """Why the streaming merge cannot apply (empty when it can)."""
    if ckpt is None:
        return "the base has no safetensors weights"
    features = [f for f in PEFT_ONLY_FEATURES if adapter.peft_config.get(f)]
    if features:
        return f"the adapter uses {', '.join(features)}"
    if parsed.unsupported:
        return f"the adapter has parts only peft can merge ({parsed.unsupported[0]})"
    if any(m.magnitude is not None and m.kind == "embedding" for m in parsed.modules.values()):
        return "the adapter uses DoRA on an embedding"
    needed = set(plan.weights) | set(plan.biases) | set(plan.replacements) | set(plan.nf4)
    absent = sorted(n for n in needed if n not in ckpt.where and not (n in tied and tied[n] in ckpt.where))
    if absent:
        return f"the checkpoint's tensor names differ from the model's (no {absent[0]})"
    return ""


def nf4_module_names(skeleton: Any) -> set[str]:
    """The modules transformers loads as 4-bit layers for QLoRA: plain Linear (and Conv1D) layers outside its skip
    list (output embeddings, tied weights, modules the model keeps in fp32)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    try:
        from transformers.quantizers.base import HfQuantizer
        from transformers.quantizers.quantizers_utils import should_convert_module

        skip = HfQuantizer.get_modules_to_not_convert(skeleton, None, skeleton._keep_in_fp32_modules)
    except (ImportError, AttributeError):  # older/newer transformers: the output embeddings are the known skip
        output = skeleton.get_output_embeddings()
        skip = [name for name, module in skeleton.named_modules() if module is output]

        def should_convert_module(name: str, patterns: list[str]) -> bool:
            return not any(name == p or name.endswith("." + p) for p in patterns)
    return {name for name, module in skeleton.named_modules()
            if (type(module) is torch.nn.Linear or isinstance(module, Conv1D)) and should_convert_module(name, skip)}


# --- the arithmetic -------------------------------------------------------------------------------------------------

def nf4_round_trip(weight: Any) -> Any:
    """The weight as QLoRA training saw it: NF4, blocksize 64, double-quantised statistics, dequantised to fp32."""
    import bitsandbytes.functional as bnbf
    import torch

    packed, state = bnbf.quantize_4bit(weight.to(torch.float32).contiguous(), blocksize=64,
                                       compress_statistics=True, quant_type="nf4")
    return bnbf.dequantize_4bit(packed, state).reshape(weight.shape).to(torch.float32)


def merged_weight(weight: Any, m: LoraModule) -> Any:
    """W + scale * B @ A in fp32 (transposed for embeddings and Conv1D); DoRA rescales each output row to its
    learnt magnitude, exactly as the adapter computes it."""
    import torch

    merged = (m.B.to(torch.float32) @ m.A.to(torch.float32)).mul_(m.scale)
    if m.kind == "embedding":
        merged = merged.T
    if m.transpose:
        merged = merged.T
    merged += weight  # in place on the delta: one full-size temporary instead of two
    if m.magnitude is not None:
        rows = merged.T if m.transpose else merged  # (out, in)
        rows *= (m.magnitude.to(torch.float32) / torch.linalg.norm(rows, dim=1)).unsqueeze(1)
    return merged


def produce_tensor(name: str, ckpt: Checkpoint, plan: Plan, out_dtype: Any) -> Any:
    """One output tensor: the base tensor (or the adapter's replacement), NF4-rounded if asked, plus its LoRA."""
    import torch

    if name in plan.replacements:
        tensor = plan.replacements[name]
    else:  # an untied output embedding absent from the checkpoint starts from the weight it was tied to
        source = name if name in ckpt.where else plan.untie[name]
        tensor = ckpt.where[source].read(source)
    if name in plan.nf4:
        tensor = nf4_round_trip(tensor)
    if name in plan.weights:
        tensor = merged_weight(tensor, plan.weights[name])
    elif name in plan.biases:
        m = plan.biases[name]
        tensor = tensor.to(torch.float32) + m.scale * m.bias.to(torch.float32)
    narrowed = out_dtype == torch.float16 and tensor.dtype != torch.float16
    result = tensor.to(out_dtype)
    if (narrowed or name in plan.weights or name in plan.biases) and not torch.isfinite(result).all():
        raise RunFailure(f"{name}: the merged weight has values beyond fp16's range; use --dtype bf16 or fp32"
                         if narrowed else f"{name}: the merged weight has NaN or infinite values; the adapter is "
                                          "broken (check its training loss)")
    return result


# --- writing --------------------------------------------------------------------------------------------------------

def output_dtype(requested: str, source: Any) -> Any:
    """--dtype for floating tensors; integer buffers and auto keep the checkpoint's own dtype."""
    if requested == "auto" or not source.is_floating_point:
        return source
    return models.torch_dtype(requested)


def write_streamed(ckpt: Checkpoint, plan: Plan, dtype: str, out: Path) -> list[str]:
    """Merge shard by shard into `out`, mirroring the base's sharding; returns the shard file names."""
    names = [f.path.name for f in ckpt.files]
    extra = {t: ckpt.where[s] for t, s in plan.untie.items() if t not in ckpt.where}
    weight_map: dict[str, str] = {}
    total = 0
    for i, shard in enumerate(ckpt.files):
        keys = list(shard.entries) + [t for t, f in extra.items() if f is shard]  # untied: next to their source
        entries = []
        for key in keys:
            src = key if key in shard.entries else plan.untie[key]
            entries.append((key, shard.shape(src), output_dtype(dtype, shard.dtype(src))))
        planned = {key: d for key, _, d in entries}
        total += write_safetensors(out / names[i], entries,
                                   lambda key: produce_tensor(key, ckpt, plan, planned[key]))
        shard.close()
        weight_map.update({key: names[i] for key in keys})
        if len(names) > 1:
            log.info("merged shard %d/%d (%s)", i + 1, len(names), names[i])
    if len(names) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return names


def write_with_peft(adapter: Adapter, base: models.BaseModel, plan: Plan, dtype: str, trust_remote_code: bool,
                    out: Path) -> list[str]:
    """peft's merge_and_unload() on the whole model in memory, untying embeddings the adapter splits first (peft
    would otherwise merge one side of a tied pair into both)."""
    from peft import PeftModel

    model = models.load_model(base, precision="fp32", trust_remote_code=trust_remote_code)
    if plan.nf4:
        round_trip_in_place(model, {n.removesuffix(".weight") for n in plan.nf4})
    if plan.untie:
        untie_in_place(model)
    merged = PeftModel.from_pretrained(model, str(adapter.path)).merge_and_unload(safe_merge=True)
    merged = merged.to(models.torch_dtype(dtype))
    merged.save_pretrained(out, max_shard_size="5GB")
    for name in ("config.json", "generation_config.json"):
        (out / name).unlink(missing_ok=True)  # rewritten from the base's own files below, as for streaming
    del merged, model
    gc.collect()
    return sorted(p.name for p in out.glob("*.safetensors"))


def round_trip_in_place(model: Any, names: set[str]) -> None:
    import torch

    with torch.no_grad():
        for name, module in model.named_modules():
            if name in names:
                module.weight.data = nf4_round_trip(module.weight.data).to(module.weight.dtype)


def untie_in_place(model: Any) -> None:
    import torch

    output = model.get_output_embeddings()
    output.weight = torch.nn.Parameter(output.weight.detach().clone(), requires_grad=False)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False


def write_config(folder: Path, out: Path, dtype: str, untied: bool) -> dict[str, Any]:
    """The base's config.json with the merged dtype and tying; nothing about peft or quantisation."""
    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    cfg.pop("quantization_config", None)
    if dtype != "auto":
        for key in ("dtype", "torch_dtype"):
            if key in cfg or key == "dtype":
                cfg[key] = DTYPE_NAMES[dtype]
    if untied:
        cfg["tie_word_embeddings"] = False
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for code in folder.glob("*.py"):  # models with their own code need it next to the weights
        shutil.copy2(code, out / code.name)
    return cfg


def write_tokenizer_and_generation(adapter: Adapter, base: models.BaseModel, folder: Path, out: Path,
                                   trust_remote_code: bool) -> tuple[Any, list[int]]:
    """The adapter's tokenizer (its chat template is the one trained with) and a generation config whose EOS
    includes the template's end-of-turn token, so generation stops where training taught it to."""
    from transformers import GenerationConfig

    tokenizer = adapters.load_adapter_tokenizer(adapter, base, trust_remote_code)
    tokenizer.save_pretrained(out)
    if (folder / "generation_config.json").is_file():
        generation = GenerationConfig.from_pretrained(folder)
    else:
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        generation = GenerationConfig(**{k: cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                                         if cfg.get(k) is not None})
    eos = generation.eos_token_id
    eos_ids = list(dict.fromkeys([*(eos if isinstance(eos, list) else [eos] if eos is not None else []),
                                  *chat.end_of_turn_ids(tokenizer)]))
    generation.eos_token_id = eos_ids[0] if len(eos_ids) == 1 else eos_ids
    if generation.pad_token_id is None:
        generation.pad_token_id = tokenizer.pad_token_id
    generation.save_pretrained(out)
    return tokenizer, eos_ids


# --- the command ----------------------------------------------------------------------------------------------------

@dataclass
class Job:
    """Everything known before any weight is written: fast to build, so bad input fails in seconds."""

    adapter: Adapter
    base: models.BaseModel
    folder: Path  # local folder with the base's config and weights
    ckpt: Checkpoint | None  # None: no safetensors (peft's merge loads the model instead)
    dtype: str  # fp32 | bf16 | fp16: --dtype, or what auto resolves to
    parsed: AdapterTensors
    plan: Plan
    model_bytes: int  # the base in fp32


def prepare(cfg: MergeConfig) -> Job:
    adapter = adapters.read_adapter(cfg.adapter_dir)
    base = models.resolve("") if cfg.base_model == "demo" else adapters.resolve_base(adapter, cfg.base_model)
    folder = models.local_folder(base)
    problems = out_dir_problems(Path(cfg.out_dir), cfg.overwrite, [adapter.path, folder])
    if problems:
        raise UsageError(problems[0])
    base_config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if base_config.get("quantization_config"):
        method = base_config["quantization_config"].get("quant_method", "quantised")
        raise UsageError(f"--base_model {base.display}: a pre-quantised ({method}) checkpoint; merging needs the "
                         "full-precision weights: pass the original model as --base_model")
    ckpt = Checkpoint.open(folder)
    skeleton = build_skeleton(base, folder, cfg.trust_remote_code)
    parsed = parse_adapter(adapter, adapters.load_adapter_weights(adapter))
    plan = plan_merge(adapter, parsed, ckpt, skeleton, cfg.simulate_nf4)
    return Job(adapter, base, folder, ckpt, resolve_dtype(cfg.dtype, ckpt, base_config), parsed, plan,
               sum(p.numel() for p in skeleton.parameters()) * 4)


def merge(cfg: MergeConfig) -> dict[str, Any]:
    """Merge into a temporary folder next to OUT_DIR, verify, and move it into place whole. Returns the report;
    raises RunFailure (after writing OUT_DIR and its report) when verification fails."""
    start = time.perf_counter()
    job = prepare(cfg)
    out = Path(cfg.out_dir)
    _log_start(job, cfg)
    check_disk_space(out, job.ckpt, cfg.dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the model folder gets the usual permissions
    try:
        report = write_model(cfg, job, tmp)
        report["seconds"] = round(time.perf_counter() - start, 1)
        (tmp / REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        replace_folder(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if job.ckpt is not None:
            job.ckpt.close()
    log.info(summary_line(report, out))
    verification = report["verification"]
    if not verification.get("skipped") and not verification["passed"]:
        raise RunFailure(f"verification failed: the merged model differs from base+adapter beyond tolerance "
                         f"(details in {out / REPORT})")
    return report


def write_model(cfg: MergeConfig, job: Job, tmp: Path) -> dict[str, Any]:
    """Weights, config, tokenizer and generation config into `tmp`, then the verification; returns the report."""
    if job.plan.streaming:
        shards = write_streamed(job.ckpt, job.plan, cfg.dtype, tmp)
    else:
        log.info("merging with peft's merge_and_unload(), whole model in memory: %s", job.plan.reason)
        shards = write_with_peft(job.adapter, job.base, job.plan, job.dtype, cfg.trust_remote_code, tmp)
    write_config(job.folder, tmp, cfg.dtype, untied=bool(job.plan.untie))
    tokenizer, eos_ids = write_tokenizer_and_generation(job.adapter, job.base, job.folder, tmp,
                                                        cfg.trust_remote_code)
    report = build_report(cfg, job, tmp, shards)
    if not cfg.verify:
        report["verification"] = {"skipped": "--no-verify"}
    elif not fits_in_memory(job.model_bytes):
        reason = f"the model needs about {job.model_bytes * 1.5 / 2**30:.1f} GiB to verify, more than is available"
        log.warning("verification skipped: %s", reason)
        report["verification"] = {"skipped": reason}
    else:
        report["verification"] = verify(job, tmp, tokenizer, eos_ids, cfg.trust_remote_code)
    return report


def resolve_dtype(requested: str, ckpt: Checkpoint | None, base_config: dict[str, Any]) -> str:
    """--dtype, or for auto the dtype most of the base's floating weights are stored in."""
    if requested != "auto":
        return requested
    stored = base_config.get("dtype") or base_config.get("torch_dtype") or "float32"
    if ckpt is not None:
        sizes: dict[str, int] = {}
        for f in ckpt.files:
            for name in f.entries:
                if f.dtype(name).is_floating_point:
                    key = str(f.dtype(name)).removeprefix("torch.")
                    sizes[key] = sizes.get(key, 0) + f.nbytes(name)
        stored = max(sizes, key=sizes.get) if sizes else stored
    return {v: k for k, v in DTYPE_NAMES.items()}.get(stored, "fp32")


def build_skeleton(base: models.BaseModel, folder: Path, trust_remote_code: bool) -> Any:
    """The base model's modules with no memory behind them (meta device): names, layer types, tied weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    except Exception as exc:  # unknown architectures and remote-code refusals raise several types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        hint = "" if trust_remote_code else "; if the model ships its own code, pass --trust_remote_code"
        raise UsageError(f"--base_model {base.display}: transformers cannot build this model ({first}){hint}") \
            from None


def check_disk_space(out: Path, ckpt: Checkpoint | None, dtype: str) -> None:
    """Fail before writing anything when the merged shards cannot fit on OUT_DIR's disk."""
    if ckpt is None:
        return
    need = 0
    for f in ckpt.files:
        for name in f.entries:
            source = f.dtype(name)
            need += f.nbytes(name) // source.itemsize * output_dtype(dtype, source).itemsize
    free = shutil.disk_usage(_existing_ancestor(out)).free
    if free < need * 1.05:
        raise RunFailure(f"OUT_DIR {out}: the merged model needs about {need / 2**30:.2f} GiB, only "
                         f"{free / 2**30:.2f} GiB free on that disk")


def fits_in_memory(model_bytes: int) -> bool:
    """Verification holds one fp32 model at a time, plus activations."""
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            available = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return True  # not Linux: try, as the user asked
    return model_bytes * 1.5 < available


def replace_folder(tmp: Path, out: Path) -> None:
    """Move the complete model into place; an existing OUT_DIR (checked to be a model) goes only after that."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rename(out, old / out.name)
    try:
        os.rename(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old / out.name, out)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _log_start(job: Job, cfg: MergeConfig) -> None:
    pc, adapter = job.adapter.peft_config, job.adapter
    scaling = "rsLoRA alpha/sqrt(r)" if pc.get("use_rslora") else "alpha/r"
    extras = "".join(f", {e}" for e, on in (("DoRA", pc.get("use_dora")), (
        f"{len(job.parsed.replacements)} whole tensor(s) saved with it", job.parsed.replacements)) if on)
    log.info("adapter %s: LoRA r=%s alpha=%s (%s) on %d modules%s; base %s", adapter.path, pc.get("r"),
             pc.get("lora_alpha"), scaling, len(job.parsed.modules), extras, job.base.display)
    if adapter.quantization == "4bit" and cfg.simulate_nf4:
        log.info("QLoRA adapter (trained on a 4-bit NF4 base): merging into the NF4-rounded base weights "
                 "(--simulate_nf4), the base it was trained against")
    elif adapter.quantization:
        log.info("QLoRA adapter (trained on a %s base): merging into the full-precision base weights%s",
                 "4-bit NF4" if adapter.quantization == "4bit" else "8-bit",
                 "; --simulate_nf4 merges into the NF4-rounded weights it was trained against instead"
                 if adapter.quantization == "4bit" else "")
    if job.plan.untie:
        log.info("the adapter changes one side of tied weights (%s): writing them untied",
                 ", ".join(f"{t} = {s}" for t, s in job.plan.untie.items()))
    if job.base.kind == "gguf":
        log.info("GGUF base: merging into its dequantised weights (%s), which lora-train trains on",
                 job.base.path)


def build_report(cfg: MergeConfig, job: Job, out: Path, shards: list[str]) -> dict[str, Any]:
    adapter, base, parsed, plan, dtype = job.adapter, job.base, job.parsed, job.plan, job.dtype
    pc = adapter.peft_config
    return {
        "adapter": str(adapter.path),
        "base_model": base.display,
        "base_path": base.path,
        "merge_path": "streaming" if plan.streaming else "peft merge_and_unload",
        "merge_path_reason": plan.reason or None,
        "dtype": dtype,
        "shards": shards,
        "size_bytes": sum((out / s).stat().st_size for s in shards),
        "lora": {"r": pc.get("r"), "alpha": pc.get("lora_alpha"), "use_rslora": bool(pc.get("use_rslora")),
                 "use_dora": bool(pc.get("use_dora")), "modules": len(parsed.modules),
                 "whole_tensors": sorted(parsed.replacements)},
        "untied": plan.untie,
        "quantization": {"trained_on": adapter.quantization or "full precision", "simulate_nf4": cfg.simulate_nf4,
                         "merged_into": "NF4-rounded base" if plan.nf4 else "full-precision base"},
    }


def summary_line(report: dict[str, Any], out: Path) -> str:
    v = report["verification"]
    if v.get("skipped"):
        check = f"not verified ({v['skipped']})"
    else:
        gate = next(c for c in v["comparisons"] if c["gates"])
        check = (f"verification {'passed' if v['passed'] else 'FAILED'} (max |logit diff| "
                 f"{gate['max_abs_logit_diff']:.2e}, mean KL {gate['mean_kl']:.2e}, greedy answers identical "
                 f"{gate['answers_identical']}/{len(v['prompts'])})")
    shards = len(report["shards"])
    return (f"done: {out} ({shards} shard{'s' if shards > 1 else ''}, {report['dtype']}, "
            f"{report['size_bytes'] / 2**20:.1f} MiB, {report['merge_path']} merge); {check}")


# --- verification ---------------------------------------------------------------------------------------------------

@dataclass
class Probe:
    messages: list[dict]
    ids: list[int]  # the whole conversation, tokenised as in training: logits are compared at every position
    prompt: list[int]  # everything before the last assistant turn, plus the generation prompt: greedy answers


def probes(adapter: Adapter, tokenizer: Any) -> tuple[list[Probe], str]:
    """A few conversations to compare on, rendered with the adapter's chat template: from the adapter's eval data
    when it can be read, else its training data, else built-in ones."""
    for path in _recorded_data(adapter):
        try:
            rows = [r.messages for r in data.load_conversations(str(path))]
        except DataError as exc:
            log.warning("cannot read %s for verification (%s)", path, exc)
            continue
        items = _encode_probes(tokenizer, rows)
        if items:
            return items, str(path)
    items = _encode_probes(tokenizer, BUILTIN_PROMPTS)
    if not items:
        raise RunFailure("cannot build verification prompts with the adapter's chat template; use --no-verify")
    return items, "built-in prompts"


def _recorded_data(adapter: Adapter) -> list[Path]:
    rc = adapter.run_config or {}
    found = []
    for path in (rc.get("eval_path"), rc.get("train_path")):
        # relative to where training ran (usually the current folder), else to the adapter
        candidates = [Path(path), adapter.path / path] if path else []
        found += [c for c in candidates if c.is_file()][:1]
    return found


def _encode_probes(tokenizer: Any, conversations: list[list[dict]]) -> list[Probe]:
    result = []
    for messages in conversations:
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            continue
        try:
            ids = chat.encode(tokenizer, messages[: last + 1]).input_ids
            prompt = chat.encode_prompt(tokenizer, messages[:last])
        except (DataError, UsageError):
            continue
        result.append(Probe(messages[: last + 1], ids, prompt))
        if len(result) == N_PROMPTS:
            break
    return result


@dataclass
class Outputs:
    logits: list[Any]  # fp32, one (tokens, vocab) tensor per probe
    answers: list[str]


def run_probes(model: Any, tokenizer: Any, items: list[Probe], eos_ids: list[int]) -> Outputs:
    import torch

    model.eval()
    logits, answers = [], []
    with torch.no_grad():
        for p in items:
            ids = torch.tensor([p.ids], device=model.device)
            logits.append(model(input_ids=ids).logits[0].to(device="cpu", dtype=torch.float32))
            prompt = torch.tensor([p.prompt], device=model.device)
            generated = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                       max_new_tokens=MAX_NEW_TOKENS, eos_token_id=eos_ids,
                                       pad_token_id=tokenizer.pad_token_id)
            answers.append(tokenizer.decode(generated[0, prompt.shape[1]:], skip_special_tokens=True))
    return Outputs(logits, answers)


def compare(reference: Outputs, merged: Outputs) -> dict[str, Any]:
    """Max absolute logit difference, KL(reference || merged) of the next-token distributions at every position,
    top-1 agreement, and how many greedy answers are identical."""
    import torch

    diffs, kls, agree, positions = [], [], 0, 0
    for ref, got in zip(reference.logits, merged.logits):
        diffs.append(float((ref - got).abs().max()))
        logp, logq = torch.log_softmax(ref.double(), -1), torch.log_softmax(got.double(), -1)
        kls.append((logp.exp() * (logp - logq)).sum(-1).clamp_min(0))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        positions += ref.shape[0]
    kl = torch.cat(kls)
    return {"max_abs_logit_diff": max(diffs), "mean_kl": float(kl.mean()), "max_kl": float(kl.max()),
            "top1_agreement": agree / positions,
            "answers_identical": sum(a == b for a, b in zip(reference.answers, merged.answers)),
            "reference_answers": reference.answers}


@dataclass
class Reference:
    """base+adapter as peft runs it, unmerged: on the full-precision, NF4-rounded or real 4-bit base."""

    label: str
    nf4: set[str] = field(default_factory=set)  # base weights rounded through NF4 first
    four_bit: bool = False
    gates: bool = False  # pass/fail is decided against this one


def verify(job: Job, out: Path, tokenizer: Any, eos_ids: list[int], trust_remote_code: bool) -> dict[str, Any]:
    """Merged model vs base+adapter (peft, unmerged) on a few conversations. Pass/fail is against the reference the
    merge reproduces (the full-precision base, or the NF4-rounded one with --simulate_nf4); a QLoRA adapter is also
    compared with the real 4-bit base+adapter, which is expected to differ more."""
    import torch
    from transformers import AutoModelForCausalLM

    adapter, base, plan = job.adapter, job.base, job.plan
    items, source = probes(adapter, tokenizer)
    log.info("verifying on %d conversation(s) from %s against base+adapter (peft)", len(items), source)
    references = [Reference("base+adapter, NF4-rounded base" if plan.nf4 else "base+adapter, full-precision base",
                            nf4=plan.nf4, gates=True)]
    if plan.nf4:
        references.append(Reference("base+adapter, full-precision base"))
    if adapter.quantization == "4bit":
        references.append(Reference("base+adapter, 4-bit NF4 base (as trained)", four_bit=True))
    merged_model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32,
                                                        trust_remote_code=trust_remote_code)
    merged = run_probes(merged_model, tokenizer, items, eos_ids)
    del merged_model
    gc.collect()
    tolerance = TOLERANCES[job.dtype]
    comparisons = []
    for ref in references:
        try:
            outputs = run_probes(_reference_model(adapter, base, ref, trust_remote_code), tokenizer, items, eos_ids)
        except Exception as exc:  # informative references may be unavailable (e.g. bitsandbytes on this machine)
            if ref.gates:
                raise
            log.warning("comparison with %s skipped: %s", ref.label, " ".join(str(exc).split())[:200])
            continue
        finally:
            gc.collect()
        result = {"reference": ref.label, "gates": ref.gates, **compare(outputs, merged)}
        result["within_tolerance"] = all(result[k] <= v for k, v in tolerance.items())
        comparisons.append(result)
        log.info("vs %s: max |logit diff| %.2e, KL mean %.2e max %.2e, top-1 agreement %.1f%%, greedy answers "
                 "identical %d/%d%s", ref.label, result["max_abs_logit_diff"], result["mean_kl"], result["max_kl"],
                 100 * result["top1_agreement"], result["answers_identical"], len(items),
                 (" -> " + ("PASS" if result["within_tolerance"] else "FAIL")) if ref.gates else " (informative)")
    passed = next(c for c in comparisons if c["gates"])["within_tolerance"]
    return {"passed": passed, "tolerance": tolerance, "evaluated_in": "fp32", "source": source,
            "prompts": [p.messages for p in items], "merged_answers": merged.answers, "comparisons": comparisons}


def _reference_model(adapter: Adapter, base: models.BaseModel, ref: Reference, trust_remote_code: bool) -> Any:
    from peft import PeftModel

    model = models.load_model(base, precision="fp32", load_in_4bit=ref.four_bit, trust_remote_code=trust_remote_code)
    if ref.nf4:
        round_trip_in_place(model, {n.removesuffix(".weight") for n in ref.nf4})
    return PeftModel.from_pretrained(model, str(adapter.path))
