"""Windows, padding and masks; splits; normalization; augmentation; the frame cache."""

from __future__ import annotations

import logging
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from mobile_vla.config import AugmentConfig, Config, DataConfig, SimConfig, load_config
from mobile_vla.data.augmentation import augment
from mobile_vla.data.dataset import EpisodeDataset, build_datasets, side_of_instruction
from mobile_vla.data.episodes import load_episodes, split_episodes, train_subset
from mobile_vla.data.frame_cache import DirectFrames, FrameCache, resize_frames
from mobile_vla.data.hdf5 import read_episode_info, write_episode
from mobile_vla.data.normalization import ActionStats, Normalizer

from .conftest import smooth_frames, write_real_layout


def five_frame_episode(tmp_path: Path) -> Path:
    actions = np.array([[1, 2, 0], [3, 4, 0], [5, 6, 0], [7, 8, 0], [9, 10, 0]], np.float32)
    return write_episode(
        tmp_path / "episode_20260101_000000_1box_left_close_00000.h5",
        smooth_frames(5, 12, 16),
        actions,
        "go on the left",
    )


def identity_normalizer(dims: int = 2) -> Normalizer:
    stats = ActionStats.from_arrays(["a"] * dims, [np.zeros((2, dims))])
    return Normalizer(stats, "none")


def test_windows_padding_and_masks_on_a_five_frame_episode(tmp_path: Path) -> None:
    ep = read_episode_info(five_frame_episode(tmp_path))
    cfg = DataConfig(window_size=3, fwd_pred_next_n=4, image_size=[12, 16], frame_cache=False)
    ds = EpisodeDataset([ep], cfg, identity_normalizer())
    assert len(ds) == 5  # one sample per frame, although 5 < window + chunk
    raw = smooth_frames(5, 12, 16).transpose(0, 3, 1, 2)

    s0 = ds[0]
    assert s0["images"].shape == (3, 3, 12, 16) and s0["images"].dtype.is_floating_point is False
    assert s0["obs_mask"].tolist() == [False, False, True]
    np.testing.assert_array_equal(s0["images"][2].numpy(), raw[0])
    np.testing.assert_array_equal(s0["images"][0].numpy(), raw[0])  # padding repeats frame 0
    assert s0["action_mask"].tolist() == [True, True, True, True]
    np.testing.assert_array_equal(s0["actions"].numpy(), [[1, 2], [3, 4], [5, 6], [7, 8]])

    s3 = ds[3]
    assert s3["obs_mask"].tolist() == [True, True, True]
    np.testing.assert_array_equal(s3["images"].numpy(), raw[[1, 2, 3]])
    assert s3["action_mask"].tolist() == [True, True, False, False]
    np.testing.assert_array_equal(s3["actions"].numpy(), [[7, 8], [9, 10], [0, 0], [0, 0]])

    s4 = ds[4]
    assert s4["action_mask"].tolist() == [True, False, False, False]
    assert (s4["episode"], s4["frame"]) == (0, 4)

    shifted = EpisodeDataset(
        [ep],
        DataConfig(
            window_size=3, fwd_pred_next_n=4, chunk_offset=1, image_size=[12, 16], frame_cache=False
        ),
        identity_normalizer(),
    )
    assert len(shifted) == 4  # the last frame has no action after it
    np.testing.assert_array_equal(shifted[0]["actions"].numpy()[0], [3, 4])
    with pytest.raises(IndexError):
        ds[5]


def test_one_frame_episode_yields_a_sample(tmp_path: Path) -> None:
    path = write_episode(
        tmp_path / "episode_20260101_000000_1box_right.h5",
        smooth_frames(1, 8, 8),
        np.ones((1, 3), np.float32),
        None,
    )
    ep = read_episode_info(path)
    ds = EpisodeDataset(
        [ep], DataConfig(image_size=[8, 8], frame_cache=False), identity_normalizer()
    )
    assert len(ds) == 1
    s = ds[0]
    assert s["obs_mask"].sum() == 1 and s["action_mask"].sum() == 1
    assert s["side"] == -1


def _fake_episodes(tmp_path: Path, counts: dict[str, int]) -> list:
    eps = []
    i = 0
    for scenario, n in counts.items():
        for _ in range(n):
            path = write_episode(
                tmp_path / f"episode_20260101_{i:06d}_{scenario}.h5",
                np.zeros((2, 4, 4, 3), np.uint8),
                np.zeros((2, 3), np.float32),
                "x",
            )
            eps.append(read_episode_info(path))
            i += 1
    return eps


def test_split_is_stratified_deterministic_and_order_free(tmp_path: Path) -> None:
    counts = {"1box_left": 10, "1box_right": 10, "2box_left": 20, "2box_right": 5}
    eps = _fake_episodes(tmp_path, counts)
    split = split_episodes(eps, 0.2, seed=3)
    val = Counter(e.scenario for e in split.val)
    assert val == {"1box_left": 2, "1box_right": 2, "2box_left": 4, "2box_right": 1}
    assert not {e.path for e in split.val} & {e.path for e in split.train}
    assert len(split.val) + len(split.train) == len(eps)
    again = split_episodes(list(reversed(eps)), 0.2, seed=3)
    assert again.to_json() == split.to_json()
    other = split_episodes(eps, 0.2, seed=4)
    assert other.to_json() != split.to_json()
    # not the sorted-file-name split of earlier loaders
    names = sorted(e.path.name for e in eps)
    assert [e.path.name for e in split.val] != names[-len(split.val) :]


def test_test_split_is_stratified_disjoint_and_leaves_validation_as_it_was(tmp_path: Path) -> None:
    counts = {"1box_left": 10, "1box_right": 10, "2box_left": 20, "2box_right": 2}
    eps = _fake_episodes(tmp_path, counts)
    split = split_episodes(eps, 0.2, seed=3, test_fraction=0.2)
    test = Counter(e.scenario for e in split.test)
    # a 2-episode stratum keeps one for training and gives its other to validation first
    assert test == {"1box_left": 2, "1box_right": 2, "2box_left": 4}
    parts = [{e.path for e in p} for p in (split.train, split.val, split.test)]
    assert not parts[0] & parts[1] and not parts[0] & parts[2] and not parts[1] & parts[2]
    assert sum(map(len, parts)) == len(eps)
    assert split.val == split_episodes(eps, 0.2, seed=3).val  # validation unchanged
    assert set(split.to_json()) == {"train", "val", "test"}
    assert "test" not in split_episodes(eps, 0.2, seed=3).to_json()


def test_train_subsets_are_nested_and_stratified(tmp_path: Path) -> None:
    counts = {"1box_left": 10, "1box_right": 10, "2box_left": 20, "2box_right": 5}
    train = split_episodes(_fake_episodes(tmp_path, counts), 0.2, seed=3).train
    small, large = train_subset(train, 8, 3), train_subset(train, 20, 3)
    assert len(small) == 8 and len(large) == 20
    assert {e.path for e in small} <= {e.path for e in large}
    assert Counter(e.scenario for e in small) == {
        "1box_left": 2,
        "1box_right": 2,
        "2box_left": 2,
        "2box_right": 2,
    }
    assert train_subset(train, 8, 4) != small
    assert train_subset(train, 0, 3) == list(train)


def test_normalization_uses_training_split_only(sim_dataset: Path, tmp_path: Path) -> None:
    cfg = load_config(
        None,
        [
            f"data.path={sim_dataset}",
            f"data.cache_dir={tmp_path}",
            "data.image_size=[24, 32]",
            "data.val_fraction=0.25",
        ],
    )
    bundle = build_datasets(cfg)
    train_actions = np.concatenate([e.actions[:, :2] for e in bundle.split.train]).astype(float)
    np.testing.assert_allclose(bundle.stats.mean, train_actions.mean(0), rtol=1e-6)
    np.testing.assert_allclose(bundle.stats.q99, np.quantile(train_actions, 0.99, axis=0))
    assert bundle.stats.count == len(train_actions)
    bundle.stats.save(tmp_path / "stats.json")
    loaded = ActionStats.load(tmp_path / "stats.json")
    np.testing.assert_allclose(loaded.q01, bundle.stats.q01)
    for mode in ("minmax", "meanstd", "quantile", "none"):
        norm = Normalizer(bundle.stats, mode)
        np.testing.assert_allclose(
            norm.denormalize(norm.normalize(train_actions[:50])), train_actions[:50], atol=1e-5
        )


def test_mirror_changes_image_actions_and_instruction_together() -> None:
    frames = smooth_frames(3, 8, 10)
    actions = np.array([[1.0, 0.5, 0.2], [1.0, -1.15, 0.0]], np.float32)
    rng = np.random.default_rng(0)
    out = augment(
        frames,
        actions,
        "Go around the box on the left",
        ["linear_x", "linear_y", "angular_z"],
        AugmentConfig(mirror_prob=1.0),
        rng,
    )
    assert out.mirrored
    np.testing.assert_array_equal(out.frames, frames[:, :, ::-1])
    np.testing.assert_array_equal(
        out.actions, np.array([[1.0, -0.5, -0.2], [1.0, 1.15, 0.0]], np.float32)
    )
    assert out.instruction == "Go around the box on the right"


def test_train_augmentation_is_a_function_of_index_and_epoch(
    sim_dataset: Path, tmp_path: Path
) -> None:
    cfg = load_config(
        None,
        [
            f"data.path={sim_dataset}",
            f"data.cache_dir={tmp_path}",
            "data.image_size=[24, 32]",
            "data.augment.mirror_prob=0.5",
            "data.augment.color_jitter=0.3",
            "data.augment.shift_pixels=2",
        ],
    )
    state = np.random.get_state()
    ds = build_datasets(cfg).train
    a, b = ds[7], ds[7]
    assert np.array_equal(a["images"], b["images"]) and a["instruction"] == b["instruction"]
    ds.set_epoch(1)
    mirrored = Counter(ds[i]["mirrored"] for i in range(len(ds)))
    assert mirrored[True] > 0.3 * len(ds) and mirrored[False] > 0.3 * len(ds)
    for i in range(len(ds)):
        s = ds[i]
        assert s["side"] == side_of_instruction(s["instruction"])
    # the global numpy RNG was not touched
    assert all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x == y
        for x, y in zip(state, np.random.get_state(), strict=True)
    )


def test_mirrored_sample_negates_linear_y(sim_dataset: Path, tmp_path: Path) -> None:
    base = [
        f"data.path={sim_dataset}",
        f"data.cache_dir={tmp_path}",
        "data.image_size=[24, 32]",
        "data.normalization=none",
        "data.val_fraction=0",
    ]
    plain = build_datasets(load_config(None, base)).train
    flipped = build_datasets(load_config(None, [*base, "data.augment.mirror_prob=1"])).train
    for i in range(0, len(plain), 37):
        p, f = plain[i], flipped[i]
        np.testing.assert_array_equal(f["actions"][:, 0], p["actions"][:, 0])
        np.testing.assert_array_equal(f["actions"][:, 1], -p["actions"][:, 1])
        np.testing.assert_array_equal(f["images"].numpy(), p["images"].numpy()[..., ::-1])
        assert f["side"] == -p["side"] != 0


# ---- frame cache ------------------------------------------------------------------------------


def test_frame_cache_equals_direct_decoding(real_file: Path, tmp_path: Path) -> None:
    ep = read_episode_info(real_file)
    cache = FrameCache(tmp_path / "cache", (224, 224))
    cached = cache.frames(ep)
    assert isinstance(cached, np.memmap) and cached.shape == (18, 224, 224, 3)
    direct = DirectFrames((224, 224)).window(ep, [0, 5, 17])
    np.testing.assert_array_equal(np.asarray(cached[[0, 5, 17]]), direct)
    cfg = DataConfig(image_size=[224, 224])
    norm = identity_normalizer()
    a = EpisodeDataset([ep], cfg, norm, frame_source=cache)[9]
    b = EpisodeDataset([ep], cfg, norm, frame_source=DirectFrames((224, 224)))[9]
    np.testing.assert_array_equal(a["images"].numpy(), b["images"].numpy())


def test_frame_cache_rebuilds_when_the_source_changes(tmp_path: Path) -> None:
    path = write_real_layout(tmp_path / "episode_20251106_141502_1box_left.h5", 4, 32, 48)
    cache = FrameCache(tmp_path / "cache", (16, 16))
    first = np.asarray(cache.frames(read_episode_info(path))).copy()
    cache.save_index()
    key = cache.content_key(path)
    # same content rewritten (new mtime): same key, entry reused
    path.write_bytes(path.read_bytes())
    assert FrameCache(tmp_path / "cache", (16, 16)).content_key(path) == key
    # different content: new key, new frames
    write_episode(path, 255 - smooth_frames(4, 32, 48), np.zeros((4, 3), np.float32), "x")
    fresh = FrameCache(tmp_path / "cache", (16, 16))
    assert fresh.content_key(path) != key
    second = np.asarray(fresh.frames(read_episode_info(path)))
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(second, resize_frames(255 - smooth_frames(4, 32, 48), (16, 16)))
    # another size is another entry
    assert FrameCache(tmp_path / "cache", (8, 8)).entry_path(key) != cache.entry_path(key)


@pytest.mark.parametrize("damage", ["truncate", "wrong_shape", "garbage"])
def test_corrupt_cache_entry_is_reported_and_rebuilt(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = write_real_layout(tmp_path / "episode_20251106_141502_1box_left.h5", 4, 32, 48)
    ep = read_episode_info(path)
    cache = FrameCache(tmp_path / "cache", (16, 16))
    good = np.asarray(cache.frames(ep)).copy()
    entry = cache.entry_path(cache.content_key(path))
    if damage == "truncate":
        data = entry.read_bytes()
        entry.write_bytes(data[: len(data) // 2])
    elif damage == "wrong_shape":
        np.save(entry, np.zeros((3, 16, 16, 3), np.uint8))
    else:
        entry.write_bytes(os.urandom(500))
    again = FrameCache(tmp_path / "cache", (16, 16))
    with caplog.at_level(logging.WARNING):
        rebuilt = np.asarray(again.frames(ep))
    np.testing.assert_array_equal(rebuilt, good)
    assert len(again.rebuilt) == 1 and "rebuilding" in caplog.text and entry.name in caplog.text


def test_build_datasets_end_to_end(sim_dataset: Path, tmp_path: Path) -> None:
    cfg = Config()
    cfg.data = DataConfig(
        path=str(sim_dataset), cache_dir=str(tmp_path), image_size=[48, 64], val_fraction=0.25
    )
    bundle = build_datasets(cfg)
    assert len(bundle.split.train) == 16 and len(bundle.split.val) == 8
    n = SimConfig().episode_length
    assert len(bundle.train) == 16 * n and len(bundle.val) == 8 * n
    s = bundle.val[0]
    assert s["images"].shape == (8, 3, 48, 64) and s["actions"].shape == (10, 2)
    assert float(s["actions"].abs().max()) <= 1.0
    assert len(load_episodes(cfg.data)) == 24


def test_per_step_windows_start_at_0_w_2w_and_carry_a_chunk_per_frame(tmp_path: Path) -> None:
    """head.per_step: windows s .. s+W-1 for s = 0, W, ..., padding after the episode's end,
    and the chunk after each frame, masked at padding frames and past the episode."""
    ep = read_episode_info(five_frame_episode(tmp_path))
    cfg = DataConfig(
        window_size=3, fwd_pred_next_n=2, chunk_offset=1, image_size=[12, 16], frame_cache=False
    )
    ds = EpisodeDataset([ep], cfg, identity_normalizer(), per_step=True)
    assert len(ds) == 2
    raw = smooth_frames(5, 12, 16).transpose(0, 3, 1, 2)
    s0, s1 = ds[0], ds[1]
    assert (s0["frame"], s1["frame"]) == (0, 3)
    assert s0["obs_mask"].tolist() == [True] * 3
    np.testing.assert_array_equal(s0["images"].numpy(), raw[[0, 1, 2]])
    assert s0["actions"].shape == (3, 2, 2)
    np.testing.assert_array_equal(
        s0["actions"].numpy(), [[[3, 4], [5, 6]], [[5, 6], [7, 8]], [[7, 8], [9, 10]]]
    )
    assert s0["action_mask"].all()
    assert s1["obs_mask"].tolist() == [True, True, False]
    np.testing.assert_array_equal(s1["images"].numpy()[:2], raw[[3, 4]])
    np.testing.assert_array_equal(s1["actions"].numpy()[0], [[9, 10], [0, 0]])
    # frame 4 is the last: no action follows it; the third position is padding
    assert s1["action_mask"].tolist() == [[True, False], [False, False], [False, False]]
    # the same windows the frame ids name
    np.testing.assert_array_equal(s1["frame_id"].numpy()[:2], [3, 4])


def test_counterfactual_episodes_follow_their_source(tmp_path: Path) -> None:
    """A derived episode (counterfactual_of) shares its source's frames: it goes to its
    source's part, never to test, is left out of the stratification, comes with its source
    in a training subset, and data.counterfactual=false drops it."""
    counts = {"1box_left": 10, "1box_right": 10}
    eps = _fake_episodes(tmp_path, counts)
    twins = []
    for src in eps:
        path = write_episode(
            tmp_path / (src.path.stem + "_cf.h5"),
            np.zeros((2, 4, 4, 3), np.uint8),
            np.zeros((2, 3), np.float32),
            "x",
            attrs={"counterfactual_of": src.path.stem},
        )
        twins.append(read_episode_info(path))
    plain = split_episodes(eps, 0.2, seed=3, test_fraction=0.2)
    split = split_episodes(eps + twins, 0.2, seed=3, test_fraction=0.2)
    names = {p: {e.path.name for e in getattr(split, p)} for p in ("train", "val", "test")}
    for part in ("train", "val"):
        sources = {e.path.name for e in getattr(plain, part)}
        assert names[part] == sources | {n.replace(".h5", "_cf.h5") for n in sources}
    assert names["test"] == {e.path.name for e in plain.test}  # recorded episodes only
    sub = train_subset(split.train, 4, 3)
    assert len([e for e in sub if e.source is None]) == 4
    assert {e.source for e in sub if e.source} == {e.path.stem for e in sub if not e.source}
    base = [f"data.path={tmp_path}", "data.image_size=[8,8]", "data.val_fraction=0.2"]
    with_twins = build_datasets(load_config(None, base)).split
    assert len(with_twins.train) + len(with_twins.val) == len(eps + twins)
    without = build_datasets(load_config(None, [*base, "data.counterfactual=false"])).split
    assert all(e.source is None for e in without.train + without.val)
    assert len(without.train) + len(without.val) == len(eps)
