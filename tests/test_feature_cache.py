"""The frozen-prefix feature cache: exact features, invalidation, corruption, training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from mobile_vla.config import load_config
from mobile_vla.data.dataset import build_datasets
from mobile_vla.training.feature_cache import PrefixCache, cache_applies
from mobile_vla.training.run import train
from mobile_vla.training.runs import build_policy

from .conftest import tiny_overrides


def setup(data: Path, tmp: Path, *extra: str):
    cfg = load_config(None, [*tiny_overrides(data, tmp), *extra])
    bundle = build_datasets(cfg)
    policy, _ = build_policy(cfg, bundle.stats)
    return cfg, bundle, policy


@torch.no_grad()
def assert_cached_context_is_live(policy, frames, instruction, kv, mask, hidden=None) -> None:
    """The action tokens' states from a cache entry equal those of the live backbone."""
    bb = policy.backbone
    live = bb.encode_post(bb.preprocess(frames), [instruction] * len(frames), policy.action_token)
    cached = bb.encode_from_prefix(
        torch.from_numpy(np.array(kv)),
        torch.from_numpy(mask)[None].expand(len(frames), -1),
        policy.action_token,
        None if hidden is None else torch.from_numpy(np.array(hidden)),
    )
    torch.testing.assert_close(cached, live, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_act", [1, 3])
def test_cached_prefix_is_bit_identical_and_gives_the_live_context(
    train_data, tmp_path, n_act
) -> None:
    cfg, bundle, policy = setup(train_data, tmp_path, f"backbone.n_action_tokens={n_act}")
    cache = PrefixCache(cfg, policy, bundle.train.frames)
    ep = bundle.train.episodes[0]
    kv, mask = cache.get(ep)
    bb = policy.backbone
    bb.eval()
    frames = torch.from_numpy(
        np.ascontiguousarray(bundle.train.frames.frames(ep).transpose(0, 3, 1, 2))
    )
    with torch.no_grad():
        live_kv, live_mask = bb.prefix(bb.preprocess(frames), [ep.instruction] * len(frames))
        assert np.array_equal(kv, live_kv.numpy()) and np.array_equal(mask, live_mask[0].numpy())
    assert_cached_context_is_live(policy, frames, ep.instruction, kv, mask)


def test_cache_is_invalidated_by_weights_preprocessing_and_data(train_data, tmp_path) -> None:
    cfg, bundle, policy = setup(train_data, tmp_path)
    base = PrefixCache(cfg, policy, bundle.train.frames)
    weight = policy.backbone.fusion[0].fc1.weight
    original = weight[0, 0].item()
    with torch.no_grad():
        weight[0, 0] = original + 1.0
    assert PrefixCache(cfg, policy, bundle.train.frames).root != base.root
    with torch.no_grad():
        weight[0, 0] = original
    assert PrefixCache(cfg, policy, bundle.train.frames).root == base.root
    other = load_config(
        None, [*tiny_overrides(train_data, tmp_path), "backbone.prompt='Robot: {instruction}'"]
    )
    assert PrefixCache(other, policy, bundle.train.frames).root != base.root
    ep = bundle.train.episodes[0]
    kv_path, _ = base._paths(ep)
    # different content in the episode file -> a different entry
    from mobile_vla.data.hdf5 import read_episode_info, write_episode

    copy = tmp_path / ep.path.name
    copy.write_bytes(ep.path.read_bytes())
    info = read_episode_info(copy)
    assert base._paths(info)[0] == kv_path  # same bytes, same entry
    write_episode(
        copy, 255 - np.asarray(bundle.train.frames.frames(ep)), info.actions, info.instruction
    )
    assert base._paths(read_episode_info(copy))[0] != kv_path


@pytest.mark.parametrize("damage", ["truncate", "wrong_shape"])
def test_corrupt_cache_entry_is_reported_and_rebuilt(damage, train_data, tmp_path, caplog) -> None:
    cfg, bundle, policy = setup(train_data, tmp_path)
    ep = bundle.train.episodes[1]
    good = np.array(PrefixCache(cfg, policy, bundle.train.frames).get(ep)[0])
    cache = PrefixCache(cfg, policy, bundle.train.frames)
    kv_path, _ = cache._paths(ep)
    if damage == "truncate":
        kv_path.write_bytes(kv_path.read_bytes()[:1000])
    else:
        np.save(kv_path, np.zeros((2, 3), np.float32))
    with caplog.at_level(logging.WARNING):
        again = np.array(cache.get(ep)[0])
    np.testing.assert_array_equal(again, good)
    assert len(cache.rebuilt) == 1 and "rebuilding" in caplog.text


def test_cache_applies_only_when_exact(train_data, tmp_path) -> None:
    from mobile_vla.data.normalization import ActionStats
    from mobile_vla.training.feature_cache import cache_split

    # the tiny backbone has 3 fusion layers
    for extra, split, reason in [
        ([], 3, "backbone frozen"),
        (["train_setup.strategy=lora"], 0, "fusion layers 0.. train"),
        (["train_setup.strategy=lora", "train_setup.lora_layers=1"], 2, "layers 2.. train"),
        (["train_setup.strategy=partial"], 1, "fusion layers 1.. train"),
        (["train_setup.strategy=full"], None, "below its fusion layers trains"),
        (["train_setup.strategy=gradual"], None, "gradual"),
        (["data.augment.mirror_prob=0.5"], None, "augmentation"),
        (["backbone.history=pre"], None, "pre"),
        (["data.feature_cache=false"], None, "off"),
    ]:
        cfg = load_config(None, [*tiny_overrides(train_data, tmp_path), *extra])
        stats = ActionStats.from_arrays(["linear_x", "linear_y"], [np.zeros((2, 2))])
        policy, _ = build_policy(cfg, stats)
        got, why = cache_split(cfg, policy)
        assert got == split and reason in why, (extra, got, why)
        assert cache_applies(cfg, policy)[0] == (split is not None)


@pytest.mark.parametrize(
    "extra",
    [
        ["train_setup.strategy=lora"],
        ["train_setup.strategy=lora", "train_setup.lora_layers=1"],
        ["train_setup.strategy=partial"],
    ],
    ids=["lora-all", "lora-top1", "partial"],
)
def test_cache_below_the_first_trainable_layer_gives_the_live_context(
    train_data, tmp_path, extra
) -> None:
    from mobile_vla.training.feature_cache import cache_split

    cfg, bundle, policy = setup(train_data, tmp_path, *extra)
    with torch.no_grad():  # adapters away from their zero start, so that they matter
        for p in policy.backbone.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    split, _ = cache_split(cfg, policy)
    cache = PrefixCache(cfg, policy, bundle.train.frames, split)
    ep = bundle.train.episodes[0]
    kv, mask, hidden = cache.entry(ep)
    assert kv.shape[1] == split and (hidden is None) == (split == 3)
    bb = policy.backbone
    policy.eval()
    frames = torch.from_numpy(
        np.ascontiguousarray(bundle.train.frames.frames(ep).transpose(0, 3, 1, 2))
    )
    assert_cached_context_is_live(policy, frames, ep.instruction, kv, mask, hidden)
    # training the adapted layers leaves the entry valid; changing what is below it does not
    again = PrefixCache(cfg, policy, bundle.train.frames, split)
    with torch.no_grad():
        bb.fusion[-1].fc1.weight.add_(1.0)
    assert PrefixCache(cfg, policy, bundle.train.frames, split).root == again.root
    with torch.no_grad():
        bb.vision.pos_embed.add_(1.0)
    assert PrefixCache(cfg, policy, bundle.train.frames, split).root != again.root


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["train_setup.strategy=lora", "train_setup.lora_layers=2", "train_setup.lora_dropout=0"],
        ["head.per_step=true"],
    ],
    ids=["frozen", "lora-top2", "per-step"],
)
def test_training_on_the_cache_matches_live_training(train_data, tmp_path, extra) -> None:
    losses = {}
    for flag in ("true", "false"):
        cfg = load_config(
            None,
            [
                *tiny_overrides(train_data, tmp_path),
                *extra,
                f"data.feature_cache={flag}",
                f"trainer.run_name=fc{flag}",
                "trainer.max_epochs=1",
            ],
        )
        run = train(cfg, progress=False)
        stats = json.loads((run / "train_stats.json").read_text())
        assert ("cached" in stats["feature_cache"]) == (flag == "true")
        rows = [r.split(",") for r in (run / "logs/csv/metrics.csv").read_text().splitlines()]
        losses[flag] = float([r for r in rows[1:] if r[-1]][-1][-1])
    # the cached path is exact: the same losses to float rounding (equal here, 2026-12-07)
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-6)


def test_batch_of_cached_prefixes_gives_the_live_window_features(train_data, tmp_path) -> None:
    """The collated batch (each distinct frame read once, trailing padding dropped) gives the
    same window features as encoding the batch's images live."""
    from mobile_vla.training.common import collate
    from mobile_vla.training.feature_cache import CachedPrefixDataset

    cfg, bundle, policy = setup(train_data, tmp_path)
    policy.eval()
    cache = PrefixCache(cfg, policy, bundle.train.frames)
    ds = CachedPrefixDataset(bundle.train, cache)
    picks = [0, 1, len(ds) - 1, len(ds) // 2]
    samples = [ds[i] for i in picks]
    distinct = {tuple(r) for s in samples for r in s["prefix_ref"].tolist()}
    batch = ds.collate(samples)
    live = collate([bundle.train[i] for i in picks])
    full = cache.get(bundle.train.episodes[0])[0].shape[3]
    used = batch["prefix_kv"].shape[3]
    assert used < full  # the text padding shared by every frame is not read
    assert batch["prefix_mask"].shape[1] == used and batch["prefix_mask"][:, -1].any()
    assert batch["prefix_kv"].shape[0] == len(distinct) < len(picks) * cfg.data.window_size
    with torch.no_grad():
        cached = policy.cached_window_features(
            batch["prefix_kv"], batch["prefix_mask"], batch["prefix_index"], batch["instruction"]
        )
        feats, _ = policy.window_features(live["images"], live["instruction"], live["obs_mask"])
    torch.testing.assert_close(cached, feats, rtol=1e-5, atol=1e-5)


def test_cache_that_would_not_fit_on_the_disk_is_refused_before_writing(
    train_data, tmp_path, monkeypatch
) -> None:
    """A memory-mapped write that runs out of disk kills the process (SIGBUS); the cache
    checks the space its missing entries need first, and names the folder and the way out.
    The estimate covers what the entries really take."""
    from collections import namedtuple

    from mobile_vla.errors import DataError
    from mobile_vla.training import feature_cache

    cfg, bundle, policy = setup(train_data, tmp_path)
    cache = PrefixCache(cfg, policy, bundle.train.frames)
    eps = bundle.train.episodes[:2]
    need = sum(cache.entry_bytes(ep) for ep in eps)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(
        feature_cache.shutil, "disk_usage", lambda p: usage(0, 0, need + (1 << 30) - 1)
    )
    with pytest.raises(DataError, match=r"needs .* GiB for 2 episodes.*data\.cache_dir"):
        cache.ensure(eps)
    assert not list(cache.root.glob("*.npy"))
    monkeypatch.undo()
    cache.ensure(eps)
    written = sum(p.stat().st_size for p in cache.root.glob("*.npy"))
    assert 0.9 * need < written <= need
    monkeypatch.setattr(feature_cache.shutil, "disk_usage", lambda p: usage(0, 0, 0))
    cache.ensure(eps)  # nothing missing: nothing to check
