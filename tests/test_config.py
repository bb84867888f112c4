"""The typed config: flags, YAML, precedence, validation (all at once, naming the flag), --help, configs/."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import yaml

from lora_cli import config
from lora_cli.errors import UsageError

from .conftest import ROOT, run_cli

# Every flag of the single-file train_lora.py this tool replaces (shared/ORIGIN.md), with a value.
ORIGIN_FLAGS = {"base_model": "Qwen/Qwen2.5-7B-Instruct", "eval_path": "", "max_seq_length": "1024",
                "learning_rate": "2e-4", "num_train_epochs": "2", "batch_size": "2", "gradient_accumulation_steps": "8",
                "save_steps": "50", "logging_steps": "5", "seed": "7", "lora_r": "8", "lora_alpha": "16",
                "lora_dropout": "0.1"}


@pytest.fixture()
def data_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n')
    return path


def base_args(data_file, tmp_path):
    return ["--train_path", str(data_file), "--output_dir", str(tmp_path / "out")]


def test_origin_script_flags_still_work(data_file, tmp_path):
    argv = base_args(data_file, tmp_path)
    for key, value in ORIGIN_FLAGS.items():
        argv += [f"--{key}", value]
    cfg = config.parse_args(argv)
    assert (cfg.max_seq_length, cfg.learning_rate, cfg.num_train_epochs, cfg.batch_size) == (1024, 2e-4, 2.0, 2)
    assert (cfg.gradient_accumulation_steps, cfg.save_steps, cfg.logging_steps, cfg.seed) == (8, 50, 5, 7)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (8, 16, 0.1)


def test_defaults_match_the_origin_script(data_file, tmp_path):
    cfg = config.parse_args(base_args(data_file, tmp_path))
    assert (cfg.max_seq_length, cfg.learning_rate, cfg.num_train_epochs, cfg.batch_size) == (2048, 1e-4, 3.0, 1)
    assert (cfg.gradient_accumulation_steps, cfg.save_steps, cfg.logging_steps, cfg.seed) == (4, 100, 10, 42)
    assert (cfg.lora_r, cfg.lora_alpha, cfg.lora_dropout) == (16, 32, 0.05)
    assert cfg.optim == "paged_adamw_32bit" and cfg.lr_scheduler_type == "cosine" and cfg.warmup_ratio == 0.03
    assert cfg.trust_remote_code is False and cfg.train_on_inputs is False


def test_yaml_sets_values_and_flags_win(data_file, tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text(yaml.safe_dump({"lora_r": 4, "learning_rate": 3e-4, "packing": True, "train_path": str(data_file),
                                   "output_dir": str(tmp_path / "o"), "target_modules": ["q_proj", "v_proj"]}))
    cfg = config.parse_args(["--config", str(yml), "--lora_r", "32", "--no-packing"])
    assert cfg.lora_r == 32 and cfg.packing is False  # flags override the file
    assert cfg.learning_rate == 3e-4 and cfg.target_modules == "q_proj,v_proj"  # the file overrides defaults
    assert cfg.lora_alpha == 32  # untouched default


def test_unknown_yaml_key_and_flag_fail_naming_them(data_file, tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("lora_rank: 8\nlearning_rate: fast\n")
    with pytest.raises(UsageError) as exc:
        config.parse_args(["--config", str(yml), "--lr", "1"] + base_args(data_file, tmp_path))
    text = str(exc.value)
    assert "unknown key 'lora_rank'" in text and "did you mean lora_r" in text
    assert "learning_rate: expected a number, got 'fast'" in text
    assert "unknown flag --lr" in text


def test_all_problems_reported_at_once_naming_flags(tmp_path):
    with pytest.raises(UsageError) as exc:
        config.parse_args(["--lora_r", "0", "--precision", "fp8", "--load_in_4bit", "--load_in_8bit",
                           "--val_split", "1.5", "--train_path", str(tmp_path / "missing.jsonl"), "--batch_size", "x"])
    lines = str(exc.value).splitlines()
    expected = ["--output_dir is required", "--train_path: file not found", "--lora_r: must be > 0",
                "--precision: 'fp8' is not one of", "--load_in_4bit and --load_in_8bit", "--val_split: must be in",
                "--batch_size: expected an integer"]
    for phrase in expected:
        assert any(phrase in line for line in lines), phrase
    assert lines[0].startswith(f"{len(lines) - 1} problems")


def test_cli_usage_error_exits_2_with_one_line_per_problem(capsys, tmp_path):
    assert run_cli(["--train_path", str(tmp_path / "nope.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lora-train: error:") and "Traceback" not in err
    assert "--output_dir is required" in err and "--train_path: file not found" in err


def test_help_documents_every_flag_quickly():
    # A subprocess, as a user runs it: --help must not import torch (instant) and must list every config field.
    code = ("import sys, lora_cli.cli.train as t\n"
            "try:\n    t.main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print('TORCH_LOADED' if 'torch' in sys.modules else 'NO_TORCH')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "NO_TORCH" in out
    for f in dataclasses.fields(config.TrainConfig):
        assert f"--{f.name}" in out, f.name


def test_saved_run_config_is_a_valid_config(data_file, tmp_path):
    cfg = config.parse_args(base_args(data_file, tmp_path) + ["--lora_r", "8", "--use_rslora"])
    saved = tmp_path / "run_config.yaml"
    config.save(cfg, saved)
    again = config.parse_args(["--config", str(saved)])
    assert config.to_dict(again) == config.to_dict(cfg)
    assert "config" not in yaml.safe_load(saved.read_text())


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)  # configs name repo-relative data paths
    data = yaml.safe_load(path.read_text())
    command = next(line for line in path.read_text().splitlines() if "lora-train --config" in line)
    assert f"configs/{path.name}" in command  # each file is headed by the exact command that runs it
    argv = ["--config", str(path)]
    if not data.get("train_path"):
        argv += ["--train_path", str(ROOT / "data/sample/train.jsonl")]
    if not data.get("output_dir"):
        argv += ["--output_dir", str(tmp_path / "out")]
    cfg = config.parse_args(argv)
    for key, value in data.items():
        assert config.to_dict(cfg)[key] == value


def _command_configs():
    from lora_cli.datareport import DataConfig
    from lora_cli.evaluate import EvalConfig
    from lora_cli.export import ExportConfig
    from lora_cli.merge import MergeConfig

    return [config.TrainConfig, EvalConfig, DataConfig, MergeConfig, ExportConfig]


def test_shared_options_are_one_declaration_in_every_command():
    # A flag several commands take has one type, choices and metavar everywhere (only the help's note may differ):
    # lora-eval accepts --attn_implementation auto as lora-train does.
    from lora_cli.config.fields import types

    seen: dict[str, tuple] = {}
    for cls in _command_configs():
        kinds = types(cls)
        for f in dataclasses.fields(cls):
            shape = (kinds[f.name], f.metadata["metavar"], f.metadata["switches"], set(f.metadata["choices"] or ()))
            if f.name in seen and f.name != "adapter":  # lora-eval compares several, lora-train starts from one
                assert seen[f.name][:3] == shape[:3], (cls.PROG, f.name)
                # a command may add a choice (lora-eval's --quantization auto: as the adapters were trained)
                assert seen[f.name][3] <= shape[3] or shape[3] <= seen[f.name][3], (cls.PROG, f.name)
            seen.setdefault(f.name, shape)
    assert "auto" in seen["attn_implementation"][3]


def test_cli_only_and_resumable_are_field_metadata(data_file, tmp_path):
    from lora_cli import checkpoints

    cli_only = config.cli_only(config.TrainConfig)
    assert {"config", "debug", "dry_run", "resume", "resume_from_checkpoint", "resume_force"} == cli_only
    cfg = config.parse_args(base_args(data_file, tmp_path) + ["--dry_run", "--debug"])
    assert not cli_only & set(config.to_dict(cfg))  # flags only: never saved
    yml = tmp_path / "c.yaml"
    yml.write_text("resume: true\n")
    with pytest.raises(UsageError, match="unknown key 'resume'"):  # nor YAML keys
        config.parse_args(["--config", str(yml)] + base_args(data_file, tmp_path))
    saved = config.to_dict(cfg)
    changed = {**saved, "save_steps": 7, "attn_implementation": "eager", "lora_r": 4}
    assert checkpoints.resume_problems(saved, changed, {}, {}) == ["lora_r: 16 -> 4"]


@pytest.mark.parametrize(("flags", "expected", "typed"), [
    ([], "none", "--quantization"), (["--quantization", "4bit"], "4bit", "--quantization"),
    (["--load_in_4bit"], "4bit", "--load_in_4bit"), (["--load_in_8bit"], "8bit", "--load_in_8bit"),
    (["--no-load_in_4bit"], "none", "--no-load_in_4bit"), (["--load_in_4bit", "--quantization", "4bit"], "4bit", None),
])
def test_quantization_is_one_value_with_the_old_flags_as_aliases(data_file, tmp_path, flags, expected, typed):
    cfg = config.parse_args(base_args(data_file, tmp_path) + flags)
    assert cfg.quantization == expected
    assert "load_in_4bit" not in config.to_dict(cfg) and config.to_dict(cfg)["quantization"] == expected
    if typed:
        assert config.typed(cfg, "quantization") == typed  # errors name the flag as typed


def test_conflicting_quantization_flags_are_reported_by_the_names_typed(data_file, tmp_path):
    with pytest.raises(UsageError) as exc:
        config.parse_args(base_args(data_file, tmp_path) + ["--quantization", "8bit", "--load_in_4bit",
                                                            "--init_lora_weights", "pissa"])
    assert "--quantization and --load_in_4bit both set: choose one" in str(exc.value)
    with pytest.raises(UsageError, match="drop --load_in_8bit"):
        config.parse_args(base_args(data_file, tmp_path) + ["--load_in_8bit", "--init_lora_weights", "olora"])


def test_old_run_config_with_load_in_bools_still_loads(data_file, tmp_path):
    # A run config saved before `quantization` existed: lora-train --config, --resume and the adapter readers take it.
    from lora_cli import checkpoints
    from lora_cli.adapters import Adapter

    cfg = config.parse_args(base_args(data_file, tmp_path) + ["--load_in_4bit"])
    old = {k: v for k, v in config.to_dict(cfg).items() if k != "quantization"}
    for four, eight, expected in ((True, False, "4bit"), (False, True, "8bit"), (False, False, "none")):
        saved = tmp_path / f"old-{expected}.yaml"
        saved.write_text(yaml.safe_dump({**old, "load_in_4bit": four, "load_in_8bit": eight}))
        again = config.parse_args(["--config", str(saved)])
        assert again.quantization == expected
        assert config.to_dict(again) == {**config.to_dict(cfg), "quantization": expected}
        upgraded = config.runfile.upgrade(yaml.safe_load(saved.read_text()))
        assert Adapter(tmp_path, {}, upgraded).quantization == (None if expected == "none" else expected)
    # Resuming an old run with the same settings is no change, also when it predates a setting (then at its default).
    old_4bit = config.runfile.upgrade({**old, "load_in_4bit": True, "load_in_8bit": False})
    assert checkpoints.resume_problems(old_4bit, config.to_dict(cfg), {}, {}) == []
    before_trainer_args = {k: v for k, v in old_4bit.items() if k != "trainer_args"}
    assert checkpoints.resume_problems(before_trainer_args, config.to_dict(cfg), {}, {}) == []
    saved.write_text(yaml.safe_dump({**old, "load_in_4bit": True, "load_in_8bit": True}))
    with pytest.raises(UsageError, match="--load_in_4bit and --load_in_8bit both set"):
        config.parse_args(["--config", str(saved)])


def test_trl_names_are_aliases(data_file, tmp_path):
    # The names users bring from TRL/transformers scripts, as flags and as YAML keys, set our fields.
    cfg = config.parse_args(base_args(data_file, tmp_path) + [
        "--max_length", "512", "--per_device_train_batch_size", "2", "--lora_target_modules", "q_proj,v_proj",
        "--model_name_or_path", "some/model", "--no-assistant_only_loss", "--lora_modules_to_save", "lm_head"])
    assert (cfg.max_seq_length, cfg.batch_size, cfg.target_modules) == (512, 2, "q_proj,v_proj")
    assert (cfg.base_model, cfg.train_on_inputs, cfg.modules_to_save) == ("some/model", True, "lm_head")
    assert config.parse_args(base_args(data_file, tmp_path) + ["--assistant_only_loss"]).train_on_inputs is False
    yml = tmp_path / "trl.yaml"
    yml.write_text(yaml.safe_dump({"max_length": 256, "lora_target_modules": ["q_proj"], "assistant_only_loss": False,
                                   "per_device_train_batch_size": 3}))
    cfg = config.parse_args(["--config", str(yml)] + base_args(data_file, tmp_path))
    assert (cfg.max_seq_length, cfg.target_modules, cfg.train_on_inputs, cfg.batch_size) == (256, "q_proj", True, 3)
    assert "max_length" not in config.to_dict(cfg)  # saved under our names
    # Errors name the flag as typed.
    with pytest.raises(UsageError) as exc:
        config.parse_args(base_args(data_file, tmp_path) + ["--max_length", "0", "--per_device_train_batch_size", "0"])
    assert "--max_length: must be > 0" in str(exc.value)
    assert "--per_device_train_batch_size: must be > 0" in str(exc.value)
    # lora-eval and lora-data share the option groups, and so the aliases.
    from lora_cli.datareport import DataConfig

    data = config.parse_args(["--train_path", str(data_file), "--max_length", "64", "--assistant_only_loss"],
                             cls=DataConfig)
    assert (data.max_seq_length, data.train_on_inputs) == (64, False)


def test_trainer_args_pass_through_checked_against_trl(data_file, tmp_path):
    cfg = config.parse_args(base_args(data_file, tmp_path) + ["--trainer_args",
                                                              "neftune_noise_alpha=5,eval_strategy=no"])
    assert config.trainer_args.parse(cfg.trainer_args)[0] == {"neftune_noise_alpha": 5, "eval_strategy": "no"}
    assert config.trainer_args.apply(cfg, {"eval_strategy": "steps", "seed": 1}) == \
        {"eval_strategy": "no", "seed": 1, "neftune_noise_alpha": 5}
    json_cfg = config.parse_args(base_args(data_file, tmp_path) + ["--trainer_args", '{"neftune_noise_alpha": 5}'])
    assert config.trainer_args.parse(json_cfg.trainer_args)[0] == {"neftune_noise_alpha": 5}
    yml = tmp_path / "c.yaml"
    yml.write_text(yaml.safe_dump({"trainer_args": {"neftune_noise_alpha": 5}}))
    from_yaml = config.parse_args(["--config", str(yml)] + base_args(data_file, tmp_path))
    assert config.trainer_args.parse(from_yaml.trainer_args)[0] == {"neftune_noise_alpha": 5}
    saved = tmp_path / "run_config.yaml"
    config.save(from_yaml, saved)
    assert config.to_dict(config.parse_args(["--config", str(saved)])) == config.to_dict(from_yaml)
    # DPO fields are checked against DPOConfig, not SFTConfig.
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    dpo = config.parse_args(["--train_path", str(pairs), "--output_dir", str(tmp_path / "o"), "--method", "dpo",
                             "--trainer_args", "label_smoothing=0.1"])
    assert config.trainer_args.parse(dpo.trainer_args)[0] == {"label_smoothing": 0.1}
    with pytest.raises(UsageError, match="label_smoothing: not a field of TRL's SFTConfig"):
        config.parse_args(base_args(data_file, tmp_path) + ["--trainer_args", "label_smoothing=0.1"])


def test_unknown_trainer_args_name_is_one_line_exit_2(data_file, tmp_path, capsys):
    assert run_cli(base_args(data_file, tmp_path) + ["--trainer_args", "neftune_alpha=5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["lora-train: error: --trainer_args neftune_alpha: not a field of TRL's SFTConfig "
                   "(did you mean neftune_noise_alpha?)"]
    with pytest.raises(UsageError) as exc:
        config.parse_args(base_args(data_file, tmp_path) + ["--trainer_args", "learning_rate=1,max_length=9,oops"])
    assert "--trainer_args: 'oops' is not name=value" in str(exc.value)
    with pytest.raises(UsageError) as exc:
        config.parse_args(base_args(data_file, tmp_path) + ["--trainer_args", "learning_rate=1,max_length=9"])
    assert "--trainer_args learning_rate: lora-train's own --learning_rate" in str(exc.value)
    assert "--trainer_args max_length: lora-train's own --max_seq_length" in str(exc.value)
