"""lora-merge on tiny random models: the streamed merge equals base+adapter, and the output is a plain model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lora_cli import config
from lora_cli.cli.merge import main as merge_main
from lora_cli.config import TrainConfig

from .conftest import CHAT, ROOT, TINY_TRAIN, run_cli, write_jsonl

IDS = torch.tensor([[1, 42, 7, 300, 1200, 5, 2, 99, 18, 640, 3]])


def make_adapter(base: Path, out: Path, *, seed: int = 1, data: Path | None = None, **lora) -> Path:
    """A peft adapter with random, non-zero A and B (unlike a fresh one, whose B is 0), saved like lora-train does:
    the adapter, the tokenizer and run_config.yaml."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    settings = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "init_lora_weights": False, **lora}
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base), LoraConfig(task_type="CAUSAL_LM", **settings))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    run = TrainConfig(base_model=str(base), output_dir=str(out), train_path=str(data or ""),
                      lora_r=settings["r"], lora_alpha=settings["lora_alpha"])
    config.save(run, out / "run_config.yaml")
    return out


def save_model(path: Path, *, tie: bool = False, hidden: int = 64, shard: str | None = None, base: Path) -> Path:
    """A tiny random Llama with the tokenizer of `base` (conftest's tiny_llama)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(base)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=tie)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    tok.save_pretrained(path)
    return path


def logits(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits[0]


def base_plus_adapter(base: Path, adapter: Path) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return logits(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter))


def merged(out: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits(AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))


def merge(*argv) -> int:
    return run_cli([str(a) for a in argv], main=merge_main)


def report(out: Path) -> dict:
    return json.loads((out / "merge_report.json").read_text())


def state_dict(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v for f in sorted(out.glob("*.safetensors")) for k, v in load_file(f).items()}


@pytest.fixture(autouse=True, scope="module")
def _fast_verification():
    """Tiny models: one thread is as fast as two and immune to other processes on the same cores; shorter greedy
    answers still show whether merged and base+adapter agree."""
    from lora_cli.merge import verify as merge_verify

    threads, tokens = torch.get_num_threads(), merge_verify.MAX_NEW_TOKENS
    torch.set_num_threads(1)
    merge_verify.MAX_NEW_TOKENS = 12
    yield
    torch.set_num_threads(threads)
    merge_verify.MAX_NEW_TOKENS = tokens


@pytest.fixture(scope="module")
def data_file(tmp_path_factory) -> Path:
    rows = [{"messages": CHAT}] + [{"messages": [{"role": "user", "content": f"Say {i}."},
                                                 {"role": "assistant", "content": f"{i}."}]} for i in range(5)]
    return write_jsonl(tmp_path_factory.mktemp("data") / "eval.jsonl", rows)


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory, data_file) -> Path:
    return make_adapter(tiny_llama, tmp_path_factory.mktemp("adapter") / "a", data=data_file)


@pytest.fixture(scope="module")
def merged_out(adapter, tmp_path_factory) -> Path:
    """The adapter merged through the CLI, verification on."""
    out = tmp_path_factory.mktemp("merged") / "m"
    assert merge(adapter, out) == 0
    return out


# --- the merge is right ---------------------------------------------------------------------------------------------

def test_streaming_merge_equals_peft_merge_and_unload(tiny_llama, adapter, merged_out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter)
    expected = reference.merge_and_unload().state_dict()
    got = state_dict(merged_out)
    assert set(got) == set(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-6, atol=1e-6, msg=name)
    original = AutoModelForCausalLM.from_pretrained(tiny_llama).state_dict()
    changed = [n for n in got if not torch.equal(got[n], original[n])]
    assert len(changed) == 14  # 7 linear layers x 2 decoder layers: the adapter really changed them


def test_merged_outputs_equal_base_plus_adapter_and_report_says_so(tiny_llama, adapter, merged_out, data_file):
    torch.testing.assert_close(merged(merged_out), base_plus_adapter(tiny_llama, adapter), rtol=1e-4, atol=1e-4)
    r = report(merged_out)
    assert r["merge_path"] == "streaming" and r["dtype"] == "fp32" and r["shards"] == ["model.safetensors"]
    v = r["verification"]
    assert v["passed"] and v["source"] == str(data_file) and len(v["prompts"]) == 4
    (gate,) = v["comparisons"]
    assert gate["gates"] and gate["max_abs_logit_diff"] < 1e-4 and gate["mean_kl"] < 1e-9
    assert gate["answers_identical"] == 4 and gate["top1_agreement"] == 1.0


def test_output_is_a_plain_model_that_loads_without_peft(adapter, merged_out):
    cfg = json.loads((merged_out / "config.json").read_text())
    assert "quantization_config" not in cfg and not any("peft" in k or "adapter" in k for k in cfg)
    assert not any("lora" in k or "base_layer" in k for k in state_dict(merged_out))
    assert not (merged_out / "adapter_config.json").exists()
    script = ("import sys; sys.modules['peft'] = None\n"  # makes any `import peft` fail
              "from transformers import AutoModelForCausalLM\n"
              f"m = AutoModelForCausalLM.from_pretrained({str(merged_out)!r})\n"
              "print(type(m).__name__, sum(p.numel() for p in m.parameters()))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("LlamaForCausalLM")


def test_chat_template_and_end_of_turn_survive(tiny_qwen, llama3_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    adapter = make_adapter(tiny_qwen, tmp_path / "a", target_modules=["q_proj", "v_proj"])
    (adapter / "run_config.yaml").unlink()  # an adapter from elsewhere: the base comes from adapter_config.json
    assert merge(adapter, tmp_path / "m") == 0
    assert report(tmp_path / "m")["verification"]["source"] == "built-in prompts"
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert tok.chat_template == AutoTokenizer.from_pretrained(adapter).chat_template
    assert "<|eot_id|>" in tok.chat_template
    eos = json.loads((tmp_path / "m" / "generation_config.json").read_text())["eos_token_id"]
    assert llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>") in (eos if isinstance(eos, list) else [eos])


@pytest.mark.parametrize("variant", [
    {"use_rslora": True, "r": 8, "lora_alpha": 4},
    {"use_dora": True},
    {"rank_pattern": {"q_proj": 2}, "alpha_pattern": {"v_proj": 32}},
    {"target_modules": ["q_proj", "k_proj", "v_proj"], "lora_bias": True},  # Qwen2: q/k/v have a bias
], ids=["rslora", "dora", "rank-alpha-patterns", "lora-bias"])
def test_lora_variants_merge_exactly(variant, tiny_llama, tiny_qwen, tmp_path):
    base = tiny_qwen if variant.get("lora_bias") else tiny_llama
    adapter = make_adapter(base, tmp_path / "a", **variant)
    assert merge(adapter, tmp_path / "m", "--no-verify") == 0
    torch.testing.assert_close(merged(tmp_path / "m"), base_plus_adapter(base, adapter), rtol=1e-4, atol=1e-4)
    assert report(tmp_path / "m")["merge_path"] == "streaming"


def test_tied_embeddings_the_adapter_changes_are_untied(tiny_llama, tmp_path, capsys):
    # peft's merge_and_unload() writes a LoRA on a tied embedding into both sides of the tie; base+adapter never
    # applied it to the output layer, so the streamed merge writes the pair untied.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = save_model(tmp_path / "tied", tie=True, base=tiny_llama)
    adapter = make_adapter(base, tmp_path / "a", target_modules=["q_proj", "embed_tokens", "lm_head"])
    assert merge(adapter, tmp_path / "m") == 0
    assert "untied" in capsys.readouterr().err
    expected = base_plus_adapter(base, adapter)
    torch.testing.assert_close(merged(tmp_path / "m"), expected, rtol=1e-4, atol=1e-4)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight" in state_dict(tmp_path / "m")
    peft_merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter).merge_and_unload()
    assert not torch.allclose(logits(peft_merged), expected, atol=1e-2)  # the failure this guards against


def test_tied_embeddings_stay_tied_when_the_adapter_leaves_them(tiny_llama, tmp_path):
    base = save_model(tmp_path / "tied", tie=True, base=tiny_llama)
    adapter = make_adapter(base, tmp_path / "a", modules_to_save=["embed_tokens"], target_modules=["q_proj"])
    assert merge(adapter, tmp_path / "m", "--no-verify") == 0  # modules_to_save: a trained copy of embed_tokens
    torch.testing.assert_close(merged(tmp_path / "m"), base_plus_adapter(base, adapter), rtol=1e-4, atol=1e-4)
    untouched = make_adapter(base, tmp_path / "b", target_modules=["q_proj", "v_proj"])
    assert merge(untouched, tmp_path / "n", "--no-verify") == 0
    assert json.loads((tmp_path / "n" / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in state_dict(tmp_path / "n")


def test_sharded_base_merges_shard_by_shard(tiny_llama, tmp_path, capsys):
    base = save_model(tmp_path / "sharded", shard="2MB", base=tiny_llama)
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) >= 3
    adapter = make_adapter(base, tmp_path / "a")
    assert merge(adapter, tmp_path / "m", "--dtype", "bf16") == 0
    assert f"merged shard {len(shards)}/{len(shards)}" in capsys.readouterr().err
    out = tmp_path / "m"
    assert sorted(p.name for p in out.glob("*.safetensors")) == shards
    index = json.loads((out / "model.safetensors.index.json").read_text())
    tensors = state_dict(out)
    assert set(index["weight_map"]) == set(tensors) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    r = report(out)
    assert r["verification"]["passed"] and r["verification"]["tolerance"]["mean_kl"] > 1e-6  # bf16 tolerance


def test_peft_only_adapter_parts_fall_back_to_merge_and_unload(tiny_llama, tmp_path, capsys):
    adapter = make_adapter(tiny_llama, tmp_path / "a", target_modules=["q_proj"], trainable_token_indices=[5, 9])
    assert merge(adapter, tmp_path / "m", "--no-verify") == 0
    assert "merge_and_unload" in capsys.readouterr().err
    torch.testing.assert_close(merged(tmp_path / "m"), base_plus_adapter(tiny_llama, adapter), rtol=1e-4, atol=1e-4)
    assert report(tmp_path / "m")["merge_path"] == "peft merge_and_unload"


def test_qlora_adapter_merges_into_full_precision_or_simulated_nf4_base(tiny_llama, chat_file, tmp_path):
    from lora_cli.cli.train import main as train_main

    adapter = tmp_path / "qlora"
    assert run_cli(["--base_model", str(tiny_llama), "--train_path", str(chat_file), "--output_dir", str(adapter),
                    "--load_in_4bit", *TINY_TRAIN], main=train_main) == 0
    assert merge(adapter, tmp_path / "fp") == 0
    assert merge(adapter, tmp_path / "nf4", "--simulate_nf4") == 0
    fp, nf4 = report(tmp_path / "fp"), report(tmp_path / "nf4")
    assert fp["quantization"] == {"trained_on": "4bit", "simulate_nf4": False, "merged_into": "full-precision base"}
    assert nf4["quantization"]["merged_into"] == "NF4-rounded base"

    def by_reference(r):
        return {c["reference"].split(", ")[1]: c for c in r["verification"]["comparisons"]}

    fp_cmp, nf4_cmp = by_reference(fp), by_reference(nf4)
    # pass/fail is against the reference each merge reproduces, and both match it to fp32 precision
    assert fp_cmp["full-precision base"]["gates"] and fp_cmp["full-precision base"]["max_abs_logit_diff"] < 1e-4
    assert nf4_cmp["NF4-rounded base"]["gates"] and nf4_cmp["NF4-rounded base"]["max_abs_logit_diff"] < 1e-4
    assert not fp_cmp["4-bit NF4 base (as trained)"]["gates"]
    # the NF4-simulated merge is much closer to the 4-bit model the adapter was trained with
    four_bit_fp = fp_cmp["4-bit NF4 base (as trained)"]
    four_bit_nf4 = nf4_cmp["4-bit NF4 base (as trained)"]
    assert four_bit_nf4["max_abs_logit_diff"] < four_bit_fp["max_abs_logit_diff"] / 5
    assert four_bit_nf4["mean_kl"] < four_bit_fp["mean_kl"] / 20


def test_nf4_simulation_rounds_exactly_the_layers_qlora_quantises(tiny_llama):
    import bitsandbytes.functional as bnbf
    from safetensors.torch import load_file

    from lora_cli import models
    from lora_cli.merge.arithmetic import nf4_round_trip
    from lora_cli.merge.command import build_skeleton
    from lora_cli.merge.plan import nf4_module_names

    base = models.resolve(str(tiny_llama))
    four_bit = models.load_model(base, precision="fp32", quantization="4bit")
    quantised = {n for n, m in four_bit.named_modules() if type(m).__name__ == "Linear4bit"}
    assert nf4_module_names(build_skeleton(base, tiny_llama, False)) == quantised
    weights = load_file(tiny_llama / "model.safetensors")
    for name in sorted(quantised)[:3]:
        layer = four_bit.get_submodule(name)
        expected = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state)
        assert torch.equal(nf4_round_trip(weights[f"{name}.weight"]), expected)


# --- errors, overwrite and atomic output ----------------------------------------------------------------------------

def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("lora-merge: error: ")
    return err[-1]


def test_bad_inputs_exit_2_with_one_clear_line(tiny_llama, adapter, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [
        ([tmp_path / "nope", tmp_path / "o"], "ADAPTER_DIR", "not found"),
        ([empty, tmp_path / "o"], "no adapter_config.json", "not a LoRA adapter"),
        ([tiny_llama, tmp_path / "o"], "a full model", "nothing to merge"),
        ([], "ADAPTER_DIR is required", "OUT_DIR is required"),
        ([adapter, tmp_path / "o", "--simulate_nf4"], "--simulate_nf4", "full-precision base"),
        ([adapter, tmp_path / "o", "--dtype", "int8"], "--dtype", "not one of"),
        ([adapter, tmp_path / "o", "--verfy"], "unknown flag --verfy", "did you mean --verify"),
    ]
    for argv, *expected in cases:
        assert merge(*argv) == 2, argv
        err = capsys.readouterr().err
        assert all(e in err for e in expected), (argv, err)
        assert "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_base_that_does_not_match_the_adapter_exits_2(tiny_llama, adapter, tmp_path, capsys):
    wider = save_model(tmp_path / "wider", hidden=128, base=tiny_llama)
    assert merge(adapter, tmp_path / "o", "--base_model", wider) == 2
    line = _one_error_line(capsys)
    assert "shapes differ" in line and "model.layers.0." in line and "--base_model" in line
    # adapter keys that name no module of the base (e.g. another architecture's names)
    renamed = tmp_path / "renamed"
    make_adapter(tiny_llama, renamed, target_modules=["q_proj"])
    from safetensors.torch import load_file, save_file

    weights = load_file(renamed / "adapter_model.safetensors")
    save_file({k.replace("q_proj", "query_key_value"): v for k, v in weights.items()},
              renamed / "adapter_model.safetensors")
    assert merge(renamed, tmp_path / "o") == 2
    line = _one_error_line(capsys)
    assert "match nothing in the base" in line and "query_key_value" in line
    assert not (tmp_path / "o").exists()


def test_existing_out_dir_needs_overwrite_and_is_replaced_whole(adapter, tmp_path, capsys):
    out = tmp_path / "m"
    assert merge(adapter, out, "--no-verify") == 0
    (out / "stale.txt").write_text("from an earlier merge")
    assert merge(adapter, out, "--no-verify") == 2
    assert "--overwrite" in _one_error_line(capsys) and (out / "stale.txt").exists()
    assert merge(adapter, out, "--no-verify", "--overwrite") == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    # --overwrite never replaces a folder that is not a model, nor the adapter itself
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "thesis.txt").write_text("irreplaceable")
    assert merge(adapter, precious, "--overwrite") == 2 and (precious / "thesis.txt").exists()
    assert "not a model folder" in _one_error_line(capsys)
    assert merge(adapter, adapter, "--overwrite") == 2 and (adapter / "adapter_config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "notes"]  # no partial folders left behind


def test_interrupted_merge_leaves_no_out_dir(adapter, tmp_path, monkeypatch):
    from lora_cli.merge import command

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(command, "write_tokenizer_and_generation", crash)
    assert merge(adapter, tmp_path / "m") == 130
    assert list(tmp_path.iterdir()) == []


def test_verification_failure_exits_1_and_keeps_the_report(adapter, tmp_path, monkeypatch, capsys):
    from lora_cli.merge import arithmetic

    real = arithmetic.merged_weight

    def half_scale(weight, module):  # a merge bug: half the adapter
        return (weight.float() + real(weight, module)) / 2

    monkeypatch.setattr(arithmetic, "merged_weight", half_scale)
    assert merge(adapter, tmp_path / "m") == 1
    assert "verification failed" in _one_error_line(capsys)
    v = report(tmp_path / "m")["verification"]
    assert not v["passed"] and v["comparisons"][0]["mean_kl"] > v["tolerance"]["mean_kl"]


# --- memory ---------------------------------------------------------------------------------------------------------

RSS_SCRIPT = """
import json, resource, sys
import bitsandbytes, datasets, safetensors.torch, torch, transformers, yaml
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaForCausalLM
from lora_cli import merge
from lora_cli.cli.merge import main
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"code": code, "increase": (after - before) * 1024}))
"""


@pytest.fixture(scope="session")
def big_sharded(tmp_path_factory, tiny_llama) -> tuple[Path, Path, int]:
    """A ~335 MB fp32 Llama in 8 shards, and a LoRA adapter on all its linear layers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    root = tmp_path_factory.mktemp("big")
    cfg = LlamaConfig(vocab_size=8192, hidden_size=1024, intermediate_size=2816, num_hidden_layers=6,
                      num_attention_heads=16, num_key_value_heads=4, tie_word_embeddings=False)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    model = model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    model.save_pretrained(root / "base", max_shard_size="45MB")
    del model
    AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(root / "base")
    adapter = make_adapter(root / "base", root / "adapter", r=8, lora_alpha=16)
    return root / "base", adapter, size


def test_peak_memory_stays_far_below_the_model_size(big_sharded, tmp_path):
    base, adapter, size = big_sharded
    assert len(list(base.glob("*.safetensors"))) >= 6
    proc = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(adapter), str(tmp_path / "m"), "--no-verify"],
                          capture_output=True, text=True, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["code"] == 0, proc.stderr[-2000:]
    assert result["increase"] < 0.4 * size, f"peak RSS grew {result['increase'] / 2**20:.0f} MiB for a " \
                                            f"{size / 2**20:.0f} MiB model"
    assert len(list((tmp_path / "m").glob("*.safetensors"))) == len(list(base.glob("*.safetensors")))
