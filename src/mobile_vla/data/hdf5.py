"""The Mobile-VLA HDF5 episode format (``shared/specs/hdf5_episode.md``): reader and writer.

One episode per file::

    images                uint8   (T, H, W, 3)  gzip, chunked per frame
    actions               float32 (T, 3)        [linear_x, linear_y, angular_z]
    action_event_types    vlen str (T,)         optional
    language_instruction  vlen str (1,)|(T,)    optional (else derived from the file name)
    attrs: episode_name, num_frames, action_chunk_size, time_period, collection_datetime, ...

Every problem a file can have is reported as an :class:`EpisodeError` naming the file; nothing
here lets an h5py traceback through.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from mobile_vla.config import ACTION_NAMES, DEFAULT_INSTRUCTION_TEMPLATE
from mobile_vla.errors import EpisodeError
from mobile_vla.io import atomic_path

SIDE_TOKENS = ("left", "right", "center")
TARGET_TOKENS = {"bottle": "beverage bottle", "basket": "basket"}  # name token -> phrase
LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
DISTANCE_TOKENS = ("close", "medium", "far")
TIME_PERIODS = ("dawn", "morning", "evening", "night")
_NAME_RE = re.compile(r"^episode_(\d{8})_(\d{6})_(.+)$")
_STR_DTYPE = h5py.string_dtype("utf-8")


@dataclass(frozen=True)
class EpisodeName:
    """What a file name says: ``episode_<YYYYMMDD>_<HHMMSS>_<scenario>[_<extra>].h5``."""

    scenario: str
    layout: str
    side: str | None
    distance: str | None
    extra: tuple[str, ...] = ()
    target: str | None = None  # "basket" / "bottle" when the name says which


def parse_episode_name(path: str | Path) -> EpisodeName:
    stem = Path(path).name
    for suffix in (".h5", ".hdf5"):
        if stem.endswith(suffix):
            stem = stem[: -len(suffix)]
    match = _NAME_RE.match(stem)
    tokens = match.group(3).split("_") if match else stem.split("_")
    target = next((t for t in tokens if t in TARGET_TOKENS), None)
    tokens = [t for t in tokens if t not in TARGET_TOKENS]  # "basket_1box_hori_left_..."
    side = next((t for t in tokens if t in SIDE_TOKENS), None)
    distance = next((t for t in tokens if t in DISTANCE_TOKENS), None)
    if match and tokens:
        layout = tokens[0]
        if len(tokens) > 1 and tokens[1] in SIDE_TOKENS:
            scenario, extra = f"{layout}_{tokens[1]}", tuple(tokens[2:])
        else:
            scenario, extra = layout, tuple(tokens[1:])
    else:
        layout, scenario, extra = "unknown", "unknown", tuple(tokens)
    return EpisodeName(scenario, layout, side, distance, extra, target)


def derive_instruction(
    side: str | None, template: str = DEFAULT_INSTRUCTION_TEMPLATE, target: str | None = None
) -> str:
    """The instruction of a file without ``language_instruction``: the template with the side
    from the name, and the target the name gives (``{target}`` in the template, or the
    template's "beverage bottle" swapped for it); "on the center" reads "in the center"."""
    if side is None:
        raise ValueError("no side")
    phrase = TARGET_TOKENS.get(target or "bottle", "beverage bottle")
    text = template.format(side=side, target=phrase)
    if target is not None and target != "bottle":
        text = text.replace("beverage bottle", phrase)
    return text.replace("on the center", "in the center")


_SWAP = {
    "left": "right",
    "right": "left",
    "Left": "Right",
    "Right": "Left",
    "LEFT": "RIGHT",
    "RIGHT": "LEFT",
}
_SWAP_RE = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")


def swap_left_right(text: str) -> str:
    """Swap the words left and right (case kept), as mirroring the scene does."""
    return _SWAP_RE.sub(lambda m: _SWAP[m.group(1)], text)


def _py(value: Any) -> Any:
    """HDF5 attribute -> plain Python value."""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()] if value.dtype == object else value.tolist()
    return value


def _decode_strings(dataset: h5py.Dataset, key: str, path: Path) -> list[str]:
    try:
        raw = dataset[()]
    except (OSError, ValueError, TypeError) as exc:
        raise EpisodeError(path, f"dataset '{key}' cannot be read ({_short(exc)})") from None
    values = np.atleast_1d(np.asarray(raw, dtype=object)).tolist()
    out = []
    for i, v in enumerate(values):
        if isinstance(v, (bytes, np.bytes_)):
            try:
                v = bytes(v).decode("utf-8")
            except UnicodeDecodeError:
                raise EpisodeError(path, f"dataset '{key}' entry {i} is not valid UTF-8") from None
        elif not isinstance(v, str):
            raise EpisodeError(path, f"dataset '{key}' must hold strings, found {type(v).__name__}")
        out.append(v)
    return out


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:160]


@dataclass
class EpisodeInfo:
    """Validated metadata and actions of one episode (frames stay on disk)."""

    path: Path
    num_frames: int
    image_shape: tuple[int, int, int]
    actions: np.ndarray
    instruction: str
    instruction_source: str
    scenario: str
    layout: str
    side: str | None
    distance: str | None
    event_types: list[str] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    compression: str | None = None

    @property
    def source(self) -> str | None:
        """The episode this one was derived from (a counterfactual relabelling, attribute
        ``counterfactual_of``: its file name without ``.h5``), or None for a recorded one.
        A derived episode shares its source's frames, so it always goes to its source's
        split."""
        value = self.attrs.get("counterfactual_of")
        return str(value) if value else None

    @property
    def stratum(self) -> str:
        """The key episodes are stratified by when splitting (scenario and side)."""
        return (
            self.scenario
            if self.side is None or self.side in self.scenario
            else (f"{self.scenario}_{self.side}")
        )


def read_episode_info(
    path: str | Path,
    action_names: Sequence[str] = ACTION_NAMES,
    instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE,
    check_frames: bool = True,
) -> EpisodeInfo:
    """Open, validate and summarise one episode file.

    ``check_frames`` decodes the first and last frame, which catches most damaged files cheaply;
    :func:`verify_frames` decodes every frame.
    """
    path = Path(path)
    if not path.is_file():
        raise EpisodeError(path, "file does not exist")
    if path.stat().st_size == 0:
        raise EpisodeError(path, "file is empty (0 bytes)")
    try:
        is_hdf5 = h5py.is_hdf5(str(path))
    except OSError as exc:
        raise EpisodeError(path, f"file cannot be read ({_short(exc)})") from None
    if not is_hdf5:
        with open(path, "rb") as fh_raw:
            head = fh_raw.read(len(LFS_MAGIC))
        if head == LFS_MAGIC:
            raise EpisodeError(
                path, "this is a Git LFS pointer, not the HDF5 file; run git lfs pull"
            )
        raise EpisodeError(path, "not an HDF5 file")
    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise EpisodeError(path, f"file is truncated or corrupt ({_short(exc)})") from None
    with fh:
        try:
            return _validate_open_file(fh, path, action_names, instruction_template, check_frames)
        except EpisodeError:
            raise
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as exc:
            raise EpisodeError(path, f"file is corrupt ({_short(exc)})") from None


def _validate_open_file(
    fh: h5py.File,
    path: Path,
    action_names: Sequence[str],
    instruction_template: str,
    check_frames: bool,
) -> EpisodeInfo:
    for key in ("images", "actions"):
        if key not in fh:
            raise EpisodeError(path, f"missing dataset '{key}'")
        if not isinstance(fh[key], h5py.Dataset):
            raise EpisodeError(path, f"'{key}' is a group, expected a dataset")
    images = _checked_images(fh["images"], path)
    num_frames = int(images.shape[0])
    actions = _checked_actions(fh["actions"], path, action_names, num_frames)
    attrs = {str(k): _py(v) for k, v in fh.attrs.items()}
    declared = attrs.get("num_frames")
    if isinstance(declared, int) and declared != num_frames:
        raise EpisodeError(
            path,
            f"attribute num_frames={declared} but 'images' has {num_frames} frames "
            "(incomplete write?)",
        )
    event_types = None
    if "action_event_types" in fh:
        event_types = _decode_strings(fh["action_event_types"], "action_event_types", path)
        _check_length(path, "action_event_types", len(event_types), num_frames)
    name = parse_episode_name(path)
    scenario, side, distance = _scene(name, attrs)
    instruction, source = _instruction(fh, path, num_frames, side, instruction_template, name)
    if check_frames:
        for t in sorted({0, num_frames - 1}):
            try:
                images[t]
            except (OSError, ValueError, RuntimeError) as exc:
                raise EpisodeError(path, f"frame {t} cannot be decoded ({_short(exc)})") from None
    return EpisodeInfo(
        path=path,
        num_frames=num_frames,
        image_shape=tuple(int(s) for s in images.shape[1:]),  # type: ignore[arg-type]
        actions=actions,
        instruction=instruction,
        instruction_source=source,
        scenario=scenario,
        layout=name.layout if name.layout != "unknown" else scenario.split("_")[0],
        side=side,
        distance=distance,
        event_types=event_types,
        attrs=attrs,
        compression=images.compression,
    )


def _checked_images(images: h5py.Dataset, path: Path) -> h5py.Dataset:
    """'images': uint8 (T, H, W, 3), T > 0, non-empty frames."""
    if images.ndim != 4 or images.shape[-1] != 3:
        raise EpisodeError(
            path, f"dataset 'images' must have shape (T, H, W, 3), found {tuple(images.shape)}"
        )
    if images.dtype != np.uint8:
        raise EpisodeError(path, f"dataset 'images' must be uint8, found {images.dtype}")
    if images.shape[0] == 0:
        raise EpisodeError(path, "episode has zero frames")
    if min(images.shape[1:3]) == 0:
        raise EpisodeError(path, f"dataset 'images' has empty frames {tuple(images.shape)}")
    return images


def _checked_actions(
    ds: h5py.Dataset, path: Path, action_names: Sequence[str], num_frames: int
) -> np.ndarray:
    """'actions' (T, len(action_names)) of numbers, one row per frame, all finite, as float32."""
    width = len(action_names)
    if ds.ndim != 2 or ds.shape[1] != width:
        raise EpisodeError(
            path,
            f"dataset 'actions' must have shape (T, {width}) for {list(action_names)}, "
            f"found {tuple(ds.shape)}",
        )
    if not (np.issubdtype(ds.dtype, np.floating) or np.issubdtype(ds.dtype, np.integer)):
        raise EpisodeError(path, f"dataset 'actions' must be float32, found {ds.dtype}")
    if ds.shape[0] != num_frames:
        raise EpisodeError(
            path,
            f"length mismatch: 'images' has {num_frames} frames but 'actions' has {ds.shape[0]}",
        )
    actions = np.asarray(ds[()], dtype=np.float32)
    bad = ~np.isfinite(actions)
    if bad.any():
        t, d = np.argwhere(bad)[0]
        raise EpisodeError(
            path, f"dataset 'actions' contains NaN or inf (first at frame {t}, {action_names[d]})"
        )
    return actions


def _check_length(path: Path, key: str, found: int, num_frames: int) -> None:
    if found != num_frames:
        raise EpisodeError(
            path,
            f"length mismatch: '{key}' has {found} entries but the episode has {num_frames} frames",
        )


def _scene(name: EpisodeName, attrs: dict[str, Any]) -> tuple[str, str | None, str | None]:
    """(scenario, side, distance): from the file name, else from the file's attributes."""
    scenario = (
        name.scenario if name.scenario != "unknown" else str(attrs.get("scenario", "unknown"))
    )
    side = name.side
    if side is None and isinstance(attrs.get("scenario"), str):
        side = parse_episode_name(f"episode_00000000_000000_{attrs['scenario']}").side
    distance = name.distance or (
        attrs.get("distance_level") if isinstance(attrs.get("distance_level"), str) else None
    )
    return scenario, side, distance


def _instruction(
    fh: h5py.File,
    path: Path,
    num_frames: int,
    side: str | None,
    template: str,
    name: EpisodeName,
) -> tuple[str, str]:
    """(instruction, where it came from): the file's 'language_instruction', else derived
    from the side the name gives."""
    if "language_instruction" not in fh:
        if side is None:
            raise EpisodeError(
                path,
                "the file has no 'language_instruction' dataset and its name names no side "
                "(left/right/center), so there is no instruction: add the dataset "
                "'language_instruction' (the key that supplies one) or put the side in the name",
            )
        return derive_instruction(side, template, name.target), "name"
    texts = _decode_strings(fh["language_instruction"], "language_instruction", path)
    if len(texts) not in (1, num_frames):
        raise EpisodeError(
            path,
            f"dataset 'language_instruction' must have 1 or {num_frames} entries, "
            f"found {len(texts)}",
        )
    instruction = texts[0].strip()
    if not instruction:
        raise EpisodeError(path, "dataset 'language_instruction' is empty")
    return instruction, "file"


def verify_frames(path: str | Path) -> None:
    """Decode every frame of a file; raise :class:`EpisodeError` at the first that fails."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as fh:
            images = fh["images"]
            for t in range(images.shape[0]):
                try:
                    images[t]
                except (OSError, ValueError, RuntimeError) as exc:
                    raise EpisodeError(
                        path, f"frame {t} cannot be decoded ({_short(exc)})"
                    ) from None
    except EpisodeError:
        raise
    except (OSError, KeyError) as exc:
        raise EpisodeError(path, f"file is truncated or corrupt ({_short(exc)})") from None


# HDF5 keeps a chunk cache per *open dataset*: h5py's default (1 MiB) holds less than one
# 720p frame, and a dataset object opened anew per read starts with an empty one. With h5py's
# automatic chunking (e.g. (3, 90, 160, 1): a chunk spans 3 frames and one colour channel),
# reading frame by frame then decompressed every chunk once per frame it holds. Chunks of one
# frame keep the default: a chunk larger than the cache is read straight into the output.


class FrameReader:
    """Reads frames of one episode, keeping the file and its ``images`` dataset open between
    calls; when a chunk spans several frames, with a chunk cache that holds two rows of them.

    ``frames(indices)`` returns uint8 (len(indices), H, W, 3) as stored (no resizing).
    ``bench/bench_hdf5_chunks.py`` measures automatic chunking against one chunk per frame.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._fh: h5py.File | None = None
        self._images: h5py.Dataset | None = None

    def _file(self) -> h5py.File:
        if self._fh is None:
            try:
                self._fh = h5py.File(self.path, "r")
            except OSError as exc:
                raise EpisodeError(
                    self.path, f"file is truncated or corrupt ({_short(exc)})"
                ) from None
        return self._fh

    def _dataset(self) -> h5py.Dataset:
        if self._images is None:
            fh = self._file()
            images = fh["images"]
            rows = images.chunks[0] if images.chunks else 1
            if rows > 1:  # keep the frames of two chunk rows decompressed
                frame = int(np.prod(images.shape[1:])) * images.dtype.itemsize
                dapl = h5py.h5p.create(h5py.h5p.DATASET_ACCESS)
                dapl.set_chunk_cache(100_003, 2 * rows * frame, 0.75)
                images = h5py.Dataset(h5py.h5d.open(fh.id, b"images", dapl=dapl))
            self._images = images
        return self._images

    def frames(self, indices: Sequence[int]) -> np.ndarray:
        images = self._dataset()
        try:
            return np.stack([images[int(t)] for t in indices])
        except (OSError, ValueError, RuntimeError) as exc:
            raise EpisodeError(self.path, f"frames cannot be decoded ({_short(exc)})") from None

    def close(self) -> None:
        self._images = None
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # pragma: no cover - best effort at interpreter exit
        with contextlib.suppress(Exception):
            self.close()


def event_type(t: int, action: np.ndarray) -> str:
    """The ``action_event_types`` entry of frame ``t`` with command ``action``, as the robot's
    collector records it: ``episode_start``, then ``start_action`` (a key held) or
    ``stop_action`` (none)."""
    if t == 0:
        return "episode_start"
    return "start_action" if np.any(action != 0) else "stop_action"


def write_episode(
    path: str | Path,
    images: np.ndarray,
    actions: np.ndarray,
    instruction: str | None,
    event_types: Sequence[str] | None = None,
    attrs: dict[str, Any] | None = None,
    compression: str | None = "gzip",
    compression_opts: int | None = 4,
    per_frame_instruction: bool = False,
) -> Path:
    """Write one episode exactly in the robot's layout, atomically.

    Standard attributes (``episode_name``, ``num_frames``, ``action_chunk_size``, ``time_period``,
    ``collection_datetime``) are filled in when ``attrs`` lacks them.
    """
    path = Path(path)
    images = np.asarray(images)
    actions = np.asarray(actions, dtype=np.float32)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be uint8 (T, H, W, 3), got {images.dtype} {images.shape}")
    if actions.ndim != 2 or actions.shape[0] != images.shape[0]:
        raise ValueError(f"actions must be (T, D) with T={images.shape[0]}, got {actions.shape}")
    num_frames = int(images.shape[0])
    attrs = dict(attrs or {})
    stem = path.name.rsplit(".", 1)[0]
    attrs.setdefault("episode_name", stem)
    attrs["num_frames"] = num_frames
    attrs.setdefault("action_chunk_size", 10)
    attrs.setdefault("time_period", "morning")
    attrs.setdefault("collection_datetime", "")
    attrs.setdefault("channel_order", "rgb")  # the frames given here are RGB (the simulator's)
    with atomic_path(path, suffix=".h5") as tmp, h5py.File(tmp, "w") as fh:
        chunk = (1, *images.shape[1:])
        fh.create_dataset(
            "images",
            data=images,
            chunks=chunk,
            compression=compression,
            compression_opts=compression_opts if compression == "gzip" else None,
        )
        fh.create_dataset("actions", data=actions)
        if event_types is not None:
            if len(event_types) != num_frames:
                raise ValueError("event_types must have one entry per frame")
            fh.create_dataset("action_event_types", data=list(event_types), dtype=_STR_DTYPE)
        if instruction is not None:
            texts = [instruction] * (num_frames if per_frame_instruction else 1)
            fh.create_dataset("language_instruction", data=texts, dtype=_STR_DTYPE)
        for key, value in attrs.items():
            fh.attrs[key] = value
    return path
