"""lora-eval's flags and the checks on them that need no model."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..adapters import read_adapter
from ..config import data_file_problem, opt, refine, split_list, template_problems
from ..config.options import (QUANTIZATIONS, BaseModelOptions, ComputeOptions, EvalDataOptions, RunOptions,
                              TemplateOptions)
from ..errors import UsageError


# Bases are listed last-group-first: a dataclass takes the fields of its bases in reverse order.
@dataclass
class EvalConfig(TemplateOptions, EvalDataOptions, ComputeOptions, BaseModelOptions, RunOptions):
    PROG = "lora-eval"
    DESCRIPTION = ("Compare a base model with LoRA adapters on held-out chat data, on the same rows: assistant-token "
                   "loss and perplexity exactly as lora-train computes them, and answers to each row's final "
                   "assistant turn (greedy by default) scored by exact match, contains-match and ROUGE-L.")
    EPILOG = ("Example: lora-eval --adapter runs/demo --eval_path data/sample/eval.jsonl --output "
              "runs/demo-eval/report.json")
    GROUPS = {"run": "run", "model": "models", "data": "data and chat template", "generation": "generation"}

    # --- run ---------------------------------------------------------------------------------------------------------
    output: str = opt("report.json", "Where the JSON report with every number is written; generations.jsonl (each "
                                     "row's prompt, reference and every model's answer) goes into the same folder.",
                      group="run", metavar="FILE")

    # --- models ------------------------------------------------------------------------------------------------------
    base_model: str = refine(BaseModelOptions, "base_model", note="A merged model too. Empty: the base the adapters "
                                                                  "record, else the embedded demo model.")
    adapter: str = opt("", "LoRA adapter folder (as written by lora-train) to evaluate on the base model. Repeat the "
                           "flag, or give a comma-separated list, to compare several.", group="model",
                       metavar="DIR", repeatable=True)
    quantization: str = refine(ComputeOptions, "quantization", default="auto", choices=("auto", *QUANTIZATIONS),
                               note="auto: as the adapters were trained; none (or --no-load_in_4bit) evaluates on "
                                    "full-precision weights.")

    # --- data --------------------------------------------------------------------------------------------------------
    eval_path: str = refine(EvalDataOptions, "eval_path", note="Required.")
    limit: int = opt(0, "Evaluate only the first N rows of --eval_path (0: all).", group="data")
    truncation: str = refine(TemplateOptions, "truncation", note="Dropped rows are left out of every metric.")
    chat_template: str = refine(TemplateOptions, "chat_template", note="Empty: the template the adapters were "
                                                                       "trained with (saved with their tokenizer), "
                                                                       "else the base model's.")
    chat_template_kwargs: str = refine(TemplateOptions, "chat_template_kwargs", note="Empty: those the adapter was "
                                                                                     "trained with (its run config), "
                                                                                     "else none.")

    # --- generation --------------------------------------------------------------------------------------------------
    max_new_tokens: int = opt(256, "Longest generated answer, in tokens; generation also stops at the chat "
                                   "template's end-of-turn token and at EOS.", group="generation")
    batch_size: int = opt(8, "Rows per forward pass, for the loss and for generation.", group="generation")
    temperature: float = opt(0.0, "Sampling temperature; 0 decodes greedily.", group="generation")
    top_p: float = opt(1.0, "Nucleus sampling threshold (with --temperature > 0).", group="generation")
    seed: int = opt(42, "Random seed for sampling.", group="generation")

    @property
    def adapter_paths(self) -> list[str]:
        return split_list(self.adapter)

    def problems(self) -> list[str]:
        problem = data_file_problem("eval_path", self.eval_path, required=True)
        errors: list[str] = [problem] if problem else []
        paths = self.adapter_paths
        errors += [f"--adapter {p}: given twice" for p in dict.fromkeys(paths) if paths.count(p) > 1]
        for path in dict.fromkeys(paths):
            try:
                init = read_adapter(path, "--adapter").base_modifying_init
            except UsageError as exc:
                errors.append(str(exc))
                continue
            if init:  # loading it modifies the base the base row is scored on
                errors.append(f"--adapter {path}: saved as trained with init_lora_weights {init}, right only on the "
                              "base that modified; evaluate the final adapter lora-train saves (converted to plain "
                              "LoRA), not a checkpoint")
        for name in ("batch_size", "max_new_tokens"):
            if getattr(self, name) <= 0:
                errors.append(f"--{name}: must be > 0, got {getattr(self, name)}")
        if self.limit < 0:
            errors.append(f"--limit: must be >= 0 (0: every row), got {self.limit}")
        if self.temperature < 0:
            errors.append(f"--temperature: must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            errors.append(f"--top_p: must be in (0, 1], got {self.top_p}")
        errors += template_problems(self)
        if not self.output:
            errors.append("--output: empty; give the report's file name, e.g. report.json")
        elif os.path.isdir(self.output):
            errors.append(f"--output {self.output}: is a folder; give the report's file name, e.g. "
                          f"{os.path.join(self.output, 'report.json')}")
        return errors
