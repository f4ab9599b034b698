"""The last fusion layer computed for the action tokens alone (``run_readout``) is a lever of
the Case-4 step: it must give what running every block on every token gives, for the
outputs and for the gradients."""

from __future__ import annotations

import torch

from mobile_vla.models.backbones.builtin import Block, run_blocks, run_readout


def test_readout_of_the_last_layer_equals_the_full_forward_and_its_gradients() -> None:
    torch.manual_seed(0)
    width, heads, prefix, queries, batch = 32, 4, 10, 2, 3
    blocks = torch.nn.ModuleList(Block(width, heads) for _ in range(3))
    x = torch.randn(batch, prefix + queries, width)
    prefix_mask = torch.ones(batch, prefix, dtype=torch.bool)
    prefix_mask[0, 7:] = False  # padded text tokens
    prefix_mask[2, 4:6] = False
    n = prefix + queries
    allowed = torch.zeros(batch, n, n, dtype=torch.bool)
    allowed[:, :, :prefix] = prefix_mask[:, None, :]  # everyone reads the valid prefix
    allowed[:, prefix:, prefix:] = True  # the queries also read each other, not the reverse

    full = run_blocks(blocks, x, allowed, False)[:, -queries:]
    full.square().sum().backward()
    grads_full = [p.grad.clone() for p in blocks.parameters()]
    blocks.zero_grad()
    fast = run_readout(blocks, x, allowed, prefix_mask, queries, False)
    fast.square().sum().backward()
    grads_fast = [p.grad.clone() for p in blocks.parameters()]

    assert fast.shape == (batch, queries, width)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
    for gf, gq in zip(grads_full, grads_fast, strict=True):
        torch.testing.assert_close(gq, gf, rtol=1e-4, atol=1e-5)
    # and it can fail: letting the prefix read the queries changes the full path only
    leaky = allowed.clone()
    leaky[:, :prefix, prefix:] = True
    assert not torch.allclose(run_blocks(blocks, x, leaky, False)[:, -queries:], fast)
