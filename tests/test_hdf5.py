"""The episode format: round trip, the real robot's layout, and every malformed kind."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest

from mobile_vla.cli import main
from mobile_vla.config import DataConfig, SimConfig
from mobile_vla.data.episodes import load_episodes, scan_episodes
from mobile_vla.data.hdf5 import (
    FrameReader,
    parse_episode_name,
    read_episode_info,
    swap_left_right,
    verify_frames,
    write_episode,
)
from mobile_vla.errors import DataError, EpisodeError

from .conftest import smooth_frames, write_real_layout

STR = h5py.string_dtype("utf-8")


def test_write_read_round_trip(tmp_path: Path) -> None:
    frames = smooth_frames(7, 40, 56)
    actions = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32)
    events = ["episode_start"] + ["start_action"] * 6
    path = write_episode(
        tmp_path / "episode_20260101_090000_2box_right_far_00001.h5",
        frames,
        actions,
        "Navigate to the gray basket on the right",
        events,
        attrs={"time_period": "night", "seed": 5},
    )
    info = read_episode_info(path)
    assert info.num_frames == 7 and info.image_shape == (40, 56, 3)
    np.testing.assert_array_equal(info.actions, actions)
    assert info.instruction == "Navigate to the gray basket on the right"
    assert info.instruction_source == "file"
    assert (info.scenario, info.layout, info.side, info.distance) == (
        "2box_right",
        "2box",
        "right",
        "far",
    )
    assert info.event_types == events
    assert info.attrs["num_frames"] == 7 and info.attrs["seed"] == 5
    assert info.attrs["time_period"] == "night" and info.attrs["episode_name"] == path.stem
    assert info.compression == "gzip"
    with FrameReader(path) as reader:
        np.testing.assert_array_equal(reader.frames([0, 6, 3]), frames[[0, 6, 3]])
    with h5py.File(path) as fh:  # chunked per frame, as the robot writes
        assert fh["images"].chunks == (1, 40, 56, 3)
        assert fh["language_instruction"].shape == (1,)
    assert not list(tmp_path.glob(".*tmp"))  # atomic write left no temporary behind


@pytest.mark.parametrize("chunks", [True, (1, 24, 32, 3), None])
def test_frame_reader_reads_any_chunk_layout_in_any_order(tmp_path: Path, chunks) -> None:
    """h5py's automatic chunking (chunks spanning frames), one chunk per frame, contiguous:
    the same pixels for unordered and repeated indices; a frame past the end is an error."""
    images = np.random.default_rng(0).integers(0, 256, (7, 24, 32, 3), dtype=np.uint8)
    path = tmp_path / "ep.h5"
    with h5py.File(path, "w") as fh:
        gzip = "gzip" if chunks is not None else None
        fh.create_dataset("images", data=images, chunks=chunks, compression=gzip)
    with FrameReader(path) as reader:
        for idx in ([0, 1, 2, 3, 4, 5, 6], [6, 2, 3, 3, 0], [5]):
            got = reader.frames(idx)
            assert got.shape == (len(idx), 24, 32, 3)
            np.testing.assert_array_equal(got, images[idx])
        with pytest.raises(IndexError, match="out of range"):
            reader.frames([2, 7])


def test_real_robot_layout_loads(real_file: Path) -> None:
    info = read_episode_info(real_file)
    assert info.num_frames == 18 and info.image_shape == (720, 1280, 3)
    assert info.instruction_source == "name"
    assert info.instruction == (
        "Navigate around obstacles and reach the front of the beverage bottle on the left"
    )
    assert (info.scenario, info.side, info.distance) == ("1box_left", "left", "medium")
    verify_frames(real_file)
    other = read_episode_info(
        real_file, instruction_template="Navigate to the gray basket on the {side}"
    )
    assert other.instruction == "Navigate to the gray basket on the left"


def test_bytes_instruction_and_per_frame_instruction(tmp_path: Path) -> None:
    path = write_real_layout(tmp_path / "episode_20251106_141502_1box_right.h5", 4, 16, 16)
    with h5py.File(path, "a") as fh:
        fh.create_dataset("language_instruction", data=np.array([b"go right"] * 4))
    info = read_episode_info(path)
    assert info.instruction == "go right" and info.instruction_source == "file"


@pytest.mark.parametrize(
    ("name", "scenario", "side", "distance"),
    [
        ("episode_20251106_141502_1box_left_core_medium.h5", "1box_left", "left", "medium"),
        ("episode_20251106_141502_2box_right.h5", "2box_right", "right", None),
        ("episode_20251201_101010_v3_center_far.h5", "v3_center", "center", "far"),
        ("episode_20251201_101010_v3_left.h5", "v3_left", "left", None),
    ],
)
def test_parse_episode_name(
    name: str, scenario: str, side: str | None, distance: str | None
) -> None:
    parsed = parse_episode_name(name)
    assert (parsed.scenario, parsed.side, parsed.distance) == (scenario, side, distance)


def test_swap_left_right() -> None:
    assert swap_left_right("Go left, not right. LEFT! Left") == "Go right, not left. RIGHT! Right"
    assert swap_left_right("leftover bright") == "leftover bright"


# ---- malformed files: one test per kind -----------------------------------------------------


def _good(path: Path) -> Path:
    return write_real_layout(path, num_frames=5, height=12, width=16)


def _edit(fn: Callable[[h5py.File], None]) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        _good(path)
        with h5py.File(path, "a") as fh:
            fn(fh)
        return path

    return make


def _truncated(path: Path) -> Path:
    _good(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _not_hdf5(path: Path) -> Path:
    path.write_bytes(b"this is a text file, not an episode\n" * 10)
    return path


def _empty(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def _replace(key: str, data: np.ndarray, **kw: object) -> Callable[[h5py.File], None]:
    def fn(fh: h5py.File) -> None:
        del fh[key]
        fh.create_dataset(key, data=data, **kw)

    return fn


def _nan(fh: h5py.File) -> None:
    a = fh["actions"][()]
    a[2, 1] = np.nan
    fh["actions"][...] = a


def _zero_frames(fh: h5py.File) -> None:
    del fh["images"], fh["actions"], fh["action_event_types"]
    fh.create_dataset("images", shape=(0, 12, 16, 3), dtype=np.uint8)
    fh.create_dataset("actions", shape=(0, 3), dtype=np.float32)
    fh.attrs["num_frames"] = 0


def _bad_utf8(fh: h5py.File) -> None:
    fh.create_dataset(
        "language_instruction",
        data=np.array([b"go \xff\xfe left"]),
        dtype=h5py.string_dtype("ascii"),
    )


MALFORMED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "truncated": (_truncated, "truncated or corrupt"),
    "not_hdf5": (_not_hdf5, "not an HDF5 file"),
    "empty_file": (_empty, "empty"),
    "missing_images": (_edit(lambda fh: fh.__delitem__("images")), "missing dataset 'images'"),
    "missing_actions": (_edit(lambda fh: fh.__delitem__("actions")), "missing dataset 'actions'"),
    "length_mismatch": (
        _edit(_replace("actions", np.zeros((4, 3), np.float32))),
        "'images' has 5 frames but 'actions' has 4",
    ),
    "nan_actions": (_edit(_nan), "NaN or inf"),
    "inf_actions": (_edit(_replace("actions", np.full((5, 3), np.inf, np.float32))), "NaN or inf"),
    "action_width": (
        _edit(_replace("actions", np.zeros((5, 2), np.float32))),
        "must have shape (T, 3)",
    ),
    "image_rank": (
        _edit(_replace("images", np.zeros((5, 12, 16), np.uint8))),
        "must have shape (T, H, W, 3)",
    ),
    "image_dtype": (
        _edit(_replace("images", np.zeros((5, 12, 16, 3), np.float32))),
        "must be uint8, found float32",
    ),
    "zero_frames": (_edit(_zero_frames), "zero frames"),
    "undecodable_instruction": (_edit(_bad_utf8), "not valid UTF-8"),
    "empty_instruction": (
        _edit(lambda fh: fh.create_dataset("language_instruction", data=[""], dtype=STR)),
        "is empty",
    ),
    "num_frames_attr": (_edit(lambda fh: fh.attrs.__setitem__("num_frames", 18)), "num_frames=18"),
    "no_side_no_instruction": (
        lambda p: _good(p.with_name("episode_20251106_141502_v3.h5")),
        "names no side",
    ),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_file_gives_one_clear_message(kind: str, tmp_path: Path) -> None:
    make, expected = MALFORMED[kind]
    path = make(tmp_path / "episode_20251106_141502_1box_left_core.h5")
    with pytest.raises(EpisodeError) as err:
        read_episode_info(path)
    msg = str(err.value)
    assert msg.startswith(path.name + ": "), msg
    assert expected in msg, msg
    assert "\n" not in msg and "Traceback" not in msg


def test_corrupt_frame_chunk_is_reported(tmp_path: Path) -> None:
    path = _good(tmp_path / "episode_20251106_141502_1box_left.h5")
    with h5py.File(path) as fh:
        offset = fh["images"].id.get_chunk_info(2).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 64] = b"\x00" * 64
    path.write_bytes(bytes(raw))
    read_episode_info(path)  # first and last frame are fine
    with pytest.raises(EpisodeError, match="frame 2 cannot be decoded"):
        verify_frames(path)


def _dataset_with_bad(tmp_path: Path) -> tuple[Path, list[str]]:
    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(3):
        _good(folder / f"episode_20251106_14150{i}_1box_{'left' if i % 2 else 'right'}.h5")
    bad = []
    for kind in ("truncated", "not_hdf5", "nan_actions", "missing_images"):
        make, _ = MALFORMED[kind]
        bad.append(make(folder / f"episode_20251107_000000_2box_left_{kind}.h5").name)
    return folder, bad


def test_inspect_lists_every_bad_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder, bad = _dataset_with_bad(tmp_path)
    scan = scan_episodes(folder)
    assert len(scan.episodes) == 3 and sorted(e.path.name for e in scan.bad) == sorted(bad)
    code = main(["inspect", str(folder), "-q"])
    out = capsys.readouterr().out
    assert code == 1
    assert "7 files, 3 good episodes, 4 bad" in out
    for name in bad:
        assert sum(line.strip().startswith(name + ":") for line in out.splitlines()) == 1


def test_training_reader_refuses_bad_files_unless_skip_bad(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder, bad = _dataset_with_bad(tmp_path)
    with pytest.raises(DataError) as err:
        load_episodes(DataConfig(path=str(folder)))
    assert "4 bad episode file(s)" in str(err.value) and "skip_bad" in str(err.value)
    assert all(name in str(err.value) for name in bad)
    with caplog.at_level("WARNING"):
        eps = load_episodes(DataConfig(path=str(folder), skip_bad=True))
    assert len(eps) == 3
    assert "skipping 4 bad episode file(s)" in caplog.text
    assert all(name in caplog.text for name in bad)


def _data_overrides(folder: Path, tmp: Path, frame_cache: bool, size: str) -> list[str]:
    return [
        f"data.path={folder}",
        f"data.cache_dir={tmp / 'cache'}",
        f"data.frame_cache={str(frame_cache).lower()}",
        "data.window_size=2",
        "data.fwd_pred_next_n=2",
        f"data.image_size={size}",
    ]


def _corrupt_frame(path: Path, t: int) -> Path:
    with h5py.File(path) as fh:
        offset = fh["images"].id.get_chunk_info(t).byte_offset
    raw = bytearray(path.read_bytes())
    raw[offset : offset + 64] = b"\x00" * 64
    path.write_bytes(bytes(raw))
    return path


@pytest.mark.parametrize("frame_cache", [True, False])
def test_a_frame_that_cannot_be_decoded_is_a_bad_file_before_training(
    frame_cache: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from mobile_vla.config import load_config
    from mobile_vla.data.dataset import build_datasets

    folder = tmp_path / "data"
    folder.mkdir()
    for i in range(4):
        _good(folder / f"episode_20251106_14150{i}_1box_{'left' if i % 2 else 'right'}.h5")
    bad = _corrupt_frame(folder / "episode_20251106_141502_1box_right.h5", 2)
    over = [*_data_overrides(folder, tmp_path, frame_cache, "[12,16]"), "data.val_fraction=0.25"]
    with pytest.raises(DataError) as err:
        build_datasets(load_config(None, over))
    msg = str(err.value)
    assert bad.name in msg and "frame" in msg and "cannot be decoded" in msg
    assert "skip_bad" in msg
    with caplog.at_level("WARNING"):
        bundle = build_datasets(load_config(None, [*over, "data.skip_bad=true"]))
    kept = [e.path.name for e in bundle.split.train + bundle.split.val]
    assert len(kept) == 3 and bad.name not in kept and bad.name in caplog.text
    for ds in (bundle.train, bundle.val):  # every sample of what is kept decodes
        for i in range(len(ds)):
            ds[i]


def test_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_episodes(DataConfig(path=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="no files matching"):
        load_episodes(DataConfig(path=str(tmp_path)))


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mobile_vla.cli", "inspect", str(tmp_path / "missing")],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "mobile_vla.cli", "inspect", str(tmp_path), "--data.windw_size=3"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2 and "did you mean 'data.window_size'" in proc.stderr


def test_inspect_json_statistics(sim_dataset: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    assert main(["inspect", str(sim_dataset), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["episodes"] == 24 and report["frames"] == 24 * SimConfig().episode_length
    assert report["scenarios"] == {"1box_left": 6, "1box_right": 6, "2box_left": 6, "2box_right": 6}
    assert report["sides"] == {"left": 12, "right": 12}
    assert report["image_sizes"] == {"48x64": 24}
    assert set(report["actions"]) == {"linear_x", "linear_y", "angular_z"}
    assert set(report["actions"]["linear_y"]["top_values"]) <= {"-1.15", "0", "1.15"}
    assert report["bad_files"] == []


def _red_robot_file(path: Path) -> Path:
    """A robot-style file (no channel_order attribute) whose frames are a red scene as OpenCV
    stores it: BGR, so the stored bytes are (0, 0, 200)."""
    write_real_layout(path, num_frames=4, height=8, width=8)
    with h5py.File(path, "a") as fh:
        fh["images"][...] = np.broadcast_to(np.array([0, 0, 200], np.uint8), (4, 8, 8, 3))
    return path


@pytest.mark.parametrize("frame_cache", [True, False])
def test_bgr_files_reach_the_model_as_rgb(frame_cache: bool, tmp_path: Path) -> None:
    from mobile_vla.config import load_config
    from mobile_vla.data.dataset import build_datasets

    folder = tmp_path / "data"
    folder.mkdir()
    for i, side in enumerate(("left", "right", "left", "right")):
        _red_robot_file(folder / f"episode_20251106_14150{i}_1box_{side}.h5")
    # a file collect wrote says it is RGB: a red scene stored as (200, 0, 0)
    write_episode(
        folder / "episode_20251106_141509_1box_left.h5",
        np.broadcast_to(np.array([200, 0, 0], np.uint8), (4, 8, 8, 3)).copy(),
        np.zeros((4, 3), np.float32),
        "go left",
    )
    over = [*_data_overrides(folder, tmp_path, frame_cache, "[8,8]"), "data.val_fraction=0"]

    def colours(extra: list[str]) -> dict[str, tuple[int, ...]]:
        ds = build_datasets(load_config(None, [*over, *extra])).train
        return {
            ds.episodes[int(ds.index[i][0])].path.name: tuple(
                int(v) for v in ds[i]["images"][-1, :, 0, 0]
            )
            for i in range(len(ds))
        }

    robot = "episode_20251106_141500_1box_left.h5"
    collected = "episode_20251106_141509_1box_left.h5"
    auto = colours([])
    assert auto[robot] == (0, 0, 200)  # no recorded order: read as RGB, the red scene is blue
    assert auto[collected] == (200, 0, 0)  # collect records rgb
    forced = colours(["data.channel_order=bgr"])
    assert forced[robot] == (200, 0, 0) and forced[collected] == (0, 0, 200)
    assert colours(["data.channel_order=rgb"]) == auto
    with h5py.File(folder / collected) as fh:
        assert fh.attrs["channel_order"] == "rgb"


def test_inspect_reports_channel_order_and_writes_a_contact_sheet(tmp_path: Path, capsys) -> None:
    from PIL import Image

    folder = tmp_path / "data"
    folder.mkdir()
    _red_robot_file(folder / "episode_20251106_141500_1box_left.h5")
    sheet = tmp_path / "sheet.png"
    args = ["inspect", str(folder), "-q", "--sheet", str(sheet), "--data.image_size=[8,8]"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "channel order: rgb (assumed, not recorded)=1" in out and "channel_order=bgr" in out
    tile = np.asarray(Image.open(sheet).convert("RGB"))[0, 420:500]
    assert (tile == [0, 0, 200]).all(axis=-1).any()  # shown as the model would see it: blue
    assert main([*args[:-1], "--data.image_size=[8,8]", "--data.channel_order=bgr"]) == 0
    out = capsys.readouterr().out
    assert "channel order: bgr (data.channel_order)=1" in out
    tile = np.asarray(Image.open(sheet).convert("RGB"))[0, 420:500]
    assert (tile == [200, 0, 0]).all(axis=-1).any()


def test_names_seen_in_real_collections(tmp_path: Path) -> None:
    basket = read_episode_info(
        _good(tmp_path / "episode_20251106_141502_basket_1box_hori_left_core.h5")
    )
    assert basket.scenario.startswith("1box") and basket.side == "left"
    assert "basket" in basket.instruction and "bottle" not in basket.instruction
    assert "on the left" in basket.instruction
    center = read_episode_info(_good(tmp_path / "episode_20251106_141503_1box_v3_center.h5"))
    assert center.instruction.endswith("in the center") and "on the center" not in (
        center.instruction
    )
    evening = read_episode_info(
        _good(tmp_path / "episode_20251106_141504_2box_vert_right_medium_evening.h5")
    )
    assert evening.side == "right" and evening.distance == "medium"
    assert "beverage bottle on the right" in evening.instruction
    with pytest.raises(EpisodeError) as err:
        read_episode_info(_good(tmp_path / "episode_20250805_092219.h5"))
    msg = str(err.value)
    assert msg.startswith("episode_20250805_092219.h5: ") and "'language_instruction'" in msg


def test_a_git_lfs_pointer_says_so(tmp_path: Path) -> None:
    path = tmp_path / "episode_20251106_141502_1box_left.h5"
    path.write_text(
        "version https://git-lfs.github.com/spec/v1\n"
        "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
        "size 12345\n"
    )
    with pytest.raises(EpisodeError, match=r"Git LFS pointer.*git lfs pull"):
        read_episode_info(path)


def test_inspect_reports_mixed_speeds_and_motionless_episodes(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    old = np.zeros((5, 3), np.float32)
    old[1:, 0] = 0.5
    for i, (acts, side) in enumerate(
        [(None, "left"), (None, "right"), (old, "left"), (np.zeros((5, 3), np.float32), "right")]
    ):
        write_real_layout(
            folder / f"episode_20251106_14150{i}_1box_{side}.h5", 5, 12, 16, actions=acts
        )
    assert main(["inspect", str(folder), "-q"]) == 0
    out = capsys.readouterr().out
    assert "speed (largest |action| per episode): 0=1, 0.5=1, 1.15=2" in out
    assert "recorded at 2 speeds (0.5, 1.15" in out
    assert "1 episode(s) never move" in out and "episode_20251106_141503_1box_right.h5" in out
