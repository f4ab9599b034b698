"""``mobile-vla pretrain-data``: an image-caption corpus rendered with the simulator's engine.

A corpus is a folder::

    manifest.json     format, version, counts, image size, seed, the command that made it
    images.npy        uint8 (N, S, S, 3), memory-mappable
    captions.jsonl    one line per image: id, scene seed, split (train / val), captions from
                      the training templates and their facts (what each claims, checkable
                      against any scene), captions from the held-out templates and their
                      facts, objects, and the left/right probe's two (true, false) pairs
                      when the scene has one

Validation scenes are held out by image (``val_fraction``) and, for evaluation, phrased with
templates never used in training. Image ``i`` is a pure function of (seed, i).
"""

from __future__ import annotations

import json
import multiprocessing as mp
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from mobile_vla.errors import DataError, MobileVLAError
from mobile_vla.io import atomic_path, atomic_write_json, atomic_write_text
from mobile_vla.pretraining.caption_scenes import Fact

FORMAT = "mobile-vla-caption-corpus"
VERSION = 4  # 4: pair templates that name the left object second too; the probe on objects
# unique of their kind (3: the probe in both directions; 2: "X left of Y" only)
FILES = ("manifest.json", "images.npy", "captions.jsonl")


@dataclass
class Corpus:
    folder: Path
    manifest: dict[str, Any]
    images: np.ndarray
    records: list[dict[str, Any]]

    def split(self, name: str) -> list[int]:
        return [i for i, r in enumerate(self.records) if r["split"] == name]


def _scene_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, 7_777_777, index]).generate_state(1)[0])


_RENDERER: Any = None


def _close_renderer() -> None:
    global _RENDERER
    if _RENDERER is not None:
        _RENDERER.close()
        _RENDERER = None


def _render_chunk(args: tuple[list[int], int, int, int, float]) -> list[tuple[int, Any, dict]]:
    from mobile_vla.pretraining.caption_scenes import (
        captions,
        left_right_probe,
        sample_scene,
        scene_xml,
    )
    from mobile_vla.sim.gl import ensure_gl_backend

    ensure_gl_backend()
    import mujoco

    from mobile_vla.sim.gl import ModelRenderer

    indices, seed, size, per_image, val_fraction = args
    out = []
    global _RENDERER
    if _RENDERER is None or _RENDERER.width != size:
        _close_renderer()
        _RENDERER = ModelRenderer(size, size)  # one GL context per worker process
    for i in indices:
        s = _scene_seed(seed, i)
        scene = sample_scene(s)
        model = mujoco.MjModel.from_xml_string(scene_xml(scene, size))
        data = mujoco.MjData(model)
        mujoco.mj_forward(model, data)
        image = _RENDERER.render(model, data, "cam")
        rng = np.random.default_rng([s, 1])
        split = "val" if rng.random() < val_fraction else "train"
        texts, facts = captions(scene, rng, per_image)
        eval_texts, eval_facts = captions(scene, rng, 2, held_out=True)
        record = {
            "id": i,
            "scene_seed": s,
            "split": split,
            "captions": texts,
            "facts": [f.to_json() for f in facts],
            "eval_captions": eval_texts,
            "eval_facts": [f.to_json() for f in eval_facts],
            "objects": [asdict(o) for o in scene.objects],
            "probe": left_right_probe(scene.objects),
        }
        out.append((i, image, record))
    return out


def build_corpus(
    out: str | Path,
    images: int,
    seed: int = 0,
    size: int = 96,
    captions_per_image: int = 5,
    val_fraction: float = 0.1,
    workers: int = 1,
    progress: bool = True,
    command: str = "",
) -> Path:
    out = Path(out)
    if images < 1:
        raise MobileVLAError(f"--images must be >= 1, got {images}")
    if not 0 < val_fraction < 1:
        raise MobileVLAError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if out.exists() and any(out.iterdir()):
        raise MobileVLAError(f"corpus folder '{out}' is not empty; choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    from mobile_vla.sim.gl import ensure_gl_backend

    ensure_gl_backend()
    chunks = [list(range(i, min(i + 32, images))) for i in range(0, images, 32)]
    jobs = [(c, seed, size, captions_per_image, val_fraction) for c in chunks]
    records: list[dict[str, Any]] = [{}] * images
    bar = tqdm(total=images, desc="render captions", unit="img", disable=not progress)
    with atomic_path(out / "images.npy", suffix=".npy") as tmp:
        arr = np.lib.format.open_memmap(
            tmp, mode="w+", dtype=np.uint8, shape=(images, size, size, 3)
        )
        pool = mp.get_context("spawn").Pool(workers) if workers > 1 else None
        try:
            results = pool.imap_unordered(_render_chunk, jobs) if pool else map(_render_chunk, jobs)
            for chunk in results:
                for i, image, record in chunk:
                    arr[i] = image
                    records[i] = record
                bar.update(len(chunk))
        finally:
            if pool:
                pool.close()
                pool.join()
            _close_renderer()
        arr.flush()
        del arr
    bar.close()
    atomic_write_text(out / "captions.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    counts = {
        "train": sum(r["split"] == "train" for r in records),
        "val": sum(r["split"] == "val" for r in records),
    }
    atomic_write_json(
        out / "manifest.json",
        {
            "format": FORMAT,
            "version": VERSION,
            "images": images,
            "image_size": size,
            "seed": seed,
            "captions_per_image": captions_per_image,
            "val_fraction": val_fraction,
            "splits": counts,
            "probes": sum(r["probe"] is not None for r in records),
            "command": command,
        },
    )
    return out


def load_corpus(folder: str | Path) -> Corpus:
    """Open and check a corpus folder; every problem is one sentence naming the folder."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"corpus folder '{folder}' does not exist")
    present = {p.name for p in folder.iterdir() if not p.name.startswith(".")}
    if not present:
        raise DataError(
            f"corpus folder '{folder}' is empty (make one with "
            "`mobile-vla pretrain-data --out {folder} --images N`)"
        )
    missing = [f for f in FILES if f not in present]
    unrelated = sorted(present - set(FILES))
    if unrelated:
        raise DataError(
            f"corpus folder '{folder}' holds files that are not part of a caption "
            f"corpus: {unrelated[:5]}"
        )
    if missing:
        raise DataError(f"corpus folder '{folder}' is incomplete: missing {missing}")
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DataError(f"corpus folder '{folder}': manifest.json is not valid JSON") from None
    if manifest.get("format") != FORMAT:
        raise DataError(
            f"corpus folder '{folder}': manifest.json is not a {FORMAT} v{VERSION} manifest"
        )
    if manifest.get("version") != VERSION:
        raise DataError(
            f"corpus folder '{folder}' is a {FORMAT} v{manifest.get('version')}; this version "
            f"reads v{VERSION}: render it again with `mobile-vla pretrain-data`"
        )
    try:
        images = np.load(folder / "images.npy", mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise DataError(f"corpus folder '{folder}': images.npy is unreadable ({exc})") from None
    n, size = manifest["images"], manifest["image_size"]
    if images.shape != (n, size, size, 3) or images.dtype != np.uint8:
        raise DataError(
            f"corpus folder '{folder}': images.npy holds {images.dtype} "
            f"{images.shape}, the manifest says uint8 ({n}, {size}, {size}, 3)"
        )
    try:
        records = [
            json.loads(line)
            for line in (folder / "captions.jsonl").read_text().splitlines()
            if line.strip()
        ]
    except json.JSONDecodeError:
        raise DataError(
            f"corpus folder '{folder}': captions.jsonl is not valid JSON lines"
        ) from None
    if len(records) != n:
        raise DataError(
            f"corpus folder '{folder}': captions.jsonl has {len(records)} lines for {n} images"
        )
    for r in records:  # captions.jsonl stores facts compactly; in memory they are typed
        r["facts"] = [Fact.from_json(f) for f in r["facts"]]
        r["eval_facts"] = [Fact.from_json(f) for f in r["eval_facts"]]
    return Corpus(folder, manifest, images, records)
