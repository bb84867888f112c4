"""The cheaper CPU LoRA dropout (lora_cli/train/dropout.py) has torch dropout's distribution and gradients."""

import math

import torch
from torch import nn

from lora_cli.train.dropout import UniformMaskDropout

from .conftest import undo_all


def test_keeps_each_element_with_probability_1_minus_p_and_scales_it():
    torch.manual_seed(0)
    x = torch.rand(1000, 1000) + 0.5  # no zeros of its own
    for p in (0.05, 0.3):
        y = UniformMaskDropout(p).train()(x)
        kept = y != 0
        n, dropped = x.numel(), int((~kept).sum())
        effective = round(p * 65536) / 65536  # p to 16 bits
        assert abs(effective - p) < 1 / 65536
        assert abs(dropped - effective * n) < 5 * math.sqrt(n * p * (1 - p))  # binomial, 5 standard deviations
        torch.testing.assert_close(y[kept], x[kept] / (1 - p))
        # torch's own dropout: the same expectation, so the same training signal on average
        reference = nn.functional.dropout(x, p, training=True)
        assert abs(float(y.mean() - reference.mean())) < 0.01


def test_gradient_is_the_mask_times_the_scale_and_eval_is_the_identity():
    torch.manual_seed(1)
    x = torch.randn(64, 128, requires_grad=True)
    drop = UniformMaskDropout(0.25).train()
    y = drop(x)
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, (y != 0).float() / 0.75)
    assert drop.eval()(x) is x and UniformMaskDropout(0.0).train()(x) is x


def test_seeded_masks_repeat():
    x = torch.ones(32, 32)
    masks = []
    for _ in range(2):
        torch.manual_seed(7)
        masks.append(UniformMaskDropout(0.5).train()(x) != 0)
    assert torch.equal(*masks) and 0 < int(masks[0].sum()) < x.numel()


def test_fused_dropout_and_lora_a_equal_dropout_then_linear_in_output_and_gradients():
    from lora_cli.train.dropout import DroppedLinear, keep_mask

    p, scale = 0.1, 1 / 0.9
    weight = torch.randn(8, 32, requires_grad=True)
    x = torch.randn(3, 20, 32, requires_grad=True)
    torch.manual_seed(3)
    keep = keep_mask(x, p)  # the mask the fused function draws from the same generator state
    reference = nn.functional.linear(x * keep * scale, weight)
    reference.square().sum().backward()
    expected = reference.detach(), x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    torch.manual_seed(3)
    fused = DroppedLinear.apply(x, weight, p)
    fused.square().sum().backward()
    for got, want in zip((fused.detach(), x.grad, weight.grad), expected):  # the scale is applied after the
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)  # product: equal up to float rounding


def test_fusion_on_a_peft_model_keeps_the_parameters_and_is_undone(tiny_llama):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_cli.train.dropout import use_cheaper_lora_dropout

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules="all-linear"))
    params = {n: p for n, p in model.named_parameters()}
    lora = [m for m in model.modules() if hasattr(m, "lora_dropout")]
    undo = use_cheaper_lora_dropout(model, fuse=True)
    assert {type(m.lora_dropout["default"]).__name__ for m in lora} == {"Identity"}
    assert all("forward" in m.lora_A["default"].__dict__ for m in lora)
    assert {n: p for n, p in model.named_parameters()} == params  # the optimizer's parameters stay the same
    ids = torch.tensor([[1, 5, 9, 13, 2]])
    model.train()
    model(input_ids=ids, labels=ids).loss.backward()
    assert all(m.lora_A["default"].weight.grad is not None for m in lora)
    model.eval()  # in eval mode the fused forward is the plain linear: the same logits as unfused
    with torch.no_grad():
        fused_logits = model(input_ids=ids).logits
    undo_all(undo)
    assert {type(m.lora_dropout["default"]).__name__ for m in lora} == {"Dropout"}
    assert not any("forward" in m.lora_A["default"].__dict__ for m in lora)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, fused_logits)
