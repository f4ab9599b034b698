"""Shared fixtures: small real-layout files and a small simulated dataset."""

from __future__ import annotations

import os
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from mobile_vla.config import BuiltinConfig, SimConfig

if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs two pytest-xdist workers on this 2-core machine: one torch thread each,
    # so the two do not oversubscribe the cores (processes the tests start keep the default)
    torch.set_num_threads(1)

REAL_NAME = "episode_20251106_141502_1box_left_core_medium.h5"


def smooth_frames(num_frames: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    """Camera-like frames (gradients + a moving block) that gzip compresses as real ones do."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    frames = np.empty((num_frames, height, width, 3), np.uint8)
    for t in range(num_frames):
        base = (xx * 200 // width + yy * 40 // height + t * 3) % 256
        frames[t, ..., 0] = base
        frames[t, ..., 1] = (base // 2 + 60) % 256
        frames[t, ..., 2] = 255 - base
        x0 = (t * width // max(num_frames, 1)) % max(width - width // 8, 1)
        frames[t, height // 3 : height // 2, x0 : x0 + width // 8] = rng.integers(0, 255, 3)
    return frames


def write_real_layout(
    path: Path,
    num_frames: int = 18,
    height: int = 720,
    width: int = 1280,
    actions: np.ndarray | None = None,
) -> Path:
    """A file exactly as the real robot's ROS 2 collector writes it, built with h5py directly:
    gzip frames chunked per frame, teleop actions, event types, no language_instruction."""
    if actions is None:
        actions = np.zeros((num_frames, 3), np.float32)
        actions[1:, 0] = 1.15
        actions[2:8, 1] = 1.15
        actions[10:15, 1] = -1.15
    events = ["episode_start"] + ["start_action"] * (num_frames - 2) + ["stop_action"]
    with h5py.File(path, "w") as fh:
        fh.create_dataset(
            "images",
            data=smooth_frames(num_frames, height, width),
            chunks=(1, height, width, 3),
            compression="gzip",
        )
        fh.create_dataset("actions", data=actions.astype(np.float32))
        fh.create_dataset(
            "action_event_types", data=events[:num_frames], dtype=h5py.string_dtype("utf-8")
        )
        fh.attrs["episode_name"] = path.stem
        fh.attrs["num_frames"] = num_frames
        fh.attrs["action_chunk_size"] = 10
        fh.attrs["time_period"] = "evening"
        fh.attrs["collection_datetime"] = "2025-11-06T14:15:02"
    return path


@pytest.fixture
def real_file(tmp_path: Path) -> Path:
    return write_real_layout(tmp_path / REAL_NAME)


@pytest.fixture(scope="session")
def small_sim_cfg() -> SimConfig:
    return SimConfig(image_size=[48, 64])


@pytest.fixture(scope="session")
def sim_dataset(tmp_path_factory: pytest.TempPathFactory, small_sim_cfg: SimConfig) -> Path:
    """24 simulated episodes (every layout x side x distance cell twice) at 48x64."""
    from mobile_vla.sim.collect import collect
    from mobile_vla.sim.scenario import parse_scenarios

    out = tmp_path_factory.mktemp("sim_data")
    collect(out, 24, parse_scenarios(["all"]), seed=0, workers=1, cfg=small_sim_cfg, progress=False)
    return out


# ---- policies ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_vlms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Kosmos-2, PaliGemma, LLaVA, Idefics3, Qwen2-VL and Qwen2.5-VL saved with
    save_pretrained, loaded through from_pretrained."""
    from . import tiny_models as tm

    root = tmp_path_factory.mktemp("vlms")
    return {
        "kosmos2": tm.save_tiny_kosmos2(root / "kosmos2"),
        "paligemma": tm.save_tiny_paligemma(root / "paligemma"),
        "llava": tm.save_tiny_llava(root / "llava"),
        "idefics3": tm.save_tiny_idefics3(root / "idefics3"),
        "qwen2_vl": tm.save_tiny_qwen2_vl(root / "qwen2_vl"),
        "qwen2_5_vl": tm.save_tiny_qwen2_vl(root / "qwen2_5_vl", "2.5"),
    }


@pytest.fixture(scope="session")
def train_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 simulated episodes at 32x32 for training tests."""
    from mobile_vla.sim.collect import collect
    from mobile_vla.sim.scenario import parse_scenarios

    out = tmp_path_factory.mktemp("train_data")
    collect(
        out,
        16,
        parse_scenarios(["all"]),
        seed=3,
        workers=1,
        cfg=SimConfig(image_size=[32, 32], episode_length=10),
        progress=False,
    )
    return out


TINY_BUILTIN = [
    "backbone.builtin.image_size=32",
    "backbone.builtin.patch_size=8",
    "backbone.builtin.vision_width=32",
    "backbone.builtin.vision_layers=2",
    "backbone.builtin.vision_heads=2",
    "backbone.builtin.fusion_width=32",
    "backbone.builtin.fusion_layers=3",
    "backbone.builtin.fusion_heads=2",
    "backbone.pretrained=false",  # the shipped weights are for the default geometry
]


def tiny_builtin_config() -> BuiltinConfig:
    from mobile_vla.config import load_config

    return load_config(None, TINY_BUILTIN).backbone.builtin


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two exported weight files (model cards included) for the tiny builtin geometry, from
    two random initialisations of the pretraining model."""
    import torch

    from mobile_vla.pretraining.model import PretrainModel
    from mobile_vla.pretraining.weights import export_weights

    root = tmp_path_factory.mktemp("weights")
    out = {}
    for i, name in enumerate(("tinyweights", "tinyweights2")):
        torch.manual_seed(100 + i)
        model = PretrainModel(tiny_builtin_config())
        out[name] = export_weights(
            model.backbone_state(), tiny_builtin_config(), root / f"w{i}.safetensors", {}
        )
    return out


def tiny_overrides(
    data: Path, out: Path, backbone: str = "builtin", vlms: dict[str, Path] | None = None
) -> list[str]:
    """A small, fast training setup on ``data`` writing runs under ``out``."""
    over = [
        f"data.path={data}",
        f"data.cache_dir={out / 'cache'}",
        "data.image_size=[32,32]",
        "data.window_size=3",
        "data.fwd_pred_next_n=4",
        "data.val_fraction=0.25",
        "head.hidden_size=32",
        "head.num_layers=1",
        "trainer.batch_size=8",
        "trainer.max_epochs=1",
        f"trainer.output_dir={out / 'runs'}",
        "trainer.log_every_n_steps=1",
        "train_setup.learning_rate=0.003",
    ]
    if backbone == "builtin":
        over += TINY_BUILTIN
    else:
        assert vlms is not None
        over += [f"backbone.name={backbone}", f"backbone.path={vlms[backbone]}"]
    return over


@pytest.fixture(scope="session")
def served_run(train_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny trained run that the serving tests (HTTP, /stream, openpi) serve."""
    from mobile_vla.config import load_config
    from mobile_vla.training.run import train

    tmp = tmp_path_factory.mktemp("serve")
    cfg = load_config(
        None,
        [
            *tiny_overrides(train_data, tmp),
            "trainer.run_name=srv",
            "trainer.max_steps=4",
            "sim.image_size=[48,48]",
            "sim.max_steps=10",
        ],
    )
    return train(cfg, progress=False)
