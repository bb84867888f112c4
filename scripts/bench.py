#!/usr/bin/env python3
r"""Side-by-side training benchmark: the typical tutorial recipe against lora-train, same machine, data and model.

    python scripts/bench.py                       # demo model, sample data, CPU or GPU (a few minutes on CPU)
    python scripts/bench.py --base_model DIR --train_path d.jsonl --eval_path e.jsonl --examples 256 \
        --max_seq_length 2048

Runs (each in its own process, so peak memory is its own):
  baseline          TRL SFTTrainer on rendered text, packing=False, batch 1 x accumulation 4, paged AdamW, loss on all
                    tokens, TRL's default gradient checkpointing: the widely copied recipe (kept here only)
  lora-train        lora-train's defaults (effective batch 1 x 4, the same examples per optimizer step)
  lora-train-fast   lora-train with its fastest settings (no LoRA dropout, plain AdamW; same batches and schedule)
  trl-sft           what `trl sft` does with its own defaults (SFTConfig's: conversational rows, gradient
                    checkpointing, no packing, loss on all tokens) and the same LoRA, batches and schedule
Every run sees the same examples; the first optimizer step is warm-up and not timed. Reported per run: non-pad
tokens/s (all tokens the model processed), loss tokens/s (tokens in the loss), optimizer steps/s, wall time of the
training, e2e time (from the launch of its process to the end of training: start-up included), peak
memory (process RSS on CPU, torch.cuda.max_memory_allocated on GPU), the held-out loss on assistant tokens (the task;
computed the same way for every run), its model FLOP/s as a share of this machine's matrix-multiply ceiling (measured
in the same run: fp32 on CPU, bf16 on CUDA), and the ratios to the baseline. Results also go to --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RUNS = ("baseline", "trl-sft", "lora-train", "lora-train-fast")
H100_BF16_DENSE_FLOPS = 989e12


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base_model", default="", help="model for every run ('' = the embedded demo model)")
    p.add_argument("--train_path", default=str(ROOT / "data/sample/train.jsonl"))
    p.add_argument("--eval_path", default=str(ROOT / "data/sample/eval.jsonl"))
    p.add_argument("--examples", type=int, default=96, help="training conversations each run sees")
    p.add_argument("--eval_rows", type=int, default=40, help="held-out conversations for the final loss")
    p.add_argument("--max_seq_length", type=int, default=2048)
    p.add_argument("--load_in_4bit", action="store_true", help="QLoRA (NF4) in every run")
    p.add_argument("--runs", default=",".join(RUNS), help="comma-separated subset of " + ", ".join(RUNS))
    p.add_argument("--flags", default="", help="extra lora-train flags for the lora-train runs, e.g. "
                                               "'--gradient_checkpointing --tokens_per_batch 4096'")
    p.add_argument("--out", default=str(ROOT / "runs/bench.json"))
    p.add_argument("--worker", default="", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse()
    if args.worker:
        print("BENCH_RESULT " + json.dumps(run_worker(args)), flush=True)
        return
    results = {}
    ceiling = matmul_ceiling()
    print(f"bench: matrix-multiply ceiling {ceiling / 1e9:,.1f} GFLOP/s", file=sys.stderr, flush=True)
    for name in args.runs.split(","):
        argv = [sys.executable, __file__, "--worker", name] + [
            f"--{k}={v}" for k, v in vars(args).items() if k not in ("worker", "runs", "out", "load_in_4bit")]
        argv += ["--load_in_4bit"] if args.load_in_4bit else []
        print(f"bench: running {name} ...", file=sys.stderr, flush=True)
        launched = time.time()
        proc = subprocess.run(argv, capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_RESULT ")), None)
        if proc.returncode != 0 or line is None:
            sys.exit(f"bench: {name} failed:\n{proc.stderr[-3000:]}")
        results[name] = json.loads(line[len("BENCH_RESULT "):])
        results[name]["e2e_s"] = results[name].pop("train_end_unix") - launched  # start-up included
        results[name]["ceiling_share"] = results[name]["model_flops_per_s"] / ceiling
    report(results, args, ceiling)


def report(results: dict, args: argparse.Namespace, ceiling: float) -> None:
    base = results.get("baseline")
    cols = ("non-pad tok/s", "loss tok/s", "steps/s", "wall s", "peak GiB", "e2e s", "eval loss", "of ceiling")
    print(f"\n{'run':<16}" + "".join(f"{c:>15}" for c in cols))
    for name, r in results.items():
        row = (r["tokens_per_s"], r["loss_tokens_per_s"], r["steps_per_s"], r["wall_s"], r["peak_bytes"] / 2**30,
               r["e2e_s"], r["eval_loss"], r["ceiling_share"])
        print(f"{name:<16}" + "".join(f"{v:>15.3f}" for v in row))
    if base:
        print(f"\n{'vs baseline':<16}" + "".join(f"{c:>15}" for c in cols[:6]))
        for name, r in results.items():
            ratios = (r["tokens_per_s"] / base["tokens_per_s"], r["loss_tokens_per_s"] / base["loss_tokens_per_s"],
                      r["steps_per_s"] / base["steps_per_s"], r["wall_s"] / base["wall_s"],
                      r["peak_bytes"] / base["peak_bytes"], r["e2e_s"] / base["e2e_s"])
            print(f"{name:<16}" + "".join(f"{v:>14.2f}x" for v in ratios))
    device = results[next(iter(results))]["device"]
    print(f"\ndevice: {device}; {args.examples} training conversations per run, eval on {args.eval_rows} held-out; "
          f"matrix-multiply ceiling {ceiling / 1e9:,.1f} GFLOP/s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": {k: v for k, v in vars(args).items() if k != "worker"},
                                          "date": time.strftime("%Y-%m-%d"), "matmul_ceiling_flops": ceiling,
                                          "results": results}, indent=2) + "\n")


def matmul_ceiling(seconds: float = 3.0) -> float:
    """FLOP/s of large square matrix multiplies on this machine, in the dtype training computes in here (fp32 on CPU,
    bf16 on CUDA), with the same threads the runs get: the most any run's model FLOP/s could reach."""
    import torch

    cuda = torch.cuda.is_available()
    n = 8192 if cuda else 2048
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = (torch.randn(n, n, dtype=dtype, device="cuda" if cuda else "cpu") for _ in range(2))
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if cuda:
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - start))
    return best


# ---------------------------------------------------------------- worker side: one run in this process


def run_worker(args: argparse.Namespace) -> dict:
    own = args.worker.startswith("lora-train")
    if own:  # as the lora-train command does in its own process
        from lora_cli.process import lora_train_process

        flags = shlex.split(args.flags)
        optim = flags[flags.index("--optim") + 1] if "--optim" in flags else \
            "adamw_torch" if args.worker == "lora-train-fast" else "paged_adamw_32bit"
        lora_train_process(args.load_in_4bit or "--load_in_8bit" in flags, optim)
    import torch
    from transformers import set_seed

    from lora_cli.cli.common import quiet_libraries

    quiet_libraries()
    set_seed(0)
    if args.worker == "baseline":
        trainer, tokenizer = baseline_trainer(args)
    elif args.worker == "trl-sft":
        trainer, tokenizer = trl_sft_trainer(args)
    else:
        trainer, tokenizer = lora_train_trainer(args, fast=args.worker == "lora-train-fast")
    meter = attach_meter(trainer)
    if own:
        from lora_cli.process import resume_gc

        resume_gc()  # as lora-train's run_training does
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    train_end_unix = time.time()
    measured = meter.measured()
    cuda = torch.cuda.is_available()
    result = {
        "run": args.worker, "device": torch.cuda.get_device_name() if cuda else f"CPU ({os.cpu_count()} cores)",
        "optimizer_steps": trainer.state.global_step, "wall_s": wall, "train_end_unix": train_end_unix, **measured,
        "peak_bytes": int(torch.cuda.max_memory_allocated()) if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "eval_loss": task_eval_loss(trainer.model, tokenizer, args),
    }
    result["model_flops_per_s"] = result["tokens_per_s"] * flops_per_token(trainer.model, mean_length(meter))
    if cuda:
        result["mfu"] = result["model_flops_per_s"] / H100_BF16_DENSE_FLOPS
    return result


class Meter:
    """Tokens of each micro-step and the time at each optimizer step's end; step 1 is warm-up."""

    def __init__(self):
        self.step_times: list[float] = []
        self.step_tokens: list[tuple[int, int]] = []
        self._tokens = [0, 0]
        self.sequences = 0
        self.sequence_tokens = 0

    def micro_step(self, inputs) -> None:
        position_ids = inputs.get("position_ids")
        if position_ids is not None:  # padding-free rows: one sequence starts at each position 0
            self.sequences += int((position_ids == 0).sum())
        else:
            self.sequences += int(inputs["labels"].shape[0])
        mask = inputs.get("attention_mask")
        self.sequence_tokens += int(mask.sum()) if mask is not None else int(inputs["labels"].numel())
        labels = inputs["labels"]
        mask = inputs.get("attention_mask")
        self._tokens[0] += int(mask.sum()) if mask is not None else int(labels.numel())
        self._tokens[1] += int((labels[:, 1:] != -100).sum())

    def step_end(self) -> None:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_times.append(time.perf_counter())
        self.step_tokens.append(tuple(self._tokens))
        self._tokens = [0, 0]

    def measured(self) -> dict:
        if len(self.step_times) < 2:
            raise SystemExit("bench: need at least 2 optimizer steps (raise --examples)")
        seconds = self.step_times[-1] - self.step_times[0]
        tokens = sum(t for t, _ in self.step_tokens[1:])
        loss_tokens = sum(t for _, t in self.step_tokens[1:])
        steps = len(self.step_times) - 1
        return {"measured_steps": steps, "measured_s": seconds, "tokens_per_s": tokens / seconds,
                "loss_tokens_per_s": loss_tokens / seconds, "steps_per_s": steps / seconds}


def attach_meter(trainer) -> Meter:
    from transformers import TrainerCallback

    meter = Meter()
    original = trainer.training_step

    def training_step(model, inputs, num_items_in_batch=None):
        meter.micro_step(inputs)
        return original(model, inputs, num_items_in_batch)

    trainer.training_step = training_step

    class StepEnd(TrainerCallback):
        def on_step_end(self, *a, **k):
            meter.step_end()

    trainer.add_callback(StepEnd())
    return meter


def mean_length(meter: Meter) -> float:
    return meter.sequence_tokens / max(meter.sequences, 1)


def baseline_trainer(args):
    """The tutorial recipe, minimal and faithful: rendered text, no masking, batch 1, paged AdamW."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from lora_cli import data, models

    base = models.resolve(args.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    tokenizer.pad_token, tokenizer.padding_side = tokenizer.eos_token, "right"
    rows = data.load_conversations(args.train_path)[: args.examples]
    text = [tokenizer.apply_chat_template(r.messages, tokenize=False) for r in rows]
    cuda = torch.cuda.is_available()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16,
                               bnb_4bit_use_double_quant=True) if args.load_in_4bit else None
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.float16 if cuda else torch.float32,
                                                 quantization_config=quant,
                                                 device_map={"": 0 if cuda else "cpu"} if quant else None)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    config = SFTConfig(output_dir=str(ROOT / "runs/bench-baseline"), per_device_train_batch_size=1,
                       gradient_accumulation_steps=4, max_steps=args.examples // 4, learning_rate=1e-4,
                       lr_scheduler_type="cosine", warmup_steps=0.03, optim="paged_adamw_32bit", packing=False,
                       max_length=args.max_seq_length, fp16=cuda, bf16=False, use_cpu=not cuda, logging_steps=1000,
                       save_strategy="no", report_to=[], dataset_text_field="text", seed=42)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": text}),
                         processing_class=tokenizer, peft_config=lora)
    return trainer, tokenizer


def trl_sft_trainer(args):
    """`trl sft --use_peft` as its script builds it: conversational rows, SFTConfig's own defaults (gradient
    checkpointing, no packing, loss on every token), the same LoRA, conversations per step and schedule as the rest."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    from trl import SFTConfig, SFTTrainer

    from lora_cli import data, models

    base = models.resolve(args.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base.path)
    rows = data.load_conversations(args.train_path)[: args.examples]
    cuda = torch.cuda.is_available()
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16,
                               bnb_4bit_use_double_quant=True) if args.load_in_4bit else None
    model = AutoModelForCausalLM.from_pretrained(base.path, dtype=torch.bfloat16 if cuda else torch.float32,
                                                 quantization_config=quant,
                                                 device_map={"": 0 if cuda else "cpu"} if quant else None)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, bias="none", task_type="CAUSAL_LM",
                      target_modules="all-linear")
    config = SFTConfig(output_dir=str(ROOT / "runs/bench-trl-sft"), per_device_train_batch_size=4,
                       gradient_accumulation_steps=1, max_steps=args.examples // 4, learning_rate=1e-4,
                       lr_scheduler_type="cosine", warmup_steps=0.03, max_length=args.max_seq_length,
                       bf16=cuda, use_cpu=not cuda, logging_steps=1000, save_strategy="no", report_to=[], seed=42)
    dataset = Dataset.from_list([{"messages": r.messages} for r in rows])
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora)
    return trainer, tokenizer


def lora_train_trainer(args, fast: bool):
    from lora_cli import config, models
    from lora_cli.train import attach_lora, build_trainer, prepare, step_plan, training_only

    subset = ROOT / "runs" / f"bench-{os.getpid()}.jsonl"
    subset.parent.mkdir(parents=True, exist_ok=True)
    lines = [ln for ln in Path(args.train_path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    subset.write_text("\n".join(lines[: args.examples]) + "\n", encoding="utf-8")
    flags = ["--base_model", args.base_model, "--train_path", str(subset), "--output_dir",
             str(ROOT / "runs/bench-lora-train"), "--max_seq_length", str(args.max_seq_length),
             "--max_steps", str(args.examples // 4), "--logging_steps", "1000", "--save_steps", "100000"]
    if fast:  # no LoRA dropout (its random masks cost ~20% of a CPU step), plain AdamW
        flags += ["--lora_dropout", "0", "--optim", "adamw_torch"]
    if args.load_in_4bit:
        flags += ["--load_in_4bit"]
    cfg = config.parse_args(flags + shlex.split(args.flags))
    prepared = prepare(cfg)
    precision = models.choose_precision(cfg.precision)
    model = attach_lora(models.load_model(prepared.base, precision=precision, quantization=cfg.quantization,
                                          attn_implementation=cfg.attn_implementation), cfg)
    subset.unlink()
    plan = step_plan(cfg, model, precision, prepared.train_stats)
    # lora-train holds this for the whole run; the worker process ends with the run, so nothing needs undoing. The
    # trainer keeps the context manager alive: a dropped one is closed by the garbage collector, which undoes it.
    held = training_only(model, plan, precision, cfg.use_dora, cheaper_dropout=cfg.method == "sft")
    held.__enter__()
    trainer = build_trainer(cfg, model, prepared, plan, precision)
    trainer.bench_training_only = held
    return trainer, prepared.tokenizer


def task_eval_loss(model, tokenizer, args) -> float:
    """Mean loss on the assistant tokens of held-out rows: the same number for every run, whatever it trained on."""
    import torch

    from lora_cli import chat, data

    rows = data.load_conversations(args.eval_path)[: args.eval_rows]
    device = next(model.parameters()).device
    if not args.load_in_4bit:
        model.float()  # runs trained in bf16 or fp16 are scored in fp32 like the others (bf16 -> fp32 is exact)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            enc = chat.encode(tokenizer, row.messages)
            ids = torch.tensor([enc.input_ids], device=device)
            labels = torch.tensor([enc.labels], device=device)
            n = int((labels[:, 1:] != chat.IGNORE_INDEX).sum())
            total += float(model(input_ids=ids, labels=labels, use_cache=False).loss) * n
            count += n
    return total / count


def flops_per_token(model, seq_len: float) -> float:
    """Model FLOPs per token with a frozen base: forward 2N plus backward 2N (activation gradients only; no weight
    gradients for frozen weights), plus 6 per trainable LoRA parameter, plus causal attention
    12 * layers * hidden * seq / 2 at the runs' mean sequence length. Recomputation (checkpointing) is not counted."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.config
    attention = 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len / 2
    return 4 * (total - trainable) + 6 * trainable + attention


if __name__ == "__main__":
    main()
