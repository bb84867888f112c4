"""How long lora-train takes from launch to its first optimizer step, phase by phase, and its peak memory.

    python scripts/bench_startup.py                      # demo model, data/sample/train.jsonl, 5 timed runs
    python scripts/bench_startup.py --flags="--lora_dropout 0" --runs 3

Each run is a fresh `lora-train --max_steps 2` process with the data cache and the converted demo model already on
disk (a first, untimed run fills both). The phases are read from lora-train's own output as it appears: every line
(and every progress-bar redraw) is time-stamped here when it arrives, so nothing inside lora-train is changed or
patched for the measurement. Wall seconds depend on what else the machine is doing; CPU seconds (user + system of
the process) much less, so both are reported. Results: printed, and written to --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# (phase name, what ends it: a pattern in lora-train's output)
MARKS = [
    ("imports, arguments, tokenizer, data (cache)", re.compile(r"lora-train: data: ")),
    ("until the model loads", re.compile(r"lora-train: loading ")),
    ("model load + LoRA attach", re.compile(r"lora-train: LoRA r=")),
    ("step plan", re.compile(r"lora-train: each optimizer step")),
    ("trainer construction (+ eval before training)", re.compile(r"\b0/2 \[")),
    ("first optimizer step", re.compile(r"\b1/2 \[")),
    ("second optimizer step", re.compile(r"\b2/2 \[")),
    ("save and exit", None),
]
FIRST_STEP = "trainer construction (+ eval before training)"  # the phase whose end is the first step's start


def one_run(cmd: list[str], env: dict[str, str]) -> dict:
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=ROOT)
    seen: dict[str, float] = {}
    pending = [(name, pattern) for name, pattern in MARKS if pattern is not None]
    buffer, log = "", []
    fd = proc.stderr.fileno()
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        now = time.perf_counter() - start
        buffer += chunk.decode("utf-8", "replace")
        log.append(chunk.decode("utf-8", "replace"))
        while pending and pending[0][1].search(buffer):
            seen[pending[0][0]] = now
            buffer = buffer[pending[0][1].search(buffer).end():]
            pending.pop(0)
    _, status, usage = os.wait4(proc.pid, 0)
    end = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0 or pending:
        sys.exit(f"lora-train failed or printed something unexpected (missing: {[n for n, _ in pending]}):\n"
                 + "".join(log)[-3000:])
    ends = [seen[name] for name, pattern in MARKS if pattern is not None] + [end]
    phases = {name: round(b - a, 3) for (name, _), a, b in zip(MARKS, [0.0] + ends, ends)}
    return {"phases": phases, "launch_to_first_step": round(seen[FIRST_STEP], 3), "wall": round(end, 3),
            "cpu": round(usage.ru_utime + usage.ru_stime, 3), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--base_model", default="", help="default: the embedded demo model")
    parser.add_argument("--train_path", default=str(ROOT / "data/sample/train.jsonl"))
    parser.add_argument("--flags", default="", help="extra lora-train flags, one string")
    parser.add_argument("--out", default=str(ROOT / "runs/bench_startup.json"))
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_startup_"))
    cmd = [sys.executable, "-m", "lora_cli.cli.train", "--train_path", args.train_path, "--output_dir",
           str(work / "run"), "--overwrite", "--max_steps", "2", "--logging_steps", "1", "--save_steps", "1000",
           *(["--base_model", args.base_model] if args.base_model else []), *shlex.split(args.flags)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    print("warm-up run (fills the data cache and the converted demo model) ...", flush=True)
    one_run(cmd, env)
    runs = []
    for i in range(args.runs):
        runs.append(one_run(cmd, env))
        print(f"run {i + 1}: launch to first step {runs[-1]['launch_to_first_step']:.2f} s, "
              f"wall {runs[-1]['wall']:.2f} s, cpu {runs[-1]['cpu']:.2f} s, peak {runs[-1]['peak_rss_gib']:.2f} GiB",
              flush=True)

    median = {name: statistics.median(r["phases"][name] for r in runs) for name, _ in MARKS}
    summary = {key: statistics.median(r[key] for r in runs)
               for key in ("launch_to_first_step", "wall", "cpu", "peak_rss_gib")}
    print(f"\nmedian of {args.runs} runs ({' '.join(cmd[3:])}):")
    for name, seconds in median.items():
        print(f"  {name:<48} {seconds:6.2f} s")
    print(f"  {'launch to the first optimizer step':<48} {summary['launch_to_first_step']:6.2f} s")
    print(f"  {'whole run: wall / CPU (user+sys)':<48} {summary['wall']:6.2f} s / {summary['cpu']:.2f} s")
    print(f"  {'peak RSS':<48} {summary['peak_rss_gib']:6.2f} GiB")
    load = os.getloadavg()[0]
    result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, load average {load:.2f} at the end", "command": cmd[3:], "runs": runs,
              "median_phases": median, "median": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {args.out}")


if __name__ == "__main__":
    main()
