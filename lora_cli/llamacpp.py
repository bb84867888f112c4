"""llama.cpp itself, run on a GGUF file: its tokenizer, next-token logits and greedy chat answers.

A second reader of GGUF (transformers' own) accepts files that llama.cpp refuses, so the judge of an export is
llama.cpp. It runs through npm's node-llama-cpp, whose prebuilt CPU binaries need no compiler:
scripts/fetch_llama_cpp.sh installs it into the cache below, or LORA_CLI_LLAMA_CPP names a folder where
`npm install node-llama-cpp` was run. The work is done by llamacpp_runner.mjs, one JSON job in, one JSON result out.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import RunFailure

VERSION = "3.22.1"
RUNNER = Path(__file__).with_name("llamacpp_runner.mjs")
FETCH_HINT = "bash scripts/fetch_llama_cpp.sh (needs node and npm), or set LORA_CLI_LLAMA_CPP"


def assets_dir() -> Path:
    """Where test assets (llama.cpp, tokenizers) are cached: $LORA_CLI_TEST_ASSETS, else <cache>/test-assets."""
    from .models import cache_dir

    given = os.environ.get("LORA_CLI_TEST_ASSETS")
    return Path(given).expanduser() if given else cache_dir() / "test-assets"


def install_dir() -> Path:
    given = os.environ.get("LORA_CLI_LLAMA_CPP")
    return Path(given).expanduser() if given else assets_dir() / "llama-cpp"


@dataclass(frozen=True)
class Runtime:
    node: str
    module_dir: Path  # the folder whose node_modules holds node-llama-cpp
    version: str


def find() -> Runtime | str:
    """The installed llama.cpp, or why there is none (a sentence naming how to get it)."""
    node = shutil.which("node")
    if node is None:
        return f"node is not installed; install Node.js 20+, then {FETCH_HINT}"
    folder = install_dir()
    package = folder / "node_modules" / "node-llama-cpp" / "package.json"
    if not package.is_file():
        return f"node-llama-cpp is not installed in {folder}; run {FETCH_HINT}"
    try:
        version = json.loads(package.read_text(encoding="utf-8"))["version"]
    except (OSError, ValueError, KeyError) as exc:
        return f"{package} cannot be read ({exc}); run {FETCH_HINT} again"
    return Runtime(node, folder, version)


@dataclass
class Answer:
    text: str
    prompt: list[int]  # the prompt as llama.cpp rendered it with the GGUF's chat template and tokenised it
    tokens: list[int]  # the answer, without the end-of-generation token that stopped it


@dataclass
class Result:
    metadata: dict[str, Any]  # architecture, pre-tokenizer and special ids as llama.cpp read them
    tokens: list[list[int]] = field(default_factory=list)  # per text of `tokenize`
    top: list[list[list[tuple[int, float]]]] = field(default_factory=list)  # per sequence, per position: (id, logit)
    answers: list[Answer] = field(default_factory=list)  # per chat


def run(runtime: Runtime, gguf: Path, *, tokenize: list[str] = (), sequences: list[list[int]] = (),
        chats: list[list[dict]] = (), max_tokens: int = 32, top_k: int = 5, threads: int | None = None,
        timeout: float = 1800) -> Result:
    """Load `gguf` in llama.cpp (CPU) and: tokenise texts (special tokens parsed, nothing added), give the top_k next
    tokens after every position of each token sequence, and answer each chat greedily with the GGUF's own chat
    template (the last message is the user's prompt). RunFailure, with llama.cpp's own error, if it cannot load."""
    job = {"module_dir": str(runtime.module_dir), "model": str(Path(gguf).resolve()), "tokenize": list(tokenize),
           "sequences": [list(map(int, s)) for s in sequences], "chats": list(chats), "max_tokens": max_tokens,
           "top_k": top_k, "threads": threads or default_threads()}
    try:
        proc = subprocess.run([runtime.node, str(RUNNER)], input=json.dumps(job), capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RunFailure(f"llama.cpp: no answer on {gguf} within {timeout:.0f} s") from None
    try:
        out = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        detail = (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]
        raise RunFailure(f"llama.cpp runner failed (exit {proc.returncode}): {detail}") from None
    if "error" in out:
        said = "; ".join(dict.fromkeys(line for line in out.get("log", []) if line)) or out["error"]
        raise RunFailure(f"llama.cpp cannot load {gguf.name}: {' '.join(said.split())[:400]}")
    return Result(out["metadata"], out["tokens"], [[[(int(i), float(v)) for i, v in p["top"]] for p in seq]
                                                   for seq in out["next"]],
                  [Answer(a["text"], a["prompt"], a["tokens"]) for a in out["answers"]])


def default_threads() -> int:
    """$LORA_CLI_LLAMA_CPP_THREADS, else the cores this process may use: llama.cpp's threads spin while they wait,
    so more threads than free cores makes it far slower, not faster."""
    given = os.environ.get("LORA_CLI_LLAMA_CPP_THREADS")
    if given and given.isdigit() and int(given) > 0:
        return int(given)
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)
