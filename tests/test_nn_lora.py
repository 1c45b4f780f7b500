"""LoRALinear: identity at init, merge/unmerge, training, errors."""

import pytest
import torch
from torch import nn

from eefast import LoRALinear


def test_fresh_module_equals_base_linear(device):
    torch.manual_seed(0)
    base = nn.Linear(24, 16).to(device)
    lora = LoRALinear.from_linear(base, r=4, alpha=8)
    x = torch.randn(5, 24, device=device)
    torch.testing.assert_close(lora(x), base(x))
    assert lora.weight.data_ptr() == base.weight.data_ptr(), "from_linear must share the weight"
    assert [n for n, p in lora.named_parameters() if p.requires_grad] == ["lora_a", "lora_b"]


def test_merge_unmerge_round_trip(device):
    torch.manual_seed(0)
    lora = LoRALinear(32, 20, r=4, alpha=8).to(device).eval()
    with torch.no_grad():
        lora.lora_b.normal_()
    x = torch.randn(7, 32, device=device)
    w0 = lora.weight.detach().clone()
    y = lora(x)
    lora.merge()
    torch.testing.assert_close(lora(x), y, rtol=1e-5, atol=1e-5)
    lora.merge()  # idempotent
    lora.unmerge()
    torch.testing.assert_close(lora(x), y, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lora.weight, w0, rtol=0, atol=1e-6)


def test_merge_refuses_non_finite():
    lora = LoRALinear(8, 8, r=2)
    with torch.no_grad():
        lora.lora_b.fill_(float("inf"))
    with pytest.raises(ValueError, match="not finite"):
        lora.merge()
    assert not lora.merged


def test_training_reduces_loss_and_keeps_base_frozen(device):
    torch.manual_seed(0)
    lora = LoRALinear(16, 16, r=4, alpha=4, dropout=0.1).to(device)
    w0 = lora.weight.detach().clone()
    target = nn.Linear(16, 16).to(device)
    opt = torch.optim.Adam([lora.lora_a, lora.lora_b], lr=1e-2)
    x = torch.randn(64, 16, device=device)
    with torch.no_grad():
        y = target(x)
    losses = []
    for _ in range(60):
        loss = (lora(x) - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    assert torch.equal(lora.weight, w0)


@pytest.mark.parametrize("kwargs,message", [({"r": 0}, "r must be"), ({"dropout": 1.0}, "dropout")])
def test_bad_config(kwargs, message):
    with pytest.raises(ValueError, match=message):
        LoRALinear(8, 8, **kwargs)
