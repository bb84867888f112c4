"""lora-data's flags and the checks on them that need no tokenizer."""

from __future__ import annotations

import os
from dataclasses import dataclass

from ..config import data_file_problem, opt, refine, template_problems
from ..config.options import (DEMO_BASE, OWN_TEMPLATE, BaseModelOptions, RunOptions, TemplateOptions,
                              TrainDataOptions)


# Bases are listed last-group-first: a dataclass takes the fields of its bases in reverse order.
@dataclass
class DataConfig(TemplateOptions, TrainDataOptions, BaseModelOptions, RunOptions):
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
    train_path: str = refine(TrainDataOptions, "train_path", note="The data to check.")
    chat_template: str = refine(TemplateOptions, "chat_template", note=OWN_TEMPLATE)
    train_on_inputs: bool = refine(TrainDataOptions, "train_on_inputs", note="Checks the data as lora-train "
                                                                             "--train_on_inputs trains it.")

    # --- model -------------------------------------------------------------------------------------------------------
    base_model: str = refine(BaseModelOptions, "base_model", note="Only its tokenizer and chat template are loaded. "
                                                                  + DEMO_BASE)

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

    def problems(self) -> list[str]:
        problem = data_file_problem("train_path", self.train_path, required=True)
        errors: list[str] = [problem] if problem else []
        if self.show < 0:
            errors.append(f"--show: must be >= 0, got {self.show}")
        errors += template_problems(self)
        if self.report_dir and os.path.exists(self.report_dir) and not os.path.isdir(self.report_dir):
            errors.append(f"--report_dir {self.report_dir}: exists and is not a folder")
        return errors
