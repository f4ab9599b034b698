"""A faster training path through PEFT's LoRA linear layers, with the same function.

PEFT computes a LoRA layer as ``base(x) + lora_B(lora_A(dropout(x))) * scaling``: two full
passes over the input (the base product and the skinny ``A`` product each read ``x``), then
an ``N x d_out`` temporary for ``B``'s product, another for the scaling and a third for the
sum. On a CPU these memory passes, not the arithmetic, are most of LoRA's cost
(``bench/bench_case4_limit.py``'s profile). :class:`FusedLoRALinear` computes the same thing
in fewer passes:

* forward: one product of ``x`` with ``[W; A]`` gives the base output and ``x A^T`` together
  (``x`` is read once), and ``B``'s contribution is added by one ``addmm`` with the scaling
  as its ``alpha``;
* backward: ``dx = dY W + (s dY B) A`` accumulates in place (``addmm_``), and the frozen base
  weight gets no gradient (it is never asked for one).

:func:`enable` hooks it into every PEFT LoRA ``Linear`` under a module (``train_setup.
lora_fused``). A hooked layer takes the fast path only where it computes exactly what PEFT's
does: one active vanilla adapter, not merged and not disabled, no dropout, no autocast, and
the input's dtype that of the weights; anything else (merging for inference, dropout, mixed
precision) goes through PEFT's own forward. ``tests/test_lora_fused.py`` checks outputs and
gradients against PEFT's."""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn


class FusedLoRALinear(torch.autograd.Function):
    """``y = x W^T + b + s (x A^T) B^T`` with gradients for ``x``, ``A``, ``B`` and (when it
    trains) ``b``; the base weight ``W`` is frozen."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
    ) -> torch.Tensor:
        d_out, r = weight.shape[0], a.shape[0]
        x2 = x.reshape(-1, x.shape[-1])
        wa = torch.cat([weight, a], 0)
        if bias is not None:
            y = torch.addmm(torch.cat([bias, bias.new_zeros(r)]), x2, wa.t())
        else:
            y = x2 @ wa.t()
        xa = y[:, d_out:].contiguous()
        out = torch.addmm(y[:, :d_out], xa, b.t(), alpha=scaling)
        ctx.save_for_backward(x2, weight, a, b, xa)
        ctx.scaling = scaling
        ctx.bias_grad = bias is not None and ctx.needs_input_grad[2]
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], d_out)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        x2, weight, a, b, xa = ctx.saved_tensors
        s = ctx.scaling
        g = grad.reshape(-1, grad.shape[-1])
        gb = g @ (b * s)  # (N, r): the gradient reaching x A^T
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = (g @ weight).addmm_(gb, a).view(ctx.x_shape)
        grad_a = gb.t() @ x2 if ctx.needs_input_grad[3] else None
        grad_b = (g.t() @ xa).mul_(s) if ctx.needs_input_grad[4] else None
        grad_bias = g.sum(0) if ctx.bias_grad else None
        return grad_x, None, grad_bias, grad_a, grad_b, None


def _fast_path(layer: Any, x: torch.Tensor) -> tuple[Any, ...] | None:
    """(weight, bias, A, B, scaling) when ``layer`` computes exactly ``FusedLoRALinear``
    on ``x`` now, else None."""
    if layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    name = layer.active_adapters[0]
    if name not in layer.lora_A or name in getattr(layer, "lora_variant", {}):
        return None
    if not isinstance(layer.lora_dropout[name], nn.Identity):
        return None
    if torch.is_autocast_enabled(x.device.type):
        return None
    base = layer.get_base_layer()
    if not isinstance(base, nn.Linear) or base.weight.requires_grad:
        return None
    a, b = layer.lora_A[name].weight, layer.lora_B[name].weight
    if not (x.dtype == base.weight.dtype == a.dtype == b.dtype):
        return None
    return base.weight, base.bias, a, b, float(layer.scaling[name])


def _forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    fast = None if (args or kwargs) else _fast_path(self, x)
    if fast is None:
        return type(self).forward(self, x, *args, **kwargs)
    return FusedLoRALinear.apply(x, *fast)


def enable(module: nn.Module) -> int:
    """Route every PEFT LoRA ``Linear`` under ``module`` through :class:`FusedLoRALinear`
    where it is exact (see the module's docstring); returns how many layers were hooked."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    hooked = 0
    for layer in module.modules():
        if isinstance(layer, LoraLinear):
            layer.forward = types.MethodType(_forward, layer)
            hooked += 1
    return hooked
