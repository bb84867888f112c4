"""lora-train on tiny random models: what changes, what is saved, and that it reloads to the same model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lora_cli import attention, config, models
from lora_cli.chat import encode
from lora_cli.train import attach_lora, build_trainer, prepare, step_plan, training_only

from .conftest import CHAT, INST_TEMPLATE, TINY_TRAIN, ROOT, run_cli, write_jsonl


def build(base: str, data, out, *extra: str):
    cfg = config.parse_args(["--base_model", str(base), "--train_path", str(data), "--output_dir", str(out),
                             *TINY_TRAIN, *extra])
    prepared = prepare(cfg)
    model = models.load_model(prepared.base, precision="fp32", quantization=cfg.quantization)
    model = attach_lora(model, cfg)
    plan = step_plan(cfg, model, "fp32", prepared.train_stats)
    settings = training_only(model, plan, "fp32", cfg.use_dora, cheaper_dropout=cfg.method == "sft")
    settings.__enter__()  # left on while the trainer lives: these tests look at the model as it trains
    trainer = build_trainer(cfg, model, prepared, plan, "fp32")
    trainer.test_keeps_alive = settings  # a dropped generator would run its finally and undo the settings
    return cfg, prepared, trainer


def snapshot(model) -> dict[str, torch.Tensor]:
    # Raw bytes: 4-bit weights are packed into float storage, where some bit patterns read as NaN (NaN != NaN).
    return {name: p.detach().clone().contiguous().view(torch.uint8) for name, p in model.named_parameters()}


def logits(model, ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_training_changes_lora_weights_only(tiny_llama, chat_file, tmp_path):
    _, _, trainer = build(tiny_llama, chat_file, tmp_path / "out")
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    lora = [n for n in before if "lora_" in n]
    assert lora and all(not torch.equal(before[n], after[n]) for n in lora)
    base = [n for n in before if "lora_" not in n]
    assert base and all(torch.equal(before[n], after[n]) for n in base)
    assert all(not p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" not in n)


def test_saved_adapter_reloads_with_same_logits(tiny_llama, chat_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _, prepared, trainer = build(tiny_llama, chat_file, tmp_path / "out")
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    ids = torch.tensor([prepared.train["input_ids"][0]])
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), tmp_path / "adapter")
    expected = logits(trainer.model, ids)
    torch.testing.assert_close(logits(reloaded, ids), expected, rtol=1e-5, atol=1e-5)
    # ... and the adapter matters: the bare base model gives other logits.
    assert not torch.allclose(logits(AutoModelForCausalLM.from_pretrained(tiny_llama), ids), expected, atol=1e-3)


def test_qlora_4bit_trains_on_cpu(tiny_llama, chat_file, tmp_path):
    _, _, trainer = build(tiny_llama, chat_file, tmp_path / "out", "--load_in_4bit")
    assert any(type(m).__name__ == "Linear4bit" for m in trainer.model.modules())
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n)
    assert trainer.state.log_history[0]["loss"] > 0


def test_qlora_gradients_on_cpu_are_the_same_after_an_evaluation(tiny_llama, chat_file, tmp_path):
    # bitsandbytes repacks 4-bit weights at an eval-mode forward on CPUs with AVX512-BF16, for a kernel without a
    # backward: LoRA gradients were 17-47% off afterwards (lora-train evaluates before training and every eval_steps)
    _, _, trainer = build(tiny_llama, chat_file, tmp_path / "out", "--load_in_4bit", "--lora_dropout", "0")
    model = trainer.model
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    for module in model.modules():  # B random, so that every LoRA gradient depends on the base layers' backward
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.02)

    def gradients():
        model.train()
        model.zero_grad()
        trainer.compute_loss(model, batch).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = gradients()
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    layers = [m for m in model.modules() if type(m).__name__ == "Linear4bit"]
    assert layers and not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers)
    after = gradients()
    assert before.keys() == after.keys() and all(g.abs().sum() > 0 for g in before.values())
    for name, grad in before.items():
        torch.testing.assert_close(after[name], grad, msg=name)


def test_packed_rows_do_not_attend_to_each_other(tiny_llama, tokenizer):
    # The padding-free batch --packing produces: logits of each row equal those of the row alone. transformers only
    # separates packed rows when no KV cache is in use; TRL's compute_loss passes use_cache=False, as done here.
    from transformers import AutoModelForCausalLM
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa").eval()
    rows = [encode(tokenizer, CHAT), encode(tokenizer, CHAT[1:3])]
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(
        [{"input_ids": r.input_ids, "labels": r.labels} for r in rows])
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        n = len(rows[0].input_ids)
        for part, row in ((packed[:n], rows[0]), (packed[n:], rows[1])):
            alone = model(input_ids=torch.tensor([row.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(part, alone, atol=1e-4, rtol=1e-4)


def test_padded_padding_free_and_packed_batches_give_the_same_loss(tiny_llama, chat_file, tmp_path):
    _, prepared, padded = build(tiny_llama, chat_file, tmp_path / "a", "--tokens_per_batch", "0")
    _, _, free = build(tiny_llama, chat_file, tmp_path / "b")  # the default: padding-free micro-batches
    _, _, packed = build(tiny_llama, chat_file, tmp_path / "c", "--packing")
    assert not padded.data_collator.padding_free and free.data_collator.padding_free
    assert free.model.get_base_model().config._attn_implementation == attention.NAME  # sdpa once per conversation
    assert padded.model.get_base_model().config._attn_implementation == "sdpa"
    examples = [{"input_ids": prepared.train["input_ids"][i], "labels": prepared.train["labels"][i]} for i in (0, 3)]
    losses = []
    for trainer in (padded, free, packed):
        trainer.model.eval()
        with torch.no_grad():
            losses.append(trainer.compute_loss(trainer.model, trainer.data_collator(examples)))
    # TRL's fused LM head (logits only at trained positions, in tiles) against the plain full-logits loss.
    batch = padded.data_collator(examples)
    with torch.no_grad():
        plain = padded.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             labels=batch["labels"], use_cache=False).loss
    for loss in losses:
        torch.testing.assert_close(loss, plain, atol=1e-5, rtol=1e-5)


def test_compact_loss_and_trls_fused_head_equal_the_plain_loss_and_gradients(tiny_llama, chat_file, tmp_path,
                                                                             monkeypatch):
    import lora_cli.train.trainer as train_module

    _, prepared, trainer = build(tiny_llama, chat_file, tmp_path / "out", "--lora_dropout", "0")
    model = trainer.model
    with torch.no_grad():  # non-zero adapter weights, so that every adapter matrix gets a gradient
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    batch = trainer.data_collator([prepared.train[i] for i in range(4)])
    assert train_module.compact_loss_positions(model, batch) is not None  # on CPU: lora-train's compact loss

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    plain = loss_and_grads(lambda: model(**batch, use_cache=False).loss)  # full logits, transformers' loss
    compact = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)))
    monkeypatch.setattr(train_module, "COMPACT_LOGITS_LIMIT", 0)  # what GPUs use: TRL's tiled head
    assert train_module.compact_loss_positions(model, batch) is None
    fused = loss_and_grads(lambda: trainer.compute_loss(model, dict(batch)))
    for loss, grads in (compact, fused):
        torch.testing.assert_close(loss, plain[0], atol=1e-5, rtol=1e-5)
        for name, grad in plain[1].items():
            torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-4)
    assert trainer._metrics["train"]["mean_token_accuracy"]  # the compact loss logs TRL's metrics too
    # MoE models keep TRL's head, which adds the router's load-balancing loss.
    monkeypatch.setattr(train_module, "COMPACT_LOGITS_LIMIT", 1 << 27)
    monkeypatch.setattr(trainer, "aux_loss_enabled", True)
    monkeypatch.setattr(train_module, "compact_loss_positions", lambda *a: pytest.fail("compact loss used for MoE"))
    from trl import SFTTrainer

    monkeypatch.setattr(SFTTrainer, "compute_loss", lambda self, *a, **k: torch.tensor(1.0))
    assert float(trainer.compute_loss(model, dict(batch))) == 1.0


def test_training_only_settings_are_undone_after_training(tiny_llama, chat_file, tmp_path):
    cfg = config.parse_args(["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir",
                             str(tmp_path / "o"), *TINY_TRAIN, "--lora_dropout", "0.1"])
    prepared = prepare(cfg)
    model = attach_lora(models.load_model(prepared.base, precision="bf16"), cfg)
    plan = step_plan(cfg, model, "bf16", prepared.train_stats)
    flags = lambda: {m.cast_input_dtype_enabled for m in model.modules() if hasattr(m, "cast_input_dtype_enabled")}
    dropouts = lambda: {type(d).__name__ for m in model.modules() if hasattr(m, "lora_dropout")
                        for d in m.lora_dropout.values()}
    swapped_mlps = lambda: sum("forward" in m.__dict__ for m in model.modules() if hasattr(m, "gate_proj"))
    assert dropouts() == {"Dropout"} and swapped_mlps() == 0
    with pytest.raises(RuntimeError, match="training failed"), training_only(model, plan, "bf16", False,
                                                                                cheaper_dropout=True) as per_seq:
        build_trainer(cfg, model, prepared, plan, "bf16")
        assert per_seq and model.get_base_model().config._attn_implementation == attention.NAME
        assert flags() == {False}
        assert dropouts() == {"UniformMaskDropout"}  # on CPU: the cheaper masks
        assert swapped_mlps() == model.config.num_hidden_layers  # and silu(gate) * up kept smaller
        raise RuntimeError("training failed")  # undone when training fails, as when it returns
    assert model.get_base_model().config._attn_implementation == "sdpa" and flags() == {True}
    assert dropouts() == {"Dropout"} and swapped_mlps() == 0
    with torch.no_grad():  # usable outside the trainer's autocast, with padding masks honoured
        model(input_ids=torch.tensor([[1, 2, 3]]), attention_mask=torch.tensor([[0, 1, 1]]))


def test_per_sequence_sdpa_equals_the_block_diagonal_mask_in_logits_and_gradients(tiny_llama, tokenizer):
    from transformers import AutoModelForCausalLM, LlamaConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    rows = [encode(tokenizer, CHAT), encode(tokenizer, CHAT[1:3]), encode(tokenizer, CHAT[3:])]
    batch = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(
        [{"input_ids": r.input_ids, "labels": r.labels} for r in rows])
    results = []
    for per_sequence in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, attn_implementation="sdpa")
        assert attention.use_per_sequence_sdpa(model) if per_sequence else True
        out = model(**batch, use_cache=False)
        out.loss.backward()
        results.append((out.logits.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (masked, masked_grads), (split, split_grads) = results
    torch.testing.assert_close(split, masked, atol=1e-5, rtol=1e-5)
    for name, grad in masked_grads.items():
        torch.testing.assert_close(split_grads[name], grad, atol=1e-5, rtol=1e-4)
    # Sliding-window attention limits attention inside a conversation too: such models keep the masked sdpa.
    assert not attention.supported(LlamaConfig(sliding_window=64))
    assert attention.supported(LlamaConfig())


def test_attention_auto_is_flash_attention_on_cuda_when_installed_else_sdpa(tiny_llama, monkeypatch, caplog):
    import importlib.util
    import logging

    assert models.choose_attention("auto", "fp32") == "sdpa"  # here: CPU
    assert models.choose_attention("eager", "bf16") == "eager"  # an explicit choice is kept
    real_find_spec = importlib.util.find_spec
    with monkeypatch.context() as patched:
        patched.setattr(torch.cuda, "is_available", lambda: True)
        patched.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "flash_attn" else
                        real_find_spec(name, *a))
        assert models.choose_attention("auto", "bf16") == "flash_attention_2"
        assert models.choose_attention("auto", "fp32") == "sdpa"  # flash-attention needs bf16/fp16
    # auto falls back to sdpa when flash-attention cannot load; an explicit request fails instead.
    monkeypatch.setattr(models, "choose_attention", lambda requested, precision: "flash_attention_2")
    with caplog.at_level(logging.WARNING, logger="lora_cli"):
        model = models.load_model(models.resolve(str(tiny_llama)), precision="fp32", attn_implementation="auto")
    assert model.config._attn_implementation == "sdpa" and "using sdpa" in caplog.text


def test_micro_batches_keep_the_effective_batch(tiny_llama, chat_file, tmp_path):
    from lora_cli.train import micro_batching

    cfg = config.parse_args(["--train_path", str(chat_file), "--output_dir", str(tmp_path / "o"),
                             "--batch_size", "2", "--gradient_accumulation_steps", "6", "--tokens_per_batch", "1000"])
    assert micro_batching(cfg, 100) == (6, 2, True)  # 10 fit; the largest divisor of 12 that fits is 6
    assert micro_batching(cfg, 600) == (1, 12, True)
    assert micro_batching(cfg, 5000) == (1, 12, True)  # longer than the budget: one conversation at a time
    cfg.tokens_per_batch = 0
    assert micro_batching(cfg, 100) == (2, 6, False)
    _, _, trainer = build(tiny_llama, chat_file, tmp_path / "t", "--batch_size", "1", "--gradient_accumulation_steps",
                          "4")
    assert (trainer.args.per_device_train_batch_size, trainer.args.gradient_accumulation_steps) == (4, 1)


def test_cli_run_writes_a_complete_output_dir(tiny_qwen, llama3_tokenizer, chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    code = run_cli(["--base_model", str(tiny_qwen), "--train_path", str(chat_file), "--val_split", "0.25",
                    "--output_dir", str(out), *TINY_TRAIN])
    err = capsys.readouterr().err
    assert code == 0, err
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "run_config.yaml", "train_metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["optimizer_steps"] == 3 and metrics["trained_tokens"] > 0
    assert metrics["data"]["kept"] == 12 and metrics["eval_data"]["kept"] == 4  # 16 rows, 25% held out
    assert metrics["eval_loss"] is not None and metrics["eval_loss_before"] is not None
    assert "done: 3 steps" in err and "trained tokens" in err
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert saved["val_split"] == 0.25 and saved["base_model"] == str(tiny_qwen)
    # The saved tokenizer carries the exact template trained with, so eval/merge/serving render the same way.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == llama3_tokenizer.chat_template
    adapter = json.loads((out / "adapter_config.json").read_text())
    suffixes = {name.rsplit(".", 1)[-1] for name in adapter["target_modules"]}
    assert adapter["r"] == 4 and suffixes >= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"}
    assert "lm_head" not in suffixes


def test_cli_saves_overridden_template_and_trains_on_it(tiny_llama, chat_file, tmp_path, capsys):
    jinja = tmp_path / "inst.jinja"
    jinja.write_text(INST_TEMPLATE)
    out = tmp_path / "run"
    assert run_cli(["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir", str(out),
                    "--chat_template", str(jinja), *TINY_TRAIN]) == 0
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).chat_template == INST_TEMPLATE


def test_cli_refuses_non_empty_output_dir_unless_overwrite(tiny_llama, chat_file, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    argv = ["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir", str(out), *TINY_TRAIN]
    assert run_cli(argv) == 2
    assert "--output_dir" in capsys.readouterr().err and sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert run_cli(argv + ["--overwrite"]) == 0
    assert (out / "adapter_model.safetensors").is_file()


def test_long_rows_are_counted_never_silently_cut(tiny_llama, tmp_path, capsys):
    rows = [{"messages": CHAT}, {"prompt": "short", "completion": "ok"},
            {"prompt": "long " * 300, "completion": "done"}]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    out = tmp_path / "run"
    assert run_cli(["--base_model", str(tiny_llama), "--train_path", str(data), "--output_dir", str(out),
                    "--max_seq_length", "128", *TINY_TRAIN]) == 0
    err = capsys.readouterr().err
    assert "1 of 3 rows are longer than --max_seq_length 128" in err and "dropped 1" in err
    stats = json.loads((out / "train_metrics.json").read_text())["data"]
    assert (stats["kept"], stats["dropped_too_long"], stats["truncated"]) == (2, 1, 0)
    # truncate keeps the long row's start; here that is only the prompt, so nothing is left to train on.
    assert run_cli(["--base_model", str(tiny_llama), "--train_path", str(data), "--output_dir", str(out),
                    "--max_seq_length", "128", "--truncation", "truncate", "--overwrite", *TINY_TRAIN]) == 0
    assert "truncated 0, dropped 1 with nothing left to train" in capsys.readouterr().err


def test_all_rows_unusable_is_an_error(tiny_llama, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "long " * 300, "completion": "done"}])
    out = tmp_path / "run"
    assert run_cli(["--base_model", str(tiny_llama), "--train_path", str(data), "--output_dir", str(out),
                    "--max_seq_length", "64", *TINY_TRAIN]) == 2
    assert "none of the 1 rows can be trained on" in capsys.readouterr().err and not out.exists()


def test_unknown_target_module_names_the_real_ones(tiny_llama, chat_file, tmp_path, capsys):
    assert run_cli(["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir",
                    str(tmp_path / "o"), "--target_modules", "query,value", *TINY_TRAIN]) == 2
    err = capsys.readouterr().err
    assert "--target_modules query,value: not found" in err and "q_proj" in err


def test_missing_base_model_is_a_usage_error(chat_file, tmp_path, capsys):
    assert run_cli(["--base_model", str(tmp_path / "nowhere"), "--train_path", str(chat_file), "--output_dir",
                    str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_demo_model_learns_the_sample_task(tmp_path, capsys):
    # End to end on the embedded demo model (real weights): the held-out eval loss must fall.
    out = tmp_path / "demo"
    code = run_cli(["--config", str(ROOT / "configs/demo.yaml"), "--train_path", str(ROOT / "data/sample/train.jsonl"),
                    "--eval_path", str(ROOT / "data/sample/eval.jsonl"), "--output_dir", str(out),
                    "--max_steps", "6", "--eval_steps", "100", "--save_steps", "100"])
    assert code == 0, capsys.readouterr().err
    metrics = json.loads((out / "train_metrics.json").read_text())
    assert metrics["eval_loss"] < metrics["eval_loss_before"] - 0.1
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(metrics["base_model_path"]), out)
    assert any("lora_A" in n for n, _ in model.named_parameters())


def test_labels_in_trainer_batches_are_the_masked_ones(tiny_llama, chat_file, tmp_path, tokenizer):
    # What TRL feeds the model is exactly our masks (no re-masking, no truncation surprises): the padding-free row
    # splits, where position ids restart, into whole encoded conversations carrying their own labels.
    _, prepared, trainer = build(tiny_llama, chat_file, tmp_path / "out")
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "attention_mask" not in batch
    rows = {tuple(ids): labels for ids, labels in zip(prepared.train["input_ids"], prepared.train["labels"])}
    starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist() + [batch["input_ids"].shape[1]]
    assert len(starts) - 1 == trainer.args.per_device_train_batch_size
    for a, b in zip(starts, starts[1:]):
        ids, labels = tuple(batch["input_ids"][0, a:b].tolist()), batch["labels"][0, a:b].tolist()
        assert rows[ids] == labels


def test_dry_run_reports_without_loading_or_writing(tiny_llama, chat_file, tmp_path, capsys):
    out = tmp_path / "dry"
    argv = ["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir", str(out), "--dry_run",
            *TINY_TRAIN]
    assert run_cli(argv) == 0
    err = capsys.readouterr().err
    assert not out.exists()
    assert "data: 16 training conversations" in err and "trainable parameters" in err
    assert "dry run: 3 optimizer steps" in err and "total (estimate" in err

    from lora_cli import estimate

    cfg = config.parse_args(argv)
    model = attach_lora(models.meta_model(str(tiny_llama)), cfg)
    full, qlora = (estimate.estimate(model, precision="bf16", quantization=q, optim="adamw_torch", batch_size=2,
                                     seq_len=256, gradient_checkpointing=True) for q in (None, "4bit"))
    assert qlora.weights < full.weights and qlora.trainable_params == full.trainable_params > 0
    # LoRA r=4 on all linear layers: r * (in + out) per layer, counted exactly from the shapes.
    linear = [m for n, m in model.named_modules() if type(m).__name__ == "Linear" and "lora" not in n
              and n.endswith(("_proj",))]
    assert full.trainable_params == sum(4 * (m.in_features + m.out_features) for m in linear)


def test_paged_adamw_on_cpu_is_torch_adamw_with_the_same_updates(tmp_path):
    """--optim paged_adamw_32bit (the default) without CUDA runs torch's AdamW: bitsandbytes' own optimizer, as
    transformers builds both, makes the same updates."""
    from transformers import Trainer, TrainingArguments

    from lora_cli.train.optimizer import optimizer_name

    assert optimizer_name("paged_adamw_32bit", cuda=False) == "adamw_torch"
    assert optimizer_name("paged_adamw_32bit", cuda=True) == "paged_adamw_32bit"
    assert optimizer_name("paged_adamw_8bit", cuda=False) == "paged_adamw_8bit"  # other maths: never swapped
    results = []
    for name in ("paged_adamw_32bit", "adamw_torch"):
        args = TrainingArguments(output_dir=str(tmp_path), optim=name, learning_rate=1e-2, weight_decay=0.1,
                                 use_cpu=True, report_to=[])
        cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
        generator = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(64, 16, generator=generator)) for _ in range(3)]
        optimizer = cls(params, **kwargs)
        for _ in range(5):
            for p in params:
                p.grad = torch.randn(p.shape, generator=generator)
            optimizer.step()
        results.append((cls.__module__, [p.detach().clone() for p in params]))
    assert results[0][0].startswith("bitsandbytes") and results[1][0].startswith("torch")
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_lora_train_process_without_quantisation_never_imports_bitsandbytes(tiny_llama, chat_file, tmp_path):
    """The command itself (a process of its own, default --optim) trains without importing bitsandbytes, sets up
    without the garbage collector and trains with it (lora_cli/process.py)."""
    import subprocess
    import sys

    argv = ["lora-train", "--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir",
            str(tmp_path / "o"), *[a for a in TINY_TRAIN if a not in ("--optim", "adamw_torch")],
            "--lora_dropout", "0.1"]  # dropout on: the fused CPU dropout (train/dropout.py) in a whole run
    assert "--optim" not in argv  # the default: paged_adamw_32bit
    probe = ("import runpy, sys\nsys.argv = %r\ntry:\n    runpy.run_module('lora_cli.cli.train', run_name='__main__')\n"
             "except SystemExit as exc:\n    code = exc.code\nimport gc\nprint('exit', code, 'bitsandbytes', "
             "'bitsandbytes' in sys.modules and sys.modules['bitsandbytes'] is not None, 'gc', gc.isenabled(), "
             "gc.get_freeze_count() > 10000)" % argv)
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert "exit 0 bitsandbytes False gc True True" in done.stdout, done.stderr[-2000:]
    assert "optimizer: torch's AdamW for --optim paged_adamw_32bit" in done.stderr
    assert (tmp_path / "o" / "adapter_model.safetensors").is_file()


def test_trainer_args_reach_trls_config(tiny_llama, chat_file, tmp_path, caplog):
    # --trainer_args sets SFTConfig fields lora-train has no flag for, and may replace one it chose (with a warning).
    caplog.set_level("WARNING", logger="lora_cli")
    _, _, trainer = build(tiny_llama, chat_file, tmp_path / "out", "--trainer_args",
                          "neftune_noise_alpha=5,logging_first_step=true,ddp_find_unused_parameters=true")
    assert trainer.args.neftune_noise_alpha == 5 and trainer.args.logging_first_step is True
    assert trainer.args.ddp_find_unused_parameters is True
    assert "--trainer_args ddp_find_unused_parameters=True replaces lora-train's False" in caplog.text
