"""Every config key that exists has an effect: for each leaf key, two values give observably
different results (or one of them is refused). A key added without a line here fails
``test_every_key_is_covered``."""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mobile_vla.config import Config, load_config
from mobile_vla.errors import MobileVLAError

from .conftest import write_real_layout


def leaf_keys(cls: type = Config, prefix: str = "") -> set[str]:
    keys = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        name = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            keys |= leaf_keys(tp, name + ".")
        else:
            keys.add(name)
    return keys


def digest(*arrays: Any) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(
            np.ascontiguousarray(np.asarray(a)).tobytes() if not isinstance(a, str) else a.encode()
        )
        h.update(b"|")
    return h.hexdigest()


# ---- observables -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_env(sim_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    real = tmp_path_factory.mktemp("real")
    write_real_layout(
        real / "episode_20251106_141502_1box_left_core_medium.h5", height=36, width=64
    )
    write_real_layout(real / "episode_20251106_141503_1box_right_core_far.h5", height=36, width=64)
    bad = tmp_path_factory.mktemp("withbad")
    for p in sorted(sim_dataset.glob("episode_*.h5"))[:6]:
        (bad / p.name).write_bytes(p.read_bytes())
    (bad / "episode_20260101_000000_1box_left_broken.h5").write_bytes(b"not hdf5")
    return {"sim": sim_dataset, "real": real, "bad": bad, "cache": tmp_path_factory.mktemp("c")}


def data_observable(env: dict[str, Path], overrides: list[str]) -> str:
    from mobile_vla.data.dataset import build_datasets
    from mobile_vla.data.frame_cache import FrameCache

    base = [
        f"data.path={env['sim']}",
        f"data.cache_dir={env['cache']}",
        "data.image_size=[24, 32]",
        "data.val_fraction=0.25",
    ]
    cfg = load_config(None, base + overrides)
    try:
        bundle = build_datasets(cfg)
    except MobileVLAError as exc:
        return f"error: {type(exc).__name__}"
    parts: list[Any] = [
        str(len(bundle.train)),
        str(len(bundle.val)),
        ",".join(e.path.name for e in bundle.split.val),
        type(bundle.train.frames).__name__,
    ]
    if isinstance(bundle.train.frames, FrameCache):
        parts.append(str(bundle.train.frames.root))
    for ds in (bundle.train, bundle.val):
        for i in range(0, len(ds), max(1, len(ds) // 7)):
            s = ds[i]
            parts += [
                s["images"].numpy(),
                s["obs_mask"].numpy(),
                s["actions"].numpy(),
                s["action_mask"].numpy(),
                s["instruction"],
            ]
    return digest(*parts)


def sim_observable(overrides: list[str]) -> str:
    from mobile_vla.sim.env import NavEnv
    from mobile_vla.sim.expert import run_expert
    from mobile_vla.sim.scenario import make_scenario

    cfg = load_config(None, ["sim.image_size=[24, 32]", *overrides]).sim
    env = NavEnv(cfg)
    try:
        scenario = make_scenario(5, "1box", "left", "medium", cfg)
        ep = run_expert(env, scenario)
        return digest(ep.frames, ep.actions, scenario.instruction, str(env.trajectory))
    finally:
        env.close()


DATA: dict[str, tuple[str, str]] = {
    "seed": ("seed=0", "seed=1"),
    "data.path": ("", "data.path=/nonexistent/folder"),
    "data.pattern": ("", "data.pattern=episode_*2box*.h5"),
    "data.action_names": ("", "data.action_names=[linear_y,linear_x,angular_z]"),
    "data.action_dims": ("", "data.action_dims=[linear_y]"),
    "data.window_size": ("", "data.window_size=3"),
    "data.fwd_pred_next_n": ("", "data.fwd_pred_next_n=4"),
    "data.chunk_offset": ("", "data.chunk_offset=1"),
    "data.image_size": ("", "data.image_size=[16,16]"),
    "data.val_fraction": ("", "data.val_fraction=0.5"),
    "data.normalization": ("", "data.normalization=meanstd"),
    "data.frame_cache": ("", "data.frame_cache=false"),
    "data.augment.color_jitter": ("", "data.augment.color_jitter=0.4"),
    "data.augment.shift_pixels": ("", "data.augment.shift_pixels=4"),
    "data.augment.mirror_prob": ("", "data.augment.mirror_prob=1.0"),
}
SIM: dict[str, tuple[str, str]] = {
    "sim.image_size": ("", "sim.image_size=[16,16]"),
    "sim.control_hz": ("", "sim.control_hz=5"),
    "sim.physics_timestep": ("", "sim.physics_timestep=0.02"),
    "sim.episode_length": ("", "sim.episode_length=10"),
    "sim.max_steps": ("sim.episode_length=0", "sim.episode_length=0 sim.max_steps=5"),
    "sim.teleop_actions": ("", "sim.teleop_actions=false"),
    "sim.speed": ("", "sim.speed=0.8"),
    "sim.action_noise": ("", "sim.action_noise=0.5"),
    "sim.noise_steps": ("sim.action_noise=0.3", "sim.action_noise=0.3 sim.noise_steps=4"),
    "sim.paraphrase_prob": ("sim.paraphrase_prob=0", "sim.paraphrase_prob=1"),
    "sim.targets": ("sim.targets=[bottle]", "sim.targets=[basket]"),
    "sim.yaw_jitter_deg": (
        "sim.teleop_actions=false",
        "sim.teleop_actions=false sim.yaw_jitter_deg=20",
    ),
    "sim.randomize_appearance": ("", "sim.randomize_appearance=false"),
}
# Keys whose effect needs a dataset of another kind.
SPECIAL = {"data.skip_bad", "data.instruction_template", "data.cache_dir"}


def test_every_key_is_covered() -> None:
    assert leaf_keys() == set(DATA) | set(SIM) | SPECIAL


@pytest.mark.parametrize("key", sorted(DATA))
def test_data_key_has_effect(key: str, data_env: dict[str, Path]) -> None:
    a, b = DATA[key]
    assert data_observable(data_env, a.split()) != data_observable(data_env, b.split())


@pytest.mark.parametrize("key", sorted(SIM))
def test_sim_key_has_effect(key: str) -> None:
    a, b = SIM[key]
    assert sim_observable(a.split()) != sim_observable(b.split())


def test_skip_bad_has_effect(data_env: dict[str, Path]) -> None:
    bad = f"data.path={data_env['bad']}"
    assert data_observable(data_env, [bad]) == "error: DataError"
    assert not data_observable(data_env, [bad, "data.skip_bad=true"]).startswith("error")


def test_instruction_template_has_effect(data_env: dict[str, Path]) -> None:
    real = f"data.path={data_env['real']}"
    a = data_observable(data_env, [real])
    b = data_observable(
        data_env, [real, "data.instruction_template='Go to the basket on the {side}'"]
    )
    assert a != b


def test_cache_dir_has_effect(data_env: dict[str, Path], tmp_path: Path) -> None:
    elsewhere = f"data.cache_dir={tmp_path / 'elsewhere'}"
    assert data_observable(data_env, []) != data_observable(data_env, [elsewhere])
    assert any((tmp_path / "elsewhere" / "frames").rglob("*.npy"))
