"""LeRobot v3.0 export and import: the documented layout, and a lossless round trip of actions
and instructions with frames within video-codec tolerance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mobile_vla.cli import main
from mobile_vla.data.episodes import scan_episodes
from mobile_vla.data.hdf5 import FrameReader
from mobile_vla.errors import DataError


@pytest.fixture(scope="module")
def exported(sim_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lerobot") / "ds"
    assert main(["export-lerobot", str(sim_dataset), str(out)]) == 0
    return out


def test_export_follows_the_v3_layout(exported: Path, sim_dataset: Path) -> None:
    info = json.loads((exported / "meta" / "info.json").read_text())
    episodes = scan_episodes(sim_dataset).episodes
    total = sum(e.num_frames for e in episodes)
    assert info["codebase_version"] == "v3.0" and info["fps"] == 10
    assert info["total_episodes"] == len(episodes) == 24 and info["total_frames"] == total
    assert info["data_path"] == "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
    assert info["video_path"].startswith("videos/{video_key}/chunk-{chunk_index:03d}/")
    cam = info["features"]["observation.images.front"]
    assert cam["dtype"] == "video" and cam["shape"] == [48, 64, 3]
    assert info["features"]["action"]["names"] == ["linear_x", "linear_y", "angular_z"]
    frames = pq.read_table(exported / "data" / "chunk-000" / "file-000.parquet")
    schema = {f.name: str(f.type) for f in frames.schema}
    assert schema["action"].startswith("fixed_size_list<element: float>[3]")
    for col in ("frame_index", "episode_index", "index", "task_index"):
        assert schema[col] == "int64"
    assert frames.num_rows == total and frames.column("index").to_pylist() == list(range(total))
    eps = pq.read_table(exported / "meta" / "episodes" / "chunk-000" / "file-000.parquet")
    need = {
        "episode_index",
        "tasks",
        "length",
        "dataset_from_index",
        "dataset_to_index",
        "data/chunk_index",
        "data/file_index",
        "videos/observation.images.front/from_timestamp",
        "videos/observation.images.front/to_timestamp",
    }
    assert need <= set(eps.column_names)
    tasks = pq.read_table(exported / "meta" / "tasks.parquet").to_pydict()
    assert sorted(tasks["task"]) == sorted({e.instruction for e in episodes})
    stats = json.loads((exported / "meta" / "stats.json").read_text())
    assert stats["action"]["count"] == [total] and len(stats["action"]["mean"]) == 3
    video = exported / "videos" / "observation.images.front" / "chunk-000" / "file-000.mp4"
    assert video.is_file()


def test_round_trip_keeps_actions_instructions_and_frames(
    exported: Path, sim_dataset: Path, tmp_path: Path
) -> None:
    back = tmp_path / "back"
    assert main(["import-lerobot", str(exported), str(back)]) == 0
    original = {e.path.name: e for e in scan_episodes(sim_dataset).episodes}
    returned = {e.path.name: e for e in scan_episodes(back).episodes}
    assert set(returned) == set(original)  # the file names travel with the episodes
    errors = []
    for name, a in original.items():
        b = returned[name]
        np.testing.assert_array_equal(a.actions, b.actions)
        assert a.instruction == b.instruction and a.scenario == b.scenario
        with FrameReader(a.path) as ra, FrameReader(b.path) as rb:
            fa = ra.frames(range(a.num_frames)).astype(np.int16)
            fb = rb.frames(range(b.num_frames)).astype(np.int16)
        errors.append(np.abs(fa - fb).mean())
    # H.264 at CRF 12 with 4:2:0 chroma: a few grey levels on average (255 = white)
    print(f"round trip: mean |frame difference| {np.mean(errors):.2f}, worst {max(errors):.2f}")
    assert max(errors) < 6.0, errors


def test_bad_lerobot_input_is_named(tmp_path: Path, exported: Path) -> None:
    from mobile_vla.data.lerobot import export_lerobot, import_lerobot

    with pytest.raises(DataError, match=r"no meta/info\.json"):
        import_lerobot(tmp_path, tmp_path / "o")
    with pytest.raises(DataError, match="not empty"):
        export_lerobot(tmp_path / "none", exported)
    arm = tmp_path / "arm"
    (arm / "meta").mkdir(parents=True)
    info = json.loads((exported / "meta" / "info.json").read_text())
    info["features"]["action"]["shape"] = [7]
    (arm / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(DataError, match="must hold 3 values"):
        import_lerobot(arm, tmp_path / "o")
