"""Backbones, heads and strategies: what trains after one optimizer step, checkpointing,
clipping, heads and action spaces, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from mobile_vla.config import load_config
from mobile_vla.data.dataset import build_datasets
from mobile_vla.data.normalization import ActionStats
from mobile_vla.errors import ConfigError, DataError
from mobile_vla.models.policy import VLAPolicy
from mobile_vla.models.strategies import apply_strategy, resolve
from mobile_vla.training.common import collate
from mobile_vla.training.runs import build_policy

from .conftest import tiny_overrides

# every adapter: the built-in backbone and the transformers families (tiny, from configs)
BACKBONES = ["kosmos2", "paligemma", "llava", "idefics3", "qwen2_vl", "qwen2_5_vl", "builtin"]
STATS = ActionStats.from_arrays(
    ["linear_x", "linear_y"], [np.random.default_rng(0).uniform(-1.15, 1.15, (40, 2))]
)


def batch(n: int = 2, window: int = 3, size: int = 32) -> dict:
    g = torch.Generator().manual_seed(0)
    return {
        "images": torch.randint(0, 256, (n, window, 3, size, size), dtype=torch.uint8, generator=g),
        "instruction": ["go around the box on the left", "go around the box on the right"][:n],
        "obs_mask": torch.tensor([[False, True, True], [True, True, True]][:n]),
        "actions": torch.rand(n, 4, 2, generator=g) * 2 - 1,
        "action_mask": torch.tensor([[True, True, True, False], [True] * 4][:n]),
    }


def make(backbone: str, vlms: dict[str, Path], tmp: Path, *extra: str) -> tuple:
    cfg = load_config(None, [*tiny_overrides(tmp, tmp, backbone, vlms), *extra])
    policy, plan = build_policy(cfg, STATS)
    return cfg, policy, plan


def one_step(policy: VLAPolicy, plan, steps: int = 1) -> dict[str, bool]:
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = torch.optim.AdamW(plan.param_groups, weight_decay=0.0)
    for _ in range(steps):
        opt.zero_grad()
        loss, _ = policy.loss(batch())
        loss.backward()
        opt.step()
    return {n: not torch.equal(before[n], p) for n, p in policy.named_parameters()}


def layer_index(name: str) -> int | None:
    for key in ("layers.", "fusion."):
        if key in name:
            tail = name.split(key, 1)[1].split(".", 1)[0]
            if tail.isdigit():
                return int(tail)
    return None


@pytest.mark.parametrize("backbone", BACKBONES)
def test_frozen_trains_only_head_and_action_token(backbone, tiny_vlms, tmp_path) -> None:
    _, policy, plan = make(backbone, tiny_vlms, tmp_path, "train_setup.strategy=frozen")
    changed = one_step(policy, plan)
    moved = {n for n, c in changed.items() if c}
    assert moved and all(n.startswith(("head.", "action_token")) for n in moved), moved
    assert "action_token" in moved
    assert all(not p.requires_grad for p in policy.backbone.parameters())


@pytest.mark.parametrize("backbone", BACKBONES)
def test_lora_trains_only_lora_and_head(backbone, tiny_vlms, tmp_path) -> None:
    _, policy, plan = make(
        backbone, tiny_vlms, tmp_path, "train_setup.strategy=lora", "train_setup.lora_lr=0.01"
    )
    changed = one_step(policy, plan, steps=2)
    moved = {n for n, c in changed.items() if c}
    backbone_moved = {n for n in moved if n.startswith("backbone.")}
    assert backbone_moved and all("lora_" in n for n in backbone_moved), backbone_moved
    assert any("lora_A" in n for n in backbone_moved) and any("lora_B" in n for n in backbone_moved)
    lora = [n for n, p in policy.backbone.named_parameters() if "lora_" in n]
    # LoRA sits in the language model / fusion layers only
    scope = {id(p) for p in policy.backbone.lora_scope().parameters()}
    assert all(id(p) in scope for n, p in policy.backbone.named_parameters() if "lora_" in n)
    assert len(lora) >= 2 * len(policy.backbone.groups()["decoder_layers"])
    assert plan.table["lora"]["trainable"] == plan.table["lora"]["total"] > 0


@pytest.mark.parametrize("backbone", BACKBONES)
def test_partial_trains_exactly_the_last_n_layers(backbone, tiny_vlms, tmp_path) -> None:
    _, policy, plan = make(
        backbone,
        tiny_vlms,
        tmp_path,
        "train_setup.strategy=partial",
        "train_setup.train_decoder_layers=2",
    )
    layers = policy.backbone.groups()["decoder_layers"]
    n = len(layers)
    changed = one_step(policy, plan)
    for i, layer in enumerate(layers):
        params = list(layer.parameters())
        assert all(p.requires_grad == (i >= n - 2) for p in params), i
    layer_ids = {id(p): i for i, layer in enumerate(layers) for p in layer.parameters()}
    other_ids = {id(p) for m in policy.backbone.groups()["decoder_other"] for p in m.parameters()}
    for name, p in policy.backbone.named_parameters():
        if changed["backbone." + name]:
            assert layer_ids.get(id(p), -1) >= n - 2 or id(p) in other_ids, name
    assert any(
        changed["backbone." + nm]
        for nm, p in policy.backbone.named_parameters()
        if layer_ids.get(id(p)) == n - 2
    )


@pytest.mark.parametrize("backbone", BACKBONES)
def test_full_trains_everything(backbone, tiny_vlms, tmp_path) -> None:
    _, policy, plan = make(backbone, tiny_vlms, tmp_path, "train_setup.strategy=full")
    head_and_backbone = [
        p for n, p in policy.named_parameters() if not n.startswith("backbone.text_encoder.pooler")
    ]
    assert all(p.requires_grad for p in head_and_backbone)
    opt_ids = {id(p) for g in plan.param_groups for p in g["params"]}
    assert all(id(p) in opt_ids for p in head_and_backbone)
    grads: dict[str, bool] = {}
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = torch.optim.AdamW(plan.param_groups)
    loss, _ = policy.loss(batch())
    loss.backward()
    grads = {
        n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in policy.named_parameters()
    }
    opt.step()
    for n, p in policy.named_parameters():
        if grads[n]:
            assert not torch.equal(before[n], p), n
    assert sum(grads.values()) > 0.8 * len(grads)
    assert plan.table["all"]["trainable"] >= 0.99 * plan.table["all"]["total"]


def test_sandwich_and_gradual_presets(tiny_vlms, tmp_path) -> None:
    _, policy, plan = make("kosmos2", tiny_vlms, tmp_path, "train_setup.strategy=sandwich")
    g = policy.backbone.groups()
    assert all(p.requires_grad for m in g["vision"] for p in m.parameters())
    assert [all(p.requires_grad for p in m.parameters()) for m in g["decoder_layers"]] == [
        False,
        False,
        True,
    ]
    _, policy, plan = make("kosmos2", tiny_vlms, tmp_path, "train_setup.strategy=gradual")
    g = policy.backbone.groups()
    assert not any(p.requires_grad for p in policy.backbone.parameters())
    assert plan.unfreeze_next()  # top layer + final norm first
    assert all(p.requires_grad for p in g["decoder_layers"][-1].parameters())
    assert not any(p.requires_grad for p in g["decoder_layers"][-2].parameters())
    while plan.unfreeze_next():
        pass
    assert all(p.requires_grad for m in g["vision"] for p in m.parameters())
    opt_ids = {id(p) for grp in plan.param_groups for p in grp["params"]}
    assert all(id(p) in opt_ids for p in policy.backbone.parameters())


def test_explicit_flags_override_the_preset() -> None:
    cfg = load_config(None, ["train_setup.strategy=frozen", "train_setup.train_vision=true"])
    r = resolve(cfg.train_setup)
    assert r.train_vision and r.train_decoder_layers == 0 and not r.lora_enable
    cfg = load_config(None, ["train_setup.strategy=full", "train_setup.freeze_backbone=true"])
    r = resolve(cfg.train_setup)
    assert not r.train_vision and r.train_decoder_layers == 0


def test_per_group_learning_rates(tiny_vlms, tmp_path) -> None:
    _, _, plan = make(
        "kosmos2",
        tiny_vlms,
        tmp_path,
        "train_setup.strategy=full",
        "train_setup.learning_rate=0.001",
        "train_setup.action_token_lr=0.002",
        "train_setup.backbone_lr=0.0001",
        "train_setup.vision_lr=0.00005",
        "train_setup.layer_lr_decay=0.5",
    )
    lr = {g["name"]: g["lr"] for g in plan.param_groups}
    assert lr["head"] == 0.001 and lr["action_token_no_decay"] == 0.002
    assert lr["vision"] == 0.00005 and lr["resampler"] == 0.0001
    assert lr["decoder_layer_2"] == pytest.approx(1e-4)
    assert lr["decoder_layer_1"] == pytest.approx(5e-5)
    assert lr["decoder_layer_0"] == pytest.approx(2.5e-5)
    assert all(g["weight_decay"] == 0.0 for g in plan.param_groups if "no_decay" in g["name"])


@pytest.mark.parametrize("backbone", BACKBONES)
def test_gradient_checkpointing_recomputes_layers(backbone, tiny_vlms, tmp_path) -> None:
    calls = {}
    for flag in (False, True):
        _, policy, _ = make(
            backbone,
            tiny_vlms,
            tmp_path,
            "train_setup.strategy=full",
            f"train_setup.gradient_checkpointing={str(flag).lower()}",
        )
        layer = policy.backbone.groups()["decoder_layers"][0]
        # a module *inside* the layer: transformers checkpoints `forward`, so hooks on the
        # layer itself run once either way, while its inner modules run again in backward
        inner = next(m for m in layer.modules() if isinstance(m, torch.nn.Linear))
        count = [0]
        inner.register_forward_hook(lambda *a, c=count: c.__setitem__(0, c[0] + 1))
        loss, _ = policy.loss(batch())
        loss.backward()
        calls[flag] = count[0]
    assert calls[True] == 2 * calls[False] > 0  # forward once more during backward


def test_lora_target_that_matches_nothing(tiny_vlms, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"lora_target_modules.*'query_key'.*matches no"):
        make(
            "kosmos2",
            tiny_vlms,
            tmp_path,
            "train_setup.strategy=lora",
            "train_setup.lora_target_modules=[q_proj,query_key]",
        )


def test_unknown_strategy_and_key_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"train_setup\.strategy.*did you mean 'lora'"):
        load_config(None, ["train_setup.strategy=loar"])
    with pytest.raises(ConfigError, match=r"did you mean 'train_setup\.lora_r'"):
        load_config(None, ["train_setup.lora_rank=4"])
    with pytest.raises(ConfigError, match=r"backbone\.name.*did you mean 'kosmos2'"):
        VLAPolicy(load_config(None, ["backbone.name=kosmos"]), STATS)


def test_window_larger_than_allowed(tiny_vlms, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"data\.window_size' must be <= 64"):
        make("builtin", tiny_vlms, tmp_path, "backbone.history=pre", "data.window_size=65")
    with pytest.raises(ConfigError, match=r"data\.window_size' must be <= "):
        make("kosmos2", tiny_vlms, tmp_path, "backbone.history=pre", "data.window_size=200")


def test_action_dimension_missing_from_the_data(train_data, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"data\.action_dims"):
        load_config(None, ["data.action_dims=[linear_x, gripper]"])
    # a column the files do not have: every file is refused, before training
    cfg = load_config(
        None,
        [
            *tiny_overrides(train_data, tmp_path),
            "data.action_names=[linear_x, linear_y, angular_z, gripper]",
        ],
    )
    with pytest.raises(DataError, match=r"must have shape \(T, 4\)"):
        build_datasets(cfg)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_pre_history_mode(backbone, tiny_vlms, tmp_path) -> None:
    _, policy, _plan = make(
        backbone, tiny_vlms, tmp_path, "backbone.history=pre", "backbone.n_action_tokens=2"
    )
    policy.eval()  # no dropout: two calls must agree
    out = policy(batch())
    assert out.logits.shape == (2, 4, 2)
    b = batch()
    b["images"][0, 0] = 0  # a masked (padding) frame must not matter
    assert torch.allclose(policy(b).logits[0], out.logits[0], atol=1e-5)


@pytest.mark.parametrize("head", ["lstm", "mlp", "gpt"])
@pytest.mark.parametrize("space", ["continuous", "discrete", "classes"])
def test_heads_and_action_spaces_learn(head, space, tiny_vlms, tmp_path) -> None:
    _, policy, plan = make(
        "builtin",
        tiny_vlms,
        tmp_path,
        f"head.type={head}",
        f"head.action_space={space}",
        "head.n_bins=16",
        "train_setup.learning_rate=0.003",
    )
    b = batch()
    b["actions"] = policy.normalizer.normalize(
        np.array([[[1.15, 1.15]] * 4, [[1.15, -1.15]] * 4], np.float32)
    )
    b["actions"] = torch.from_numpy(b["actions"])
    opt = torch.optim.AdamW(plan.param_groups)
    losses = []
    for _ in range(120):
        opt.zero_grad()
        loss, _out = policy.loss(b)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0]
    pred = policy.to_physical(policy.decode(policy(b)))
    assert pred.shape == (2, 4, 2)
    assert np.sign(pred[0, 0, 1]) == 1 and np.sign(pred[1, 0, 1]) == -1


def test_gripper_dimension_uses_bce(tmp_path) -> None:
    cfg = load_config(
        None,
        [
            *tiny_overrides(tmp_path, tmp_path),
            "data.action_dims=[linear_x, angular_z]",
            "head.gripper=angular_z",
            "head.gripper_loss_ratio=1.0",
        ],
    )
    stats = ActionStats.from_arrays(["linear_x", "angular_z"], [np.array([[0, -1], [1, 1.0]])])
    policy, _plan = build_policy(cfg, stats)
    b = batch()
    b["actions"][..., 1] = torch.tensor([1.0, -1.0])[:, None]
    loss, out = policy.loss(b)
    y, t, m = out.logits, b["actions"], b["action_mask"].float()
    huber = torch.nn.functional.huber_loss(y[..., 0], t[..., 0], reduction="none")
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        y[..., 1], (t[..., 1] > 0).float(), reduction="none"
    )
    expected = ((huber + 1.0 * bce) * m).sum() / m.sum()
    assert torch.allclose(loss, expected, atol=1e-6)
    decoded = policy.decode(out)[..., 1]
    assert set(decoded.unique().tolist()) <= {-1.0, 1.0}


def test_classes_default_to_the_nine_teleop_keys() -> None:
    from mobile_vla.models.heads import teleop_action_set

    keys = teleop_action_set(["linear_x", "linear_y"])
    assert len(keys) == 9 and [0.0, 0.0] in keys and [1.15, -1.15] in keys


def test_classes_refuse_keys_that_normalization_merges(tmp_path) -> None:
    # forward-only data: quantile normalization clips -1.15 and 0 on linear_x to one value, so
    # "reverse" and "stop" would be one class; the policy refuses it and names the fix
    forward = np.random.default_rng(0).uniform(-1.15, 1.15, (200, 2))
    forward[:, 0] = np.where(forward[:, 0] > 0, 1.15, 0.0)
    stats = ActionStats.from_arrays(["linear_x", "linear_y"], [forward])
    cfg = load_config(
        None, [*tiny_overrides(tmp_path, tmp_path, "builtin", {}), "head.action_space=classes"]
    )
    with pytest.raises(ConfigError, match=r"head\.action_set.*quantile.*minmax"):
        build_policy(cfg, stats)
    cfg = load_config(
        None,
        [
            *tiny_overrides(tmp_path, tmp_path, "builtin", {}),
            "head.action_space=classes",
            "data.normalization=minmax",
        ],
    )
    policy, _ = build_policy(cfg, stats)
    keys = policy.codec.action_set
    assert len({tuple(k.tolist()) for k in keys}) == 9


def test_apply_strategy_param_table_totals(tiny_vlms, tmp_path) -> None:
    _, policy, plan = make("kosmos2", tiny_vlms, tmp_path, "train_setup.strategy=frozen")
    t = plan.table
    parts = sum(v["total"] for k, v in t.items() if k != "all")
    assert parts == t["all"]["total"] == sum(p.numel() for p in policy.parameters())
    assert t["all"]["trainable"] == t["head"]["total"] + t["action_token"]["total"]
    again = apply_strategy(policy, load_config(None, ["train_setup.strategy=full"]).train_setup)
    assert again.table["all"]["trainable"] == t["all"]["total"]


def test_collate_stacks_and_lists() -> None:
    out = collate([{"a": torch.zeros(2), "s": "x", "n": 1}, {"a": torch.ones(2), "s": "y", "n": 2}])
    assert out["a"].shape == (2, 2) and out["s"] == ["x", "y"] and out["n"].tolist() == [1, 2]


def test_builtin_text_cache_is_exact_and_cleared_on_mode_change(tmp_path) -> None:
    _, policy, _ = make("builtin", {}, tmp_path)
    policy.eval()
    b = batch()
    with torch.no_grad():
        first = policy(b).logits  # fills the per-instruction cache
        assert policy.backbone._text_cache
        again = policy(b).logits  # served from it
    torch.testing.assert_close(first, again, rtol=1e-5, atol=1e-6)
    policy.train()
    assert not policy.backbone._text_cache  # weights may change: stale text is dropped
    policy.eval()
    with torch.no_grad():
        fresh = policy(b).logits
    torch.testing.assert_close(first, fresh, rtol=1e-5, atol=1e-6)


def test_builtin_prefix_does_not_depend_on_the_action_tokens(tmp_path) -> None:
    """Image and text tokens never attend to the action tokens, so what the prefix computes
    at every fusion layer is the same whatever the action tokens are (what makes it cacheable)."""
    _, policy, _ = make("builtin", {}, tmp_path, "backbone.n_action_tokens=2")
    policy.eval()
    bb = policy.backbone
    states: list[torch.Tensor] = []
    hooks = [
        blk.register_forward_hook(lambda m, i, o: states.append(o.detach())) for blk in bb.fusion
    ]
    px = bb.preprocess(batch()["images"][:, 0])
    texts = ["go left", "go right"]
    with torch.no_grad():
        bb.encode_post(px, texts, policy.action_token)
        first = [s[:, :-2] for s in states]
        states.clear()
        bb.encode_post(px, texts, torch.randn_like(policy.action_token) * 5)
        second = [s[:, :-2] for s in states]
    for h in hooks:
        h.remove()
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_each_distinct_frame_of_a_batch_is_encoded_once(train_data, tmp_path) -> None:
    """Consecutive windows share frames: with the dataset's ``frame_id`` each distinct
    (frame, instruction) is encoded once, and features, loss and gradients are those of the
    per-window computation. Augmented samples carry no ``frame_id`` (their pixels differ)."""
    cfg = load_config(
        None,
        [
            *tiny_overrides(train_data, tmp_path),
            "train_setup.strategy=lora",
        ],
    )
    bundle = build_datasets(cfg)
    ds = bundle.val
    samples = [ds[i] for i in range(6)]
    b = collate(samples)
    ids = b["frame_id"]
    assert ids.shape == b["obs_mask"].shape
    flat = b["images"].flatten(0, 1)
    same = (ids.flatten()[:, None] == ids.flatten()[None]).numpy()
    for i, j in zip(*np.nonzero(same), strict=True):
        assert torch.equal(flat[i], flat[j])  # equal ids, equal pixels
    policy, _ = build_policy(cfg, bundle.stats)
    policy.eval()  # no dropout anywhere (the sentence encoder's too): the same function twice
    encoded: list[int] = []
    original = policy.frame_context

    def counting(images, texts):
        encoded.append(images.shape[0])
        return original(images, texts)

    policy.frame_context = counting  # type: ignore[method-assign]
    grads = []
    for use_ids in (True, False):
        batch_ = b if use_ids else {k: v for k, v in b.items() if k != "frame_id"}
        policy.zero_grad()
        loss, _ = policy.loss(batch_)
        loss.backward()
        grads.append(
            {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        )
        if use_ids:
            first_loss = loss.detach()
    torch.testing.assert_close(first_loss, loss.detach(), rtol=1e-5, atol=1e-6)
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6)
    distinct = len(
        {
            (i, t)
            for i, t in zip(
                ids.flatten().tolist(),
                [s for s in b["instruction"] for _ in range(ids.shape[1])],
                strict=True,
            )
        }
    )
    assert encoded == [distinct, ids.numel()] and distinct < ids.numel()
    aug = load_config(
        None, [*tiny_overrides(train_data, tmp_path), "data.augment.color_jitter=0.2"]
    )
    assert "frame_id" not in build_datasets(aug).train[0]
    assert "frame_id" in build_datasets(aug).val[0]


def test_merged_lora_is_the_same_function(tmp_path) -> None:
    """For inference ``load_policy`` folds each LoRA update into its base weight: the same
    outputs without the extra matmuls."""
    from mobile_vla.training.runs import merge_lora

    _, policy, _ = make("builtin", {}, tmp_path, "train_setup.strategy=lora")
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # B starts at zero: give the update something to merge
    policy.eval()
    b = batch()
    with torch.no_grad():
        before = policy(b).logits
        assert merge_lora(policy) > 0
        after = policy(b).logits
    assert merge_lora(policy) == 0  # already merged
    torch.testing.assert_close(before, after, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("strategy", ["frozen", "lora", "partial", "gradual"])
def test_frozen_parts_run_in_eval_mode_while_training(strategy, tmp_path) -> None:
    """Dropout is off in every module whose weights are all frozen (the sentence encoder
    included), so live frozen training computes what evaluation and the feature cache do;
    what trains is in train mode, and gradual's newly unfrozen layers leave eval mode."""
    _, policy, plan = make("builtin", {}, tmp_path, f"train_setup.strategy={strategy}")
    bb = policy.backbone
    assert policy.training and policy.head.training
    assert not bb.text_encoder.training and not bb.vision.training
    assert not any(m.training for m in bb.text_encoder.modules())
    if strategy == "lora":
        lora_dropout = [m for n, m in bb.fusion.named_modules() if n.endswith("lora_dropout")]
        assert lora_dropout and all(m.training for m in lora_dropout)
    if strategy == "partial":
        assert not bb.fusion[0].training and bb.fusion[-1].training
    if strategy == "gradual":
        assert not bb.fusion[-1].training
        plan.unfreeze_next()
        policy.train()
        assert bb.fusion[-1].training and not bb.fusion[0].training
    # the live frozen path is deterministic in train mode: the encoder's dropout is off
    if strategy == "frozen":
        b = batch()
        with torch.no_grad():
            torch.testing.assert_close(policy(b).logits, policy(b).logits, rtol=0, atol=0)


def test_frozen_text_gives_the_head_the_instruction(tmp_path) -> None:
    """frozen_text: each context vector is followed by the instruction's sentence embedding, so
    left and right give the head different inputs on the same frame; frozen does not get it,
    and a backbone without a sentence encoder refuses the strategy by name."""
    _, policy, plan = make("builtin", {}, tmp_path, "train_setup.strategy=frozen_text")
    _, frozen, _ = make("builtin", {}, tmp_path)
    assert plan.resolved.instruction_to_head and not frozen.instruction_to_head
    bb = policy.backbone
    frame = batch()["images"][:1, 0]
    left, right = "pass the box on the left", "pass the box on the right"
    with torch.no_grad():
        fl, fr = (policy.frame_features(frame, [t]) for t in (left, right))
        width = fl.shape[1] - bb.sentence_dim
        assert width == frozen.frame_features(frame, [left]).shape[1]
        assert (fl[:, width:] - fr[:, width:]).abs().max() > 0.1
        np.testing.assert_allclose(fl[0, width:].norm(), bb.sentence_dim**0.5, rtol=1e-4)
    # only the head and the action token train: the embedding is an input, not a weight
    changed = one_step(policy, plan)
    assert not any(v for n, v in changed.items() if n.startswith("backbone."))
    assert changed["head.trunk.lstm.weight_ih_l0"]


def test_frozen_text_needs_a_sentence_encoder(tiny_vlms, tmp_path) -> None:
    with pytest.raises(ConfigError, match=r"frozen_text.*sentence encoder.*kosmos2"):
        make("kosmos2", tiny_vlms, tmp_path, "train_setup.strategy=frozen_text")


def test_snap_to_keys_executes_teleop_keys(tmp_path) -> None:
    """head.snap_to_keys: small residual commands become 0 (a real stop), large ones the key
    speed of the training data, on both signs; off by default."""
    _, plain, _ = make("builtin", {}, tmp_path)
    _, snapping, _ = make("builtin", {}, tmp_path, "head.snap_to_keys=0.5")
    normalized = torch.tensor([[[0.0, 0.0], [0.95, -0.95], [-0.2, 0.3]]])
    raw = plain.to_physical(normalized)
    snapped = snapping.to_physical(normalized)
    keys = np.maximum(np.abs(STATS.min), np.abs(STATS.max))
    expect = np.where(np.abs(raw) > 0.5 * keys, np.sign(raw) * keys, 0.0)
    np.testing.assert_allclose(snapped, expect)
    assert (snapped == 0).any() and np.isclose(np.abs(snapped), keys).any()
    assert not np.allclose(raw, snapped)
    with pytest.raises(ConfigError, match=r"head\.snap_to_keys"):
        make("builtin", {}, tmp_path, "head.snap_to_keys=1.5")


def test_per_step_head_skips_padding_and_supervises_every_frame(tmp_path) -> None:
    """head.per_step: the latent after a left-padded window's last frame is the LSTM's state
    after its real frames alone (padding skipped, not fed as zeros); the per-step outputs of a
    window starting at frame 0 are, position by position, what the padded windows ending
    there give; and the loss of a per-step batch is the mean over its valid chunk steps."""
    _, plain, _ = make("builtin", {}, tmp_path)
    _, policy, plan = make("builtin", {}, tmp_path, "head.per_step=true")
    trunk = policy.head.trunk
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, trunk.lstm.input_size, generator=g)
    padded = torch.cat([torch.zeros_like(x[:, :2]), x[:, :2]], 1)
    mask = torch.tensor([[False, False, True, True]])
    with torch.no_grad():
        _, (h_real, _) = trunk.lstm(x[:, :2])
        torch.testing.assert_close(trunk(padded, mask), h_real[-1])
        plain.head.trunk.load_state_dict(trunk.state_dict())
        assert (plain.head.trunk(padded, mask) - h_real[-1]).abs().max() > 1e-4
        steps = trunk.every_step(x, torch.ones(1, 4))
        for t in range(4):
            left = torch.cat([torch.zeros_like(x[:, : 3 - t]), x[:, : t + 1]], 1)
            m = torch.arange(4)[None] >= 3 - t
            torch.testing.assert_close(trunk(left, m), steps[:, t])
    with pytest.raises(ValueError, match="real frames"):
        trunk.every_step(padded, mask)
    b = batch()
    b["obs_mask"] = torch.tensor([[True, True, False], [True, True, True]])
    b["actions"] = torch.rand(2, 3, 4, 2, generator=g) * 2 - 1
    b["action_mask"] = b["obs_mask"][..., None].expand(-1, -1, 4).clone()
    b["action_mask"][1, 2, 2:] = False
    loss, out = policy.loss(b)
    assert out.logits.shape == (6, 4, 2)
    rows = b["action_mask"].flatten(0, 1)
    per = torch.nn.functional.huber_loss(out.logits, b["actions"].flatten(0, 1), reduction="none")
    torch.testing.assert_close(loss, per.mean(-1)[rows].mean())
    changed = one_step(policy, plan)
    assert changed["head.trunk.lstm.weight_ih_l0"]
    with pytest.raises(ConfigError, match=r"head\.per_step"):
        make("builtin", {}, tmp_path, "head.per_step=true", "head.type=mlp")
    with pytest.raises(ConfigError, match=r"head\.per_step"):
        make("builtin", {}, tmp_path, "head.per_step=true", "backbone.history=pre")


def test_change_weight_weighs_the_frames_where_the_command_changes(tmp_path) -> None:
    """head.change_weight: the chunk entries whose command differs from the frame before (in
    the chunk, or across to the previous frame's first entry) weigh 1 + w in the training
    loss; padding and the window's first entry do not count; validation stays unweighted; and
    the key is refused without per-step windows."""
    from mobile_vla.models.policy import command_changes

    # commands of frames 0..5 along one episode: forward, forward, left, left, stop, stop
    seq = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    w_len, n = 3, 3
    actions = torch.stack([torch.stack([seq[w + j] for j in range(n)]) for w in range(w_len)])[None]
    mask = torch.ones(1, w_len, n, dtype=torch.bool)
    mask[0, 2, 2] = False  # frame 4 as the last entry of frame 2's chunk: padding
    expected = torch.tensor([[[0, 0, 1], [0, 1, 0], [1, 0, 0]]], dtype=torch.float32)
    torch.testing.assert_close(command_changes(actions, mask), expected)
    # a change next to padding does not count
    mask2 = mask.clone()
    mask2[0, 0, 1] = False
    assert command_changes(actions, mask2)[0, 0, 2] == 0

    _, policy, _ = make("builtin", {}, tmp_path, "head.per_step=true", "head.change_weight=3")
    b = batch()
    b["obs_mask"] = torch.tensor([[True, True, False], [True, True, True]])
    g = torch.Generator().manual_seed(2)
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    b["actions"] = keys[torch.randint(0, 3, (2, 3, 4), generator=g)]
    b["action_mask"] = b["obs_mask"][..., None].expand(-1, -1, 4).clone()
    policy.train()
    loss, out = policy.loss(b)
    flat = b["actions"].flatten(0, 1)
    per = torch.nn.functional.huber_loss(out.logits, flat, reduction="none").mean(-1)
    weight = (1 + 3 * command_changes(b["actions"], b["action_mask"])).flatten(0, 1)
    rows = b["action_mask"].flatten(0, 1)
    assert command_changes(b["actions"], b["action_mask"]).sum() > 0
    torch.testing.assert_close(loss, (per * weight)[rows].sum() / weight[rows].sum())
    assert not torch.allclose(loss, per[rows].mean())
    policy.eval()
    loss_eval, out = policy.loss(b)
    per = torch.nn.functional.huber_loss(out.logits, flat, reduction="none").mean(-1)
    torch.testing.assert_close(loss_eval, per[rows].mean())
    with pytest.raises(ConfigError, match=r"head\.change_weight"):
        make("builtin", {}, tmp_path, "head.change_weight=1")
    with pytest.raises(ConfigError, match=r"head\.change_weight"):
        make("builtin", {}, tmp_path, "head.per_step=true", "head.change_weight=-1")


def test_per_step_validation_loss_equals_one_window_per_frame(train_data, tmp_path) -> None:
    """With the window at least the episode's length, the per-step validation windows (one
    per episode) give exactly the loss of one left-padded window per frame: the same
    (frame, chunk step) pairs, the same predictions, since padding is skipped."""
    from mobile_vla.data.dataset import EpisodeDataset

    cfg = load_config(
        None, [*tiny_overrides(train_data, tmp_path), "head.per_step=true", "data.window_size=10"]
    )
    bundle = build_datasets(cfg)
    policy, _ = build_policy(cfg, bundle.stats)
    policy.eval()
    per_window = EpisodeDataset(bundle.split.val, cfg.data, bundle.normalizer)
    assert bundle.val.per_step and len(bundle.val) == len(bundle.split.val) < len(per_window)
    totals = []
    with torch.no_grad():
        for ds in (bundle.val, per_window):
            b = collate([ds[i] for i in range(len(ds))])
            loss, _ = policy.loss(b)
            totals.append(float(loss))
    assert totals[0] == pytest.approx(totals[1], rel=1e-5)
