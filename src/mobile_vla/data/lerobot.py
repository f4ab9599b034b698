"""LeRobot datasets (format v3.0) to and from the robot's HDF5 episodes.

Export writes the layout LeRobot's ``LeRobotDataset`` reads::

    meta/info.json                 codebase_version "v3.0", fps, features, path templates
    meta/stats.json                per-feature min / max / mean / std / count
    meta/tasks.parquet             task (the instruction) -> task_index
    meta/episodes/chunk-000/file-000.parquet
                                   per episode: length, tasks, where its rows and its video
                                   segment are (dataset_from/to_index, from/to_timestamp)
    data/chunk-000/file-NNN.parquet
                                   one row per frame: action, timestamp, frame_index,
                                   episode_index, index, task_index
    videos/observation.images.front/chunk-000/file-NNN.mp4
                                   the camera, episodes one after another (PyAV)

with the instruction as the task, ``[linear_x, linear_y, angular_z]`` as ``action`` and the
camera as a video feature. Data and video files roll over at LeRobot's default sizes (100 MB /
200 MB), 1,000 files per chunk folder. Import reads v3.0, and v2.x (one parquet and one video
per episode, ``meta/episodes.jsonl``, ``meta/tasks.jsonl``), with the camera as a video or an
image feature, and writes one HDF5 episode per LeRobot episode (frames RGB, the task as
``language_instruction``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mobile_vla.config import ACTION_NAMES
from mobile_vla.errors import DataError
from mobile_vla.io import atomic_write_json

CODEBASE_VERSION = "v3.0"
CAMERA = "observation.images.front"
DATA_PATH = "data/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
VIDEO_PATH = "videos/{video_key}/chunk-{chunk_index:03d}/file-{file_index:03d}.mp4"
EPISODES_PATH = "meta/episodes/chunk-{chunk_index:03d}/file-{file_index:03d}.parquet"
CHUNKS_SIZE = 1000
DATA_MB, VIDEO_MB = 100, 200


def _require() -> tuple[Any, Any, Any]:
    try:
        import av
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:  # pragma: no cover - both are dependencies
        raise DataError(f"LeRobot datasets need pyarrow and PyAV ({exc})") from None
    return av, pa, pq


@dataclass
class _Roller:
    """File index bookkeeping: a new file once the current one passes ``limit_mb``."""

    limit_mb: float
    chunk: int = 0
    file: int = 0
    bytes: int = 0

    def advance_if_full(self) -> bool:
        if self.bytes < self.limit_mb * 1e6:
            return False
        self.next_file()
        return True

    def next_file(self) -> None:
        self.bytes = 0
        self.file += 1
        if self.file >= CHUNKS_SIZE:
            self.chunk, self.file = self.chunk + 1, 0


class _VideoWriter:
    def __init__(self, av: Any, path: Path, fps: int, size: tuple[int, int], codec: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.container = av.open(str(path), mode="w")
        self.stream = self.container.add_stream(codec, rate=fps)
        self.stream.height, self.stream.width = size
        self.stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            self.stream.options = {"crf": "12", "preset": "medium"}
        elif codec == "libsvtav1":
            self.stream.options = {"crf": "20", "preset": "8"}
        self.frames = 0
        self.av = av

    def write(self, frames: np.ndarray) -> None:
        for frame in frames:
            vf = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
            for packet in self.stream.encode(vf):
                self.container.mux(packet)
            self.frames += 1

    def close(self) -> None:
        for packet in self.stream.encode():
            self.container.mux(packet)
        self.container.close()


def export_lerobot(
    data: str | Path,
    out: str | Path,
    pattern: str = "episode_*.h5",
    fps: int = 10,
    codec: str = "libx264",
    channel_order: str = "auto",
    robot_type: str = "mobile_base",
) -> dict[str, Any]:
    """Write the HDF5 episodes of ``data`` as a LeRobot v3.0 dataset in ``out`` (which must
    not exist or be empty); returns ``info.json``. Frames are stored RGB (BGR files are
    converted per ``channel_order``, as training reads them)."""
    from mobile_vla.data.frame_cache import stored_channel_order, to_rgb
    from mobile_vla.data.hdf5 import FrameReader

    av, pa, pq = _require()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DataError(f"LeRobot output folder '{out}' is not empty; choose a new folder")
    source, (h, w) = _exportable(data, pattern)
    tasks: dict[str, int] = {}
    episodes: list[dict[str, Any]] = []
    data_roll, video_roll = _Roller(DATA_MB), _Roller(VIDEO_MB)
    rows: list[dict[str, Any]] = []
    video: _VideoWriter | None = None
    index = 0

    def flush_rows() -> None:
        if not rows:
            return
        path = out / DATA_PATH.format(chunk_index=data_roll.chunk, file_index=data_roll.file)
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows, schema=_frame_schema(pa)), path)
        data_roll.bytes += path.stat().st_size
        rows.clear()

    for ep_index, ep in enumerate(source):
        task = tasks.setdefault(ep.instruction, len(tasks))
        with FrameReader(ep.path) as reader:
            frames = to_rgb(
                reader.frames(range(ep.num_frames)), stored_channel_order(ep, channel_order)
            )
        if video is None or video_roll.advance_if_full():
            if video is not None:
                video.close()
            path = out / VIDEO_PATH.format(
                video_key=CAMERA, chunk_index=video_roll.chunk, file_index=video_roll.file
            )
            video = _VideoWriter(av, path, fps, (h, w), codec)
        start_frame = video.frames
        video.write(frames)
        video_roll.bytes += frames.nbytes // 50  # an estimate until the file is closed
        rows += _frame_rows(ep, ep_index, index, task, fps)
        episodes.append(
            _episode_record(ep, ep_index, index, data_roll, video_roll, start_frame, fps)
        )
        index += ep.num_frames
        if len(rows) * 40 > DATA_MB * 1e6:  # ~40 bytes a row: roll the data file
            flush_rows()
            data_roll.next_file()
    flush_rows()
    if video is not None:
        video.close()
    _write_meta(out, pa, pq, episodes, tasks, source, fps, (h, w), codec, robot_type)
    return json.loads((out / "meta" / "info.json").read_text())


def _frame_rows(ep: Any, ep_index: int, index: int, task: int, fps: int) -> list[dict[str, Any]]:
    """The data table's rows of one episode (global ``index`` of its first frame)."""
    actions = np.asarray(ep.actions, np.float32)  # (T, 3): the scan checked it
    return [
        {
            "action": actions[t].tolist(),
            "timestamp": t / fps,
            "frame_index": t,
            "episode_index": ep_index,
            "index": index + t,
            "task_index": task,
        }
        for t in range(ep.num_frames)
    ]


def _episode_record(
    ep: Any,
    ep_index: int,
    index: int,
    data_roll: _Roller,
    video_roll: _Roller,
    start_frame: int,
    fps: int,
) -> dict[str, Any]:
    """The episodes table's row: where its frames are, and its video segment (from the
    video file's frame ``start_frame``)."""
    return {
        "episode_index": ep_index,
        "tasks": [ep.instruction],
        "length": ep.num_frames,
        "data/chunk_index": data_roll.chunk,
        "data/file_index": data_roll.file,
        "dataset_from_index": index,
        "dataset_to_index": index + ep.num_frames,
        f"videos/{CAMERA}/chunk_index": video_roll.chunk,
        f"videos/{CAMERA}/file_index": video_roll.file,
        f"videos/{CAMERA}/from_timestamp": start_frame / fps,
        f"videos/{CAMERA}/to_timestamp": (start_frame + ep.num_frames) / fps,
        "meta/episodes/chunk_index": 0,
        "meta/episodes/file_index": 0,
        "source_file": ep.path.name,
    }


def _exportable(data: str | Path, pattern: str) -> tuple[list[Any], tuple[int, int]]:
    """The episodes of ``data`` (every file valid) and their one frame size (even sides, as
    a yuv420p video needs)."""
    from mobile_vla.data.episodes import scan_episodes

    scan = scan_episodes(data, pattern)
    if scan.bad:
        raise DataError(
            f"{len(scan.bad)} bad episode file(s) in '{data}': " + "; ".join(map(str, scan.bad))
        )
    if not scan.episodes:
        raise DataError(f"no files matching '{pattern}' in '{data}'")
    shapes = {ep.image_shape for ep in scan.episodes}
    if len(shapes) != 1:
        raise DataError(f"'{data}' mixes frame sizes {sorted(shapes)}; a video feature has one")
    h, w, _ = next(iter(shapes))
    if h % 2 or w % 2:
        raise DataError(f"frames of {h}x{w}: yuv420p video needs even sides")
    return scan.episodes, (h, w)


def _frame_schema(pa: Any) -> Any:
    return pa.schema(
        [
            ("action", pa.list_(pa.float32(), len(ACTION_NAMES))),
            ("timestamp", pa.float32()),
            ("frame_index", pa.int64()),
            ("episode_index", pa.int64()),
            ("index", pa.int64()),
            ("task_index", pa.int64()),
        ]
    )


def _write_meta(
    out: Path,
    pa: Any,
    pq: Any,
    episodes: list[dict[str, Any]],
    tasks: dict[str, int],
    infos: Sequence[Any],
    fps: int,
    size: tuple[int, int],
    codec: str,
    robot_type: str,
) -> None:
    meta = out / "meta"
    path = out / EPISODES_PATH.format(chunk_index=0, file_index=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(episodes), path)
    pq.write_table(
        pa.table(
            {
                "task_index": pa.array(list(tasks.values()), pa.int64()),
                "task": pa.array(list(tasks), pa.string()),
            }
        ),
        meta / "tasks.parquet",
    )
    actions = np.concatenate([np.asarray(i.actions, np.float64) for i in infos])
    total = int(actions.shape[0])
    stats = {
        "action": {
            "min": actions.min(0).tolist(),
            "max": actions.max(0).tolist(),
            "mean": actions.mean(0).tolist(),
            "std": actions.std(0).tolist(),
            "count": [total],
        }
    }
    atomic_write_json(meta / "stats.json", stats)
    h, w = size
    info = {
        "codebase_version": CODEBASE_VERSION,
        "robot_type": robot_type,
        "total_episodes": len(episodes),
        "total_frames": total,
        "total_tasks": len(tasks),
        "chunks_size": CHUNKS_SIZE,
        "data_files_size_in_mb": DATA_MB,
        "video_files_size_in_mb": VIDEO_MB,
        "fps": fps,
        "splits": {"train": f"0:{len(episodes)}"},
        "data_path": DATA_PATH,
        "video_path": VIDEO_PATH,
        "features": {
            CAMERA: {
                "dtype": "video",
                "shape": [h, w, 3],
                "names": ["height", "width", "channels"],
                "info": {
                    "video.height": h,
                    "video.width": w,
                    "video.codec": {"libx264": "h264", "libsvtav1": "av1"}.get(codec, codec),
                    "video.pix_fmt": "yuv420p",
                    "video.is_depth_map": False,
                    "video.fps": fps,
                    "video.channels": 3,
                    "has_audio": False,
                },
            },
            "action": {"dtype": "float32", "shape": [3], "names": list(ACTION_NAMES)},
            "timestamp": {"dtype": "float32", "shape": [1], "names": None},
            "frame_index": {"dtype": "int64", "shape": [1], "names": None},
            "episode_index": {"dtype": "int64", "shape": [1], "names": None},
            "index": {"dtype": "int64", "shape": [1], "names": None},
            "task_index": {"dtype": "int64", "shape": [1], "names": None},
        },
    }
    atomic_write_json(meta / "info.json", info)


# ---- import ---------------------------------------------------------------------------------


def _read_info(root: Path) -> dict[str, Any]:
    path = root / "meta" / "info.json"
    if not path.is_file():
        raise DataError(f"'{root}' is not a LeRobot dataset: it has no meta/info.json")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"'{path}' is not valid JSON") from None
    for key in ("codebase_version", "fps", "features", "data_path"):
        if key not in info:
            raise DataError(f"'{path}' lacks '{key}' (a LeRobot info.json has it)")
    return info


def _camera_key(info: dict[str, Any], camera: str | None) -> str:
    visual = [k for k, f in info["features"].items() if f.get("dtype") in ("video", "image")]
    if camera is not None:
        if camera not in visual:
            raise DataError(f"camera '{camera}' is not a video or image feature; have {visual}")
        return camera
    if not visual:
        raise DataError("the LeRobot dataset has no video or image feature")
    return visual[0]


def _decode_video(av: Any, path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"video file '{path}' is missing")
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack(frames) if frames else np.zeros((0, 1, 1, 3), np.uint8)


def _read_tasks(root: Path, pq: Any) -> dict[int, str]:
    if (root / "meta" / "tasks.parquet").is_file():
        table = pq.read_table(root / "meta" / "tasks.parquet").to_pydict()
        names = table.get("task") or table.get("__index_level_0__") or []
        return dict(zip(table["task_index"], names, strict=True))
    if (root / "meta" / "tasks.jsonl").is_file():
        lines = (root / "meta" / "tasks.jsonl").read_text().splitlines()
        return {o["task_index"]: o["task"] for o in map(json.loads, filter(None, lines))}
    raise DataError(f"'{root}' has neither meta/tasks.parquet nor meta/tasks.jsonl")


def import_lerobot(
    root: str | Path, out: str | Path, camera: str | None = None, action_key: str = "action"
) -> list[Path]:
    """Write each episode of the LeRobot dataset ``root`` as an HDF5 episode in ``out``;
    returns the files written. The action must be ``[linear_x, linear_y, angular_z]`` (3
    values per frame); the task becomes the instruction."""
    from mobile_vla.data.hdf5 import event_type, write_episode

    av, _, pq = _require()
    root, out = Path(root), Path(out)
    info = _read_info(root)
    key = _camera_key(info, camera)
    feature = info["features"].get(action_key)
    if feature is None or list(feature.get("shape", [])) != [len(ACTION_NAMES)]:
        raise DataError(
            f"'{root}': feature '{action_key}' must hold {len(ACTION_NAMES)} values "
            f"{ACTION_NAMES} per frame (a mobile base's command), got {feature}"
        )
    tasks = _read_tasks(root, pq)
    data = _read_frames_table(root, info, pq)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    video_cache: dict[Path, np.ndarray] = {}
    for ep in _read_episodes(root, info, pq):
        e = ep["episode_index"]
        sel = np.flatnonzero(np.asarray(data["episode_index"]) == e)
        sel = sel[np.argsort(np.asarray(data["frame_index"])[sel])]
        actions = np.asarray([data[action_key][i] for i in sel], np.float32)
        frames = _episode_frames(av, root, info, key, ep, data, sel, video_cache)
        if len(frames) != len(actions):
            raise DataError(
                f"'{root}': episode {e} has {len(actions)} rows but {len(frames)} frames"
            )
        task_index = int(np.asarray(data["task_index"])[sel[0]]) if len(sel) else 0
        instruction = tasks.get(task_index) or (ep.get("tasks") or [""])[0]
        name = ep.get("source_file") or f"episode_{e:06d}.h5"
        written.append(
            write_episode(
                out / name,
                frames,
                actions,
                instruction,
                event_types=[event_type(t, a) for t, a in enumerate(actions)],
                attrs={"channel_order": "rgb", "lerobot_episode_index": int(e)},
            )
        )
    return written


def _read_frames_table(root: Path, info: dict[str, Any], pq: Any) -> dict[str, list[Any]]:
    files = sorted((root / "data").rglob("*.parquet"))
    if not files:
        raise DataError(f"'{root}' has no data/*.parquet files")
    columns: dict[str, list[Any]] = {}
    for path in files:
        for name, values in pq.read_table(path).to_pydict().items():
            columns.setdefault(name, []).extend(values)
    for need in ("episode_index", "frame_index", "task_index"):
        if need not in columns:
            raise DataError(f"'{root}': the data files lack the '{need}' column")
    return columns


def _read_episodes(root: Path, info: dict[str, Any], pq: Any) -> list[dict[str, Any]]:
    folder = root / "meta" / "episodes"
    if folder.is_dir():  # v3.0
        rows: list[dict[str, Any]] = []
        for path in sorted(folder.rglob("*.parquet")):
            rows += pq.read_table(path).to_pylist()
        return sorted(rows, key=lambda r: r["episode_index"])
    jsonl = root / "meta" / "episodes.jsonl"
    if jsonl.is_file():  # v2.x
        lines = filter(None, jsonl.read_text().splitlines())
        return sorted(map(json.loads, lines), key=lambda r: r["episode_index"])
    raise DataError(f"'{root}' has neither meta/episodes/ nor meta/episodes.jsonl")


def _episode_frames(
    av: Any,
    root: Path,
    info: dict[str, Any],
    key: str,
    ep: dict[str, Any],
    data: dict[str, list[Any]],
    sel: np.ndarray,
    cache: dict[Path, np.ndarray],
) -> np.ndarray:
    from PIL import Image

    feature = info["features"][key]
    if feature.get("dtype") == "image":  # stored in the parquet rows: {"bytes", "path"}
        out = []
        for i in sel:
            cell = data[key][i]
            raw = cell.get("bytes") if isinstance(cell, dict) else cell
            if raw is None and isinstance(cell, dict) and cell.get("path"):
                raw = (root / cell["path"]).read_bytes()
            import io

            out.append(np.asarray(Image.open(io.BytesIO(raw)).convert("RGB")))
        return np.stack(out)
    e = int(ep["episode_index"])
    fps = float(info["fps"])
    template = info.get("video_path")
    if template is None:
        raise DataError(f"'{root}': info.json has no video_path for the video feature '{key}'")
    if f"videos/{key}/chunk_index" in ep:  # v3.0: episodes share files
        path = root / template.format(
            video_key=key,
            chunk_index=ep[f"videos/{key}/chunk_index"],
            file_index=ep[f"videos/{key}/file_index"],
        )
        start = round(float(ep[f"videos/{key}/from_timestamp"]) * fps)
    else:  # v2.x: a file per episode
        chunk = e // int(info.get("chunks_size", CHUNKS_SIZE))
        path = root / template.format(video_key=key, episode_chunk=chunk, episode_index=e)
        start = 0
    if path not in cache:
        cache.clear()  # one file at a time in memory
        cache[path] = _decode_video(av, path)
    return cache[path][start : start + len(sel)]
