"""Measure what lora-export's q4_0 check in llama.cpp sees, for docs/benchmarks.md: llama.cpp's next-token logits
against the source model rounded as the file stores it (the reference the q4_0 gate uses), for a correct export and
for one with q/k rows in the wrong order, on the demo model and on tiny random models; and what q4_0 itself costs
against the unrounded source. Needs llama.cpp (scripts/fetch_llama_cpp.sh).

    python scripts/measure_q4_0_gate.py [--only demo|tiny]
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tiny_model(folder: Path, arch: str, seed: int) -> Path:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_cli.models import demo_model_dir

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    config = getattr(transformers, f"{arch}Config")(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # as the family tests: peakier logits than the 0.02 init
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def measure(model: Path, out: Path, wrong_layout: bool) -> dict:
    from lora_cli.config import parse_args
    from lora_cli.export import ExportConfig, export, llamacpp_check, tensors

    real = tensors.rope_rows_to_pairs
    saved = dict(llamacpp_check.TOLERANCES)
    llamacpp_check.TOLERANCES["q4_0"] = float("inf")  # measure, do not judge
    if wrong_layout:
        tensors.rope_rows_to_pairs = lambda w, n_heads: w
    try:
        report = export(parse_args([str(model), str(out), "--outtype", "q4_0", "--overwrite"], cls=ExportConfig))
    finally:
        tensors.rope_rows_to_pairs = real
        llamacpp_check.TOLERANCES.update(saved)
    v = report["verification"]
    # the fallback check: the same file loaded back by transformers' GGUF reader, against the rounded source
    from lora_cli.export.command import load_tokenizer
    from lora_cli.export.source import open_source
    from lora_cli.export.verify import verify
    from lora_cli.export.vocab import build_vocab
    from lora_cli.models import GGUF_PRE_KEY

    source, tokenizer = open_source(model), load_tokenizer(model)
    vocab = build_vocab(tokenizer, source.config.vocab_size, tokenizer.init_kwargs.get(GGUF_PRE_KEY))
    reader = verify(source, out, tokenizer, vocab, "q4_0")["logits"]
    return {"logits": v["logits"], "rounding": v["rounding"], "answers_same": sum(a["same"] for a in v["answers"]),
            "answers": len(v["answers"]), "reader": reader}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=("demo", "tiny"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from lora_cli import llamacpp
    from lora_cli.models import demo_model_dir

    if isinstance(llamacpp.find(), str):
        sys.exit(f"llama.cpp not found: {llamacpp.find()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        models = [] if args.only == "demo" else [
            (f"tiny {arch} seed {seed}", tiny_model(tmp / f"{arch}{seed}", arch, seed))
            for arch in ("Llama",) for seed in (0, 1, 2)]  # Mistral is the same graph in llama.cpp; Qwen2 has no
        # q/k reordering (it rotates halves, as transformers does)
        if args.only != "tiny":
            models.insert(0, ("demo (SmolLM2-135M-Instruct)", demo_model_dir()))
        print("| model | q/k layout | vs rounded source: max diff (% of logit scale) | worst gap where top-1 differs "
              "| top-1 agreement | greedy answers same | transformers' reader vs rounded source: max diff (%) | "
              "max KL | q4_0 vs unrounded source: top-1 agreement | max diff (%) |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, folder in models:
            for wrong in (False, True):
                m = measure(folder, tmp / "out.gguf", wrong)
                lg, rd = m["logits"], m["rounding"]
                print(f"| {name} | {'wrong' if wrong else 'right'} | {100 * lg['max_rel_logit_diff']:.2f} | "
                      f"{100 * lg['worst_rel_gap']:.2f} | {100 * lg['top1_agreement']:.1f}% | "
                      f"{m['answers_same']}/{m['answers']} | {100 * m['reader']['max_rel_logit_diff']:.2g} | "
                      f"{m['reader']['max_kl']:.2g} | {100 * rd['top1_agreement']:.1f}% | "
                      f"{100 * rd['max_rel_logit_diff']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
