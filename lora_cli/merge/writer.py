"""Writing the merged model folder: weights (streamed, or through peft), config, tokenizer, generation config."""

from __future__ import annotations

import gc
import json
import logging
import shutil
from pathlib import Path
from typing import Any

from .. import adapters, chat, models, tokenizer_files
from ..adapters import Adapter
from ..filenames import GENERATION_CONFIG, MODEL_CONFIG, SAFETENSORS_INDEX
from ..safetensors_io import SafetensorsFolder, write_safetensors
from .arithmetic import nf4_round_trip, produce_tensor
from .plan import Plan

log = logging.getLogger("lora_cli")

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def output_dtype(requested: str, source: Any) -> Any:
    """--dtype for floating tensors; integer buffers and auto keep the checkpoint's own dtype."""
    if requested == "auto" or not source.is_floating_point:
        return source
    return models.torch_dtype(requested)


def write_streamed(ckpt: SafetensorsFolder, plan: Plan, dtype: str, out: Path) -> list[str]:
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
        (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
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
    for name in (MODEL_CONFIG, GENERATION_CONFIG):
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
    cfg = json.loads((folder / MODEL_CONFIG).read_text(encoding="utf-8"))
    cfg.pop("quantization_config", None)
    if dtype != "auto":
        for key in ("dtype", "torch_dtype"):
            if key in cfg or key == "dtype":
                cfg[key] = DTYPE_NAMES[dtype]
    if untied:
        cfg["tie_word_embeddings"] = False
        if isinstance(cfg.get("text_config"), dict):
            cfg["text_config"]["tie_word_embeddings"] = False
    (out / MODEL_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    for code in folder.glob("*.py"):  # models with their own code need it next to the weights
        shutil.copy2(code, out / code.name)
    return cfg


def write_tokenizer_and_generation(adapter: Adapter, base: models.BaseModel, folder: Path, out: Path,
                                   trust_remote_code: bool) -> tuple[Any, list[int]]:
    """The adapter's tokenizer (its chat template is the one trained with) and a generation config whose EOS
    includes the template's end-of-turn token, so generation stops where training taught it to."""
    from transformers import GenerationConfig

    tokenizer = adapters.load_adapter_tokenizer(adapter, base, trust_remote_code)
    tokenizer_files.save_tokenizer(tokenizer, out)
    if (folder / GENERATION_CONFIG).is_file():
        generation = GenerationConfig.from_pretrained(folder)
    else:
        cfg = json.loads((folder / MODEL_CONFIG).read_text(encoding="utf-8"))
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
