"""lora-data's flags and the checks on them that need no tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .. import chat
from ..config import data_file_problem, opt


@dataclass
class DataConfig:
    PROG = "lora-data"
    DESCRIPTION = ("Check a chat dataset before training and show exactly what lora-train will train on: every "
                   "row's schema, a few rows rendered with the trained tokens marked, token and mask statistics, "
                   "and (with --report_dir) histograms and a JSON report. Uses lora-train's own loading, chat "
                   "template, masking and --max_seq_length handling.")
    EPILOG = ("Exit status: 0 when lora-train can use the data (warnings allowed), 2 when it cannot. Example: "
              "lora-data --train_path data/sample/train.jsonl --report_dir runs/data_report && lora-train ...")
    GROUPS = {"data": "data and chat template (as in lora-train)", "model": "base model", "report": "report",
              "run": "run"}

    # --- data --------------------------------------------------------------------------------------------------------
    train_path: str = opt("", "Data to check (required): .jsonl/.json/.parquet/.csv with OpenAI messages, ShareGPT "
                              "conversations, Alpaca or prompt/completion rows.", group="data", metavar="FILE")
    max_seq_length: int = opt(2048, "Longest tokenised conversation trained on, as in lora-train.", group="data")
    truncation: str = opt("drop", "What lora-train does with conversations longer than --max_seq_length: drop or "
                                  "truncate them.", group="data", choices=("drop", "truncate"))
    chat_template: str = opt("", "Override the model's chat template: 'chatml' or a path to a .jinja file. Empty: "
                                 "the model's own (ChatML with a warning when it has none).", group="data",
                             metavar="NAME|PATH")
    chat_template_kwargs: str = opt("", chat.TEMPLATE_KWARGS_HELP, group="data", metavar="JSON")
    train_on_inputs: bool = opt(False, "Check the data as lora-train --train_on_inputs trains it: every token, not "
                                       "only the assistant turns.", group="data")

    # --- model -------------------------------------------------------------------------------------------------------
    base_model: str = opt("", "Base model whose tokenizer and chat template are used (only the tokenizer is loaded): "
                              "a Hub id, a local Hugging Face folder or a .gguf file. Empty: the embedded demo model "
                              "(SmolLM2-135M-Instruct, works offline).", group="model", metavar="MODEL")
    trust_remote_code: bool = opt(False, "Run tokenizer code shipped with the model repository.", group="model")

    # --- report ------------------------------------------------------------------------------------------------------
    show: int = opt(3, "Print this many rows as the model sees them, trained tokens marked (0: none).",
                    group="report", metavar="N")
    show_ids: bool = opt(False, "Also print the token ids on both sides of each trained span in the shown rows.",
                         group="report")
    report_dir: str = opt("", "Write data_report.json (every statistic and problem) and the histograms "
                              "token_lengths.png and trained_fraction.png into this folder.", group="report",
                          metavar="DIR")
    color: str = opt("auto", "Mark trained tokens with colour (auto: when printing to a terminal and NO_COLOR is "
                             "unset). Without colour, trained text is wrapped in [[ ]].", group="report",
                     choices=("auto", "always", "never"))

    # --- run ---------------------------------------------------------------------------------------------------------
    debug: bool = opt(False, "Show full tracebacks and library warnings.", group="run")

    def problems(self) -> list[str]:
        problem = data_file_problem("train_path", self.train_path, required=True)
        errors: list[str] = [problem] if problem else []
        if self.max_seq_length <= 0:
            errors.append(f"--max_seq_length: must be > 0, got {self.max_seq_length}")
        if self.show < 0:
            errors.append(f"--show: must be >= 0, got {self.show}")
        if self.chat_template and self.chat_template != "chatml" and not os.path.isfile(self.chat_template):
            errors.append(f"--chat_template: {self.chat_template!r} is neither 'chatml' nor an existing .jinja file")
        errors += [p for p in [chat.template_kwargs_problem(self.chat_template_kwargs)] if p]
        if self.report_dir and os.path.exists(self.report_dir) and not os.path.isdir(self.report_dir):
            errors.append(f"--report_dir {self.report_dir}: exists and is not a folder")
        return errors
