"""The fused LoRA path computes what PEFT's LoRA forward computes: outputs and every gradient
(input, A, B, a trained bias) within float32 rounding, and it steps aside wherever it would not
be exact."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from mobile_vla.models import lora_fused


class Two(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q_proj = nn.Linear(24, 32)
        self.fc2 = nn.Linear(32, 24, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.q_proj(x)))


def _pair(bias: str = "none", dropout: float = 0.0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    plain = Two()
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=dropout, bias=bias, target_modules=["q_proj", "fc2"]
    )
    inject_adapter_in_model(config, plain)
    for name, p in plain.named_parameters():  # B starts at zero: give it values to test
        if "lora_B" in name:
            nn.init.normal_(p, std=0.3)
    fused = copy.deepcopy(plain)
    assert lora_fused.enable(fused) == 2
    return plain, fused


def _grads(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), {"x": x.grad.clone(), **grads}


@pytest.mark.parametrize("bias", ["none", "all"])
def test_outputs_and_gradients_match_peft(bias: str) -> None:
    plain, fused = _pair(bias)
    x = torch.randn(3, 7, 24)
    out_p, grads_p = _grads(plain, x)
    out_f, grads_f = _grads(fused, x)
    torch.testing.assert_close(out_f, out_p, rtol=1e-5, atol=1e-6)
    assert set(grads_f) == set(grads_p)
    assert any("lora_A" in n for n in grads_p) and any("lora_B" in n for n in grads_p)
    assert ("q_proj.base_layer.bias" in grads_p) == (bias == "all")
    for name in grads_p:
        torch.testing.assert_close(grads_f[name], grads_p[name], rtol=1e-4, atol=1e-5)
    # the frozen base weights get no gradient on either path
    assert "q_proj.base_layer.weight" not in grads_f


def test_the_fast_path_steps_aside_where_it_would_not_be_exact(monkeypatch) -> None:
    calls = []
    original = lora_fused.FusedLoRALinear.apply
    monkeypatch.setattr(
        lora_fused.FusedLoRALinear, "apply", lambda *a: calls.append(1) or original(*a)
    )
    plain, fused = _pair(dropout=0.5)  # dropout: PEFT's forward (it draws the mask)
    fused(torch.randn(2, 24))
    assert not calls
    plain, fused = _pair()
    x = torch.randn(2, 24)
    fused(x)
    assert len(calls) == 2
    calls.clear()
    for m in fused.modules():  # merged for inference: the base layer alone, as PEFT does
        if hasattr(m, "merge") and not m.merged:
            m.merge()
    torch.testing.assert_close(fused(x), plain(x), rtol=1e-5, atol=1e-6)
    assert not calls
    _, fused = _pair()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused(x)
    assert not calls


def test_the_key_decides_which_forward_runs() -> None:
    """``train_setup.lora_fused`` hooks the backbone's LoRA layers (true, the default) or
    leaves PEFT's forward (false)."""
    import numpy as np

    from mobile_vla.config import load_config
    from mobile_vla.data.normalization import ActionStats
    from mobile_vla.training.runs import build_policy

    from .conftest import TINY_BUILTIN

    names = ["linear_x", "linear_y", "angular_z"]
    stats = ActionStats.from_arrays(names, [np.random.default_rng(0).normal(size=(8, 3))])
    hooked = {}
    for flag in ("true", "false"):
        over = [*TINY_BUILTIN, "train_setup.strategy=lora", f"train_setup.lora_fused={flag}"]
        policy, _ = build_policy(load_config(None, over), stats)
        hooked[flag] = sum("forward" in vars(m) for m in policy.modules())
    assert hooked["true"] == 6 * 3 and hooked["false"] == 0  # 6 targets x 3 fusion layers
