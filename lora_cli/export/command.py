"""lora-export's command: plan, write under a temporary name, verify, rename into place, report."""

from __future__ import annotations

import logging
import math
import re
import time
from pathlib import Path
from typing import Any

from .. import chat, fsutil, llamacpp
from ..errors import RunFailure, UsageError, first_line
from ..models import GGUF_PRE_KEY
from ..verification import verify_or_skip
from .config import ExportConfig, modelfile_path
from .gguf_writer import write_gguf
from .ollama import ollama_modelfile
from .source import Source, open_source
from .tensors import PlannedTensor, plan_tensors
from .llamacpp_check import log_llamacpp_verification, verify_in_llamacpp
from .verify import log_verification, verify
from .vocab import Vocab, build_vocab

log = logging.getLogger("lora_cli")


def load_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # noqa: BLE001 - missing files and broken configs raise many types
        raise UsageError(f"MODEL_DIR {folder}: cannot load its tokenizer ({first_line(exc)})") from None


def export(cfg: ExportConfig) -> dict[str, Any]:
    """Write OUT (and the Modelfile), verify, report. Returns the report; RunFailure when verification fails."""
    start = time.perf_counter()
    folder, out = Path(cfg.model_dir), Path(cfg.out)
    source = open_source(folder)
    tokenizer = load_tokenizer(folder)
    chat.set_template_kwargs(tokenizer, chat.parse_template_kwargs(cfg.chat_template_kwargs))
    vocab = build_vocab(tokenizer, source.config.vocab_size, tokenizer.init_kwargs.get(GGUF_PRE_KEY))
    modelfile = ollama_modelfile(tokenizer, vocab, out, folder) if cfg.ollama else None  # refuse before writing
    plan = plan_tensors(source, cfg.outtype)
    parameters = sum(math.prod(t.shape) for t in plan)
    log.info("exporting %s (%s, %d layers, %.1fM parameters) to %s as %s", folder, source.config.model_type,
             source.config.num_hidden_layers, parameters / 1e6, out, cfg.outtype)
    log.info("tokenizer: %s, %d tokens (%d added, %d placeholders), %d merges, pre-tokenizer %s; %s; "
             "add BOS %s; chat template %s", vocab.kind, len(vocab.tokens), vocab.added, vocab.padded,
             len(vocab.merges), vocab.pre, ", ".join(f"{k} {vocab.tokens[v]}" for k, v in vocab.special.items()),
             "on" if vocab.add_bos else "off", "kept" if vocab.chat_template else "none (llama.cpp will guess)")
    report: dict[str, Any] = {"model_dir": str(folder), "out": str(out), "outtype": cfg.outtype,
                              "architecture": source.arch.gguf, "tensors": len(plan), "parameters": parameters}
    report.update(write_verified(cfg, source, plan, tokenizer, vocab))
    if modelfile is not None:
        fsutil.atomic_write(modelfile_path(out), modelfile.text)
        report["modelfile"] = str(modelfile_path(out))
        log.info("wrote %s (TEMPLATE%s, stop %s): ollama create %s -f %s", modelfile_path(out),
                 ", default SYSTEM prompt" if modelfile.shape.default_system else "", " ".join(modelfile.stops),
                 modelfile.name, modelfile_path(out))
    report["seconds"] = round(time.perf_counter() - start, 1)
    verification = report["verification"]
    failed = not verification.get("skipped") and not verification["passed"]
    log.info("done: %s (%.1f MiB, %s) in %.1f s; %s", out, report["size_bytes"] / 2**20, cfg.outtype,
             report["seconds"], "not verified" if verification.get("skipped") else
             "VERIFICATION FAILED" if failed else "verified")
    if failed:
        raise RunFailure(f"verification failed: {out} differs from {folder} beyond tolerance for {cfg.outtype} "
                         "(numbers above)")
    return report


def write_verified(cfg: ExportConfig, source: Source, plan: list[PlannedTensor], tokenizer: Any,
                   vocab: Vocab) -> dict[str, Any]:
    """Write the GGUF under a temporary name next to OUT, verify it, then rename it to OUT (also when verification
    fails, as lora-merge does: the numbers say what is wrong, the file lets one look)."""
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fsutil.check_free_space(out, sum(t.nbytes for t in plan), f"OUT {out}: the GGUF")
    with fsutil.staged_file(out) as tmp:
        write_gguf(tmp, source, plan, vocab, cfg.outtype, model_name(source, tokenizer))
        counts: dict[str, int] = {}
        for t in plan:
            counts[t.qtype.name] = counts.get(t.qtype.name, 0) + 1
        size = tmp.stat().st_size
        log.info("wrote %d tensors (%s), %.1f MiB", len(plan), ", ".join(f"{n} {k}" for k, n in counts.items()),
                 size / 2**20)
        parameters = sum(math.prod(t.shape) for t in plan)
        # fp32 weights, twice while transformers dequantises the GGUF, plus activations
        verification = verify_or_skip(cfg.verify, parameters * 4 * 2 * 1.5,
                                      lambda: _verify(cfg, source, tmp, tokenizer, vocab))
    return {"tensor_types": counts, "size_bytes": size, "verification": verification}


def model_name(source: Source, tokenizer: Any) -> str:
    """general.name: the folder's name. For the phi3 architecture llama.cpp strips the whitespace after special
    tokens (as Phi-3's own tokenizer does: rstrip) exactly when the name says Phi-3 (llama-vocab.cpp), so a phi3
    export's name says so exactly when its tokenizer strips."""
    name = source.folder.resolve().name
    if source.arch.gguf != "phi3":
        return name
    strips = any(t.rstrip for t in tokenizer.added_tokens_decoder.values()
                 if t.special and t.content not in ("<unk>", "<s>", "<|endoftext|>"))
    says = re.compile(r"phi-?3", re.IGNORECASE)
    if strips and not says.search(name):
        return f"Phi-3 {name}"
    return name if strips else says.sub("Phi", name)


def _verify(cfg: ExportConfig, source: Source, path: Path, tokenizer: Any, vocab: Vocab) -> dict[str, Any]:
    runtime = llamacpp.find()
    if isinstance(runtime, str):
        log.warning("verifying with transformers' GGUF reader, not llama.cpp itself (%s); that reader accepts some "
                    "files llama.cpp refuses", runtime)
        result = verify(source, path, tokenizer, vocab, cfg.outtype)
        log_verification(result, cfg.outtype)
        return result
    result = verify_in_llamacpp(runtime, source, path, tokenizer, vocab, cfg.outtype)
    log_llamacpp_verification(result, cfg.outtype)
    return result
