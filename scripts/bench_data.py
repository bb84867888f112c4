"""Data preparation at scale: seconds, rows/s and peak memory of lora-data and lora-train on synthetic conversation
files of 10k, 100k and 1M rows shaped like data/sample/train.jsonl.

    python scripts/bench_data.py                          # 10k, 100k, 1M sample-like rows; 100k 8-turn rows
    python scripts/bench_data.py --rows 10000 --turns 1 2 4 8 --lora-data-max 0

lora-data and the dry run are skipped above --lora-data-max / --dry-run-max rows (default 100k: lora-data checks and
reports row by row on one process, its cost is linear and the 100k figure gives it; the first training run measures
the same preparation as the dry run, plus writing the cache).

For each file it runs, as fresh processes with an empty data cache:
  - lora-data --show 0 (reads, validates, tokenises and masks every row; reports every problem),
  - lora-train --dry_run (the same preparation, no cache written),
  - lora-train --max_steps 1, twice: the first run prepares and fills the data cache, the second starts from it.
The time to lora-train's "data: N training conversations" line is the preparation time; for the cached run it is
how long training takes to start. Peak RSS is the largest sum over the process and its children (tokenising
workers), sampled every 0.1 s; peak anon is the same less file-backed pages (memory-mapped Arrow files and model
weights, which the kernel can drop), i.e. the memory the run really holds. Results are printed and written to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "data" / "sample" / "train.jsonl"
DATA_LINE = "lora-train: data: "


def make_file(path: Path, rows: int, turns: int, seed: int = 0) -> Path:
    """`rows` conversations like the sample's, each with `turns` user/assistant exchanges and a unique ticket number
    (so no two rows are the same text)."""
    if path.is_file():
        return path
    rng = random.Random(seed)
    sample = [json.loads(line) for line in SAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]
    tmp = path.with_suffix(".partial")
    with open(tmp, "w", encoding="utf-8") as out:
        for i in range(rows):
            base = rng.choice(sample)["messages"]
            system = [m for m in base if m["role"] == "system"]
            messages = list(system)
            for t in range(turns):
                exchange = [m for m in rng.choice(sample)["messages"] if m["role"] != "system"]
                user, answer = exchange[0], exchange[-1]
                messages += [{"role": "user", "content": f"{user['content']} (ticket #{i}-{t})"},
                             {"role": "assistant", "content": answer["content"]}]
            out.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")
    tmp.rename(path)
    return path


def run(argv: list[str], env: dict[str, str], mark: str | None = None) -> dict:
    """Run a command; wall seconds, seconds until a line containing `mark`, peak RSS of the process tree."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            bufsize=1)
    peak = anon = 0
    marked, tail = None, []
    done = threading.Event()

    def sample() -> None:
        nonlocal peak, anon
        parent = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                infos = [p.memory_info() for p in [parent, *parent.children(recursive=True)] if p.is_running()]
                peak = max(peak, sum(i.rss for i in infos))
                anon = max(anon, sum(i.rss - i.shared for i in infos))  # less the mapped files (Arrow, weights)
            except psutil.Error:
                pass
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    for line in proc.stdout:
        if mark and marked is None and mark in line:
            marked = time.perf_counter() - start
        tail = (tail + [line.rstrip()])[-8:]
    code = proc.wait()
    done.set()
    sampler.join()
    result = {"seconds": round(time.perf_counter() - start, 1), "peak_rss_gib": round(peak / 2**30, 2),
              "peak_anon_gib": round(anon / 2**30, 2), "exit": code}
    if mark:
        result["seconds_to_data"] = round(marked, 1) if marked is not None else None
    if code:
        result["tail"] = tail
    return result


def bench_file(path: Path, rows: int, args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-data-"))
    env = {**os.environ, "LORA_CLI_DATA_CACHE": str(work / "cache"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    base = ["--base_model", args.base_model] if args.base_model else []
    python = [sys.executable, "-m"]
    results: dict = {"rows": rows}
    try:
        if rows <= args.lora_data_max:
            results["lora_data"] = run([*python, "lora_cli.cli.data", "--train_path", str(path), "--show", "0",
                                        *base], env)
        train = [*python, "lora_cli.cli.train", "--train_path", str(path), "--output_dir", str(work / "run"),
                 "--overwrite", *base, *args.train_flags.split()]
        if rows <= args.dry_run_max:
            results["dry_run"] = run([*train, "--dry_run"], env, DATA_LINE)
        results["first_run"] = run([*train, "--max_steps", "1"], env, DATA_LINE)
        results["cached_run"] = run([*train, "--max_steps", "1"], env, DATA_LINE)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    for name in ("lora_data", "dry_run", "first_run"):
        r = results.get(name)
        if r and not r["exit"]:
            seconds = r.get("seconds_to_data") or r["seconds"]
            r["rows_per_second"] = round(rows / seconds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--turns", type=int, nargs="+", default=[1], help="exchanges per conversation")
    parser.add_argument("--multi-turn", type=int, default=8, help="also 100k rows of this many turns (0: no)")
    parser.add_argument("--base_model", default="", help="default: lora-train's (the demo model)")
    parser.add_argument("--train_flags", default="--max_seq_length 2048", help="more lora-train flags")
    parser.add_argument("--lora-data-max", type=int, default=100_000, help="run lora-data up to this many rows")
    parser.add_argument("--dry-run-max", type=int, default=100_000, help="run --dry_run up to this many rows")
    parser.add_argument("--data-dir", default=str(Path(tempfile.gettempdir()) / "lora-cli-bench-data"))
    parser.add_argument("--out", default="bench_data.json")
    args = parser.parse_args()
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    cases = [(rows, turns) for turns in args.turns for rows in args.rows]
    if args.multi_turn and (100_000, args.multi_turn) not in cases:
        cases.append((100_000, args.multi_turn))
    report = {"machine": f"{platform.node()} {os.cpu_count()} cores, {platform.processor() or platform.machine()}",
              "date": time.strftime("%Y-%m-%d %H:%M"), "runs": []}
    for rows, turns in cases:
        path = make_file(data_dir / f"rows-{rows}-turns-{turns}.jsonl", rows, turns)
        print(f"{rows:,} rows x {turns} turns ({path.stat().st_size / 2**20:.0f} MiB) ...", flush=True)
        result = {"turns": turns, "file_mib": round(path.stat().st_size / 2**20), **bench_file(path, rows, args)}
        print(json.dumps(result), flush=True)
        report["runs"].append(result)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
