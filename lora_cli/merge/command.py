"""lora-merge's command: prepare the job, write into a temporary folder, verify, move it into place."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import adapters, fsutil, integrity, models
from ..adapters import Adapter
from ..errors import RunFailure, UsageError, first_line
from ..filenames import MERGE_REPORT, MODEL_CONFIG
from ..safetensors_io import SafetensorsFolder
from ..verification import verify_or_skip
from .adapter_tensors import AdapterTensors, parse_adapter
from .config import MergeConfig, out_dir_problems
from .plan import Plan, plan_merge
from .verify import verify
from .writer import (DTYPE_NAMES, output_dtype, write_config, write_streamed, write_tokenizer_and_generation,
                     write_with_peft)

log = logging.getLogger("lora_cli")


@dataclass
class Prepared:
    """Everything known before any weight is written: fast to build, so bad input fails in seconds."""

    adapter: Adapter
    base: models.BaseModel
    folder: Path  # local folder with the base's config and weights
    ckpt: SafetensorsFolder | None  # None: no safetensors (peft's merge loads the model instead)
    dtype: str  # fp32 | bf16 | fp16: --dtype, or what auto resolves to
    parsed: AdapterTensors
    plan: Plan
    model_bytes: int  # the base in fp32


def prepare(cfg: MergeConfig) -> Prepared:
    adapter = adapters.read_adapter(cfg.adapter_dir)
    base = models.resolve("") if cfg.base_model == "demo" else adapters.resolve_base(adapter, cfg.base_model)
    folder = models.local_folder(base)
    problems = out_dir_problems(Path(cfg.out_dir), cfg.overwrite, [adapter.path, folder])
    if problems:
        raise UsageError(problems[0])
    base_config = json.loads((folder / MODEL_CONFIG).read_text(encoding="utf-8"))
    if base_config.get("quantization_config"):
        method = base_config["quantization_config"].get("quant_method", "quantised")
        raise UsageError(f"--base_model {base.display}: a pre-quantised ({method}) checkpoint; merging needs the "
                         "full-precision weights: pass the original model as --base_model")
    ckpt = SafetensorsFolder.open(folder, "--base_model")
    skeleton = build_skeleton(base, folder, cfg.trust_remote_code)
    parsed = parse_adapter(adapter, adapters.load_adapter_weights(adapter))
    plan = plan_merge(adapter, parsed, ckpt, skeleton, cfg.simulate_nf4)
    return Prepared(adapter, base, folder, ckpt, resolve_dtype(cfg.dtype, ckpt, base_config), parsed, plan,
               sum(p.numel() for p in skeleton.parameters()) * 4)


def merge(cfg: MergeConfig) -> dict[str, Any]:
    """Merge into a temporary folder next to OUT_DIR, verify, and move it into place whole. Returns the report;
    raises RunFailure (after writing OUT_DIR and its report) when verification fails."""
    start = time.perf_counter()
    job = prepare(cfg)
    out = Path(cfg.out_dir)
    _log_start(job, cfg)
    check_disk_space(out, job.ckpt, cfg.dtype)
    try:
        with fsutil.staged_folder(out, replace=True) as tmp:  # an existing OUT_DIR (checked to be a model) goes last
            report = write_model(cfg, job, tmp)
            report["seconds"] = round(time.perf_counter() - start, 1)
            (tmp / MERGE_REPORT).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
            # lora-export and later loads check the files against the marker
            integrity.write_marker(tmp, written_by="lora-merge")
    finally:
        if job.ckpt is not None:
            job.ckpt.close()
    log.info(summary_line(report, out))
    verification = report["verification"]
    if not verification.get("skipped") and not verification["passed"]:
        raise RunFailure(f"verification failed: the merged model differs from base+adapter beyond tolerance "
                         f"(details in {out / MERGE_REPORT})")
    return report


def write_model(cfg: MergeConfig, job: Prepared, tmp: Path) -> dict[str, Any]:
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
    # One fp32 model at a time, plus activations.
    report["verification"] = verify_or_skip(cfg.verify, job.model_bytes * 1.5,
                                            lambda: verify(job, tmp, tokenizer, eos_ids, cfg.trust_remote_code))
    return report


def resolve_dtype(requested: str, ckpt: SafetensorsFolder | None, base_config: dict[str, Any]) -> str:
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
    try:
        return models.meta_model(folder, trust_remote_code)
    except Exception as exc:  # unknown architectures and remote-code refusals raise several types
        hint = "" if trust_remote_code else "; if the model ships its own code, pass --trust_remote_code"
        raise UsageError(f"--base_model {base.display}: transformers cannot build this model "
                         f"({first_line(exc)}){hint}") from None


def check_disk_space(out: Path, ckpt: SafetensorsFolder | None, dtype: str) -> None:
    """Fail before writing anything when the merged shards cannot fit on OUT_DIR's disk."""
    if ckpt is None:
        return
    need = 0
    for f in ckpt.files:
        for name in f.entries:
            source = f.dtype(name)
            need += f.nbytes(name) // source.itemsize * output_dtype(dtype, source).itemsize
    fsutil.check_free_space(out, need, f"OUT_DIR {out}: the merged model")


def _log_start(job: Prepared, cfg: MergeConfig) -> None:
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


def build_report(cfg: MergeConfig, job: Prepared, out: Path, shards: list[str]) -> dict[str, Any]:
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
