"""The gated MLP's silu(gate) * up kept smaller (lora_cli/train/gated_mlp.py): same loss and gradients as the model's
own forward, two fewer [tokens x intermediate] tensors kept per layer, and only where the model's MLP computes that."""

import pytest
import torch
from torch import nn

from lora_cli.train.dropout import use_cheaper_lora_dropout
from lora_cli.train.gated_mlp import SiluProduct, use_silu_product

from .conftest import undo_all


def test_silu_product_has_the_output_and_gradients_of_silu_times_up():
    torch.manual_seed(0)
    gate = torch.randn(3, 7, 40, dtype=torch.float64, requires_grad=True)
    up = torch.randn(3, 7, 40, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluProduct.apply, (gate, up))
    out = SiluProduct.apply(gate, up)
    torch.testing.assert_close(out, nn.functional.silu(gate) * up)


@pytest.fixture
def lora_llama(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)  # LoRA B random too (init_lora_weights=False): the adapter's gradients are all non-zero
    return get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                          LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear",
                                     init_lora_weights=False))


def _step(model, ids):
    """Loss, LoRA gradients and the bytes autograd keeps for the backward (each storage once, parameters not)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    kept = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = t.untyped_storage().nbytes()
        return t

    model.zero_grad()
    model.train()
    torch.manual_seed(5)  # the same dropout masks in every run
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, sum(kept.values())


@pytest.mark.parametrize("fused_dropout", [False, True])
def test_swapped_mlps_train_exactly_as_before_and_keep_two_fewer_tensors_per_layer(lora_llama, fused_dropout):
    model = lora_llama
    ids = torch.randint(0, 300, (1, 48))
    dropout_undo = use_cheaper_lora_dropout(model, fuse=fused_dropout)
    loss, grads, kept = _step(model, ids)
    undo = use_silu_product(model)
    assert len(undo) == model.config.num_hidden_layers  # every layer's MLP
    swapped_loss, swapped_grads, swapped_kept = _step(model, ids)
    torch.testing.assert_close(swapped_loss, loss)
    assert all(g.abs().sum() > 0 for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(swapped_grads[name], grad, msg=name)
    # silu(gate) is no longer kept; with the fused dropout down_proj's lora_A no longer keeps the product either
    one = ids.numel() * model.config.intermediate_size * 4  # one fp32 [tokens x intermediate] tensor
    assert kept - swapped_kept == (2 if fused_dropout else 1) * one * model.config.num_hidden_layers
    undo_all(undo)
    assert not any("forward" in m.__dict__ for m in model.modules() if hasattr(m, "gate_proj"))
    assert _step(model, ids)[2] == kept
    undo_all(dropout_undo)


def test_an_mlp_that_computes_something_else_is_left_alone(lora_llama):
    mlps = [m for m in lora_llama.modules() if hasattr(m, "gate_proj")]
    other = type("SumMLP", (type(mlps[0]),), {
        "forward": lambda self, x: self.down_proj(self.act_fn(self.gate_proj(x)) + self.up_proj(x))})
    mlps[0].__class__ = other  # a model whose MLP adds instead of multiplying (same module names)
    undo = use_silu_product(lora_llama)
    assert len(undo) == len(mlps) - 1 and "forward" not in mlps[0].__dict__
    undo_all(undo)
