"""Outputs that load and serve everywhere: every folder lora_cli writes a tokenizer into (adapter, checkpoint, merged
model) names a tokenizer class transformers 4.x has too and carries the chat template in tokenizer_config.json as
well; adapters vLLM cannot serve are named when training starts."""

from __future__ import annotations

import json

import pytest

from .conftest import TINY_TRAIN, run_cli


def test_no_saved_file_names_tokenizers_backend(tiny_llama, chat_file, tmp_path):
    from transformers import AutoTokenizer

    from lora_cli.cli.merge import main as merge_main
    from lora_cli.cli.train import main as train_main

    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert run_cli(["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir", str(adapter),
                    *TINY_TRAIN, "--save_steps", "2"], main=train_main) == 0  # a checkpoint, checked too
    assert run_cli([str(adapter), str(merged), "--no-verify"], main=merge_main) == 0
    folders = [adapter, merged, *sorted(adapter.glob("checkpoint-*"))]
    assert len(folders) >= 3, folders
    source = AutoTokenizer.from_pretrained(tiny_llama)
    for folder in folders:
        for path in folder.rglob("*"):
            if path.is_file() and path.suffix in (".json", ".jinja", ".txt"):
                assert "TokenizersBackend" not in path.read_text(encoding="utf-8"), path
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert config["tokenizer_class"] == "PreTrainedTokenizerFast", folder
        assert config["chat_template"] == source.chat_template, folder  # TGI reads only tokenizer_config.json
        loaded = AutoTokenizer.from_pretrained(folder)
        assert loaded("Hello, naïve 12345")["input_ids"] == source("Hello, naïve 12345")["input_ids"]
        assert loaded.chat_template == source.chat_template


def test_adapters_vllm_cannot_serve_are_named_at_train_time(chat_file, tmp_path):
    from lora_cli.config import TrainConfig, parse_args
    from lora_cli.train.adapter import serving_traps

    base = ["--train_path", str(chat_file), "--output_dir", str(tmp_path / "adapter")]
    assert serving_traps(parse_args(base, cls=TrainConfig)) == []
    (dora,) = serving_traps(parse_args([*base, "--use_dora"], cls=TrainConfig))
    (both,) = serving_traps(parse_args([*base, "--use_dora", "--modules_to_save", "lm_head"], cls=TrainConfig))
    assert dora.startswith("--use_dora: vLLM cannot serve") and "lora-merge" in dora
    assert both.startswith("--use_dora and --modules_to_save:")


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_base_modifying_adapters_are_saved_as_plain_lora_on_the_original_base(init, tiny_llama, chat_file, tmp_path,
                                                                               capsys,
                                                                               monkeypatch):
    """PiSSA/OLoRA move part of the base into the adapter; the saved adapter is converted (peft's
    path_initial_model_for_weight_conversion) so that plain peft, lora-merge and lora-eval on the untouched base give
    the model as trained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_cli.cli.eval import main as eval_main
    from lora_cli.cli.merge import main as merge_main
    from lora_cli.cli.train import main as train_main
    from lora_cli.train import command

    ids = torch.tensor([[1, 42, 7, 300, 5, 99, 12, 4]])
    trained = {}
    real_run = command.run_training

    def run_and_record(cfg, trainer, *args, **kwargs):  # the logits of the model as trained, after the final save
        metrics = real_run(cfg, trainer, *args, **kwargs)
        trainer.model.eval()
        with torch.no_grad():
            trained["logits"] = trainer.model(input_ids=ids).logits
        return metrics

    monkeypatch.setattr(command, "run_training", run_and_record)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    assert run_cli(["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir", str(adapter),
                    *TINY_TRAIN, "--init_lora_weights", init, "--save_steps", "2"], main=train_main) == 0

    saved = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8"))
    assert (saved["init_lora_weights"], saved["r"], saved["lora_alpha"]) == (True, 8, 16)  # rank doubled, same scale
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    untouched = {k: v.clone() for k, v in base.state_dict().items()}
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
        served = peft_model(input_ids=ids).logits
    assert (trained["logits"] - base_logits).abs().max() > 1e-3  # training changed the model
    torch.testing.assert_close(served, trained["logits"], atol=1e-5, rtol=1e-5)
    for name, tensor in peft_model.get_base_model().state_dict().items():  # peft left the original base alone
        name = name.replace(".base_layer", "")
        if name in untouched:
            assert torch.equal(tensor, untouched[name]), name

    assert run_cli([str(adapter), str(merged), "--no-verify"], main=merge_main) == 0
    reference = peft_model.merge_and_unload().state_dict()
    ours = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32)
    for name, tensor in ours.state_dict().items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=1e-5, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, trained["logits"], atol=1e-5, rtol=1e-5)

    reports = {}
    for label, args in (("with", ["--adapter", str(adapter)]), ("without", ["--base_model", str(tiny_llama)])):
        out = tmp_path / f"eval_{label}.json"
        assert run_cli([*args, "--eval_path", str(chat_file), "--max_new_tokens", "4", "--output", str(out)],
                       main=eval_main) == 0
        reports[label] = json.loads(out.read_text(encoding="utf-8"))["models"]
    assert reports["with"][0]["name"] == reports["without"][0]["name"] == "base"
    assert reports["with"][0]["loss"] == pytest.approx(reports["without"][0]["loss"], rel=1e-6)  # untouched base
    assert reports["with"][1]["loss"] != pytest.approx(reports["with"][0]["loss"], rel=1e-4)

    # A checkpoint stays as trained, on the modified base: lora-merge leaves it to peft, which rebuilds that base,
    # and lora-eval refuses it (loading it would change the base its base row is scored on).
    checkpoint = adapter / "checkpoint-2"
    assert json.loads((checkpoint / "adapter_config.json").read_text(encoding="utf-8"))["init_lora_weights"] == init
    assert run_cli([str(checkpoint), str(tmp_path / "merged_checkpoint"), "--no-verify"], main=merge_main) == 0
    base = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    reference = PeftModel.from_pretrained(base, str(checkpoint)).merge_and_unload().state_dict()
    ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged_checkpoint", dtype=torch.float32).state_dict()
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, reference[name], atol=1e-6, rtol=1e-5, msg=name)
    assert run_cli(["--adapter", str(checkpoint), "--eval_path", str(chat_file), "--output",
                    str(tmp_path / "refused.json")], main=eval_main) == 2
    assert f"init_lora_weights {init}, right only on the base" in capsys.readouterr().err
