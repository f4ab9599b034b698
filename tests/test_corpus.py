"""The pretraining caption corpus: rendering, captions, held-out splits, bad folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mobile_vla.cli import main
from mobile_vla.errors import DataError
from mobile_vla.pretraining.caption_scenes import (
    EVAL_TEMPLATES,
    Fact,
    fact_holds,
    sample_scene,
)
from mobile_vla.pretraining.corpus import build_corpus, load_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus") / "c"
    build_corpus(out, 60, seed=3, size=48, progress=False)
    return out


def test_corpus_layout_and_captions(corpus: Path) -> None:
    c = load_corpus(corpus)
    assert c.images.shape == (60, 48, 48, 3) and c.images.std() > 5
    assert len(c.split("train")) + len(c.split("val")) == 60 and c.split("val")
    for r in c.records:
        assert 1 <= len(r["captions"]) <= 5 and r["eval_captions"]
        assert not set(r["captions"]) & set(r["eval_captions"])
        words = " ".join(r["captions"] + r["eval_captions"])
        assert not re.search(r"\ba orange\b|\ban (?![aeiou])", words), words  # articles agree
    eval_starts = {t.split("{")[0] for ts in EVAL_TEMPLATES.values() for t in ts if t.split("{")[0]}
    for r in c.records:  # held-out phrasings never appear in the training captions
        assert not any(cap.startswith(s) for cap in r["captions"] for s in eval_starts)
    # facts are typed in memory and compact JSON on disk, and each holds for its scene
    disk = [json.loads(line) for line in (corpus / "captions.jsonl").read_text().splitlines()]
    for r, d in zip(c.records, disk, strict=True):
        assert all(isinstance(f, Fact) and fact_holds(f, r["objects"]) for f in r["facts"])
        assert [f.to_json() for f in r["facts"] + r["eval_facts"]] == d["facts"] + d["eval_facts"]
        assert all(set(f) <= {"k", "c", "s", "z", "lat", "dep", "l", "r", "n"} for f in d["facts"])


def test_corpus_is_deterministic(corpus: Path, tmp_path: Path) -> None:
    again = build_corpus(tmp_path / "again", 60, seed=3, size=48, workers=2, progress=False)
    a, b = load_corpus(corpus), load_corpus(again)
    np.testing.assert_array_equal(a.images, b.images)
    assert a.records == b.records


def test_probe_pairs_name_the_true_order() -> None:
    for seed in range(200):
        scene = sample_scene(seed)
        cells = {(o.lateral, o.depth) for o in scene.objects}
        assert not {("centre", "near"), ("centre", "far")} <= cells  # never the nav layout
        from mobile_vla.pretraining.caption_scenes import left_right_probe

        probe = left_right_probe(scene.objects)
        if probe is None:
            continue
        (true, false), (true2, false2) = probe
        assert "to the left of" in true and "to the right of" in false
        first, second = true.split(" to the left of ")
        assert false == f"{first} to the right of {second}"
        # the other direction names the same two objects the other way round
        assert (true2, false2) == (
            f"{second} to the right of {first}",
            f"{second} to the left of {first}",
        )
        a = next(o for o in scene.objects if first.endswith(f"{o.colour} {o.shape}"))
        b = next(o for o in scene.objects if second.endswith(f"{o.colour} {o.shape}"))
        assert a.y > b.y  # y points left
        # the false caption is false: each object is the only one of its kind in the scene
        for o in (a, b):
            assert sum((p.colour, p.shape) == (o.colour, o.shape) for p in scene.objects) == 1
        reverse = Fact("pair", left=(b.colour, b.shape), right=(a.colour, a.shape))
        assert not fact_holds(reverse, scene.objects)


def test_probe_skips_objects_that_are_not_the_only_one_of_their_kind() -> None:
    def obj(colour: str, shape: str, lateral: str) -> dict:
        y = {"left": 0.5, "centre": 0.0, "right": -0.5}[lateral]
        return dict(
            shape=shape, colour=colour, size="small", lateral=lateral, depth="far", x=2.0, y=y
        )

    from mobile_vla.pretraining.caption_scenes import left_right_probe

    # a red box on each side of a green bottle: "the red box is right of the bottle" is true too
    boxes = [
        obj("red", "box", "left"),
        obj("green", "bottle", "centre"),
        obj("red", "box", "right"),
    ]
    assert left_right_probe(boxes) is None
    probe = left_right_probe([*boxes, obj("blue", "sphere", "right")])
    assert probe is not None
    assert probe[0] == (
        "a green bottle to the left of a blue sphere",
        "a green bottle to the right of a blue sphere",
    )


def test_bad_corpus_folders(tmp_path: Path, corpus: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_corpus(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is empty"):
        load_corpus(tmp_path / "empty")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for f in ("manifest.json", "images.npy", "captions.jsonl"):
        (mixed / f).write_bytes((corpus / f).read_bytes())
    (mixed / "episode_0001.h5").write_bytes(b"x")
    with pytest.raises(DataError, match="not part of a caption corpus"):
        load_corpus(mixed)
    (mixed / "episode_0001.h5").unlink()
    lines = (mixed / "captions.jsonl").read_text().splitlines()
    (mixed / "captions.jsonl").write_text("\n".join(lines[:-3]) + "\n")
    with pytest.raises(DataError, match="57 lines for 60 images"):
        load_corpus(mixed)
    (mixed / "captions.jsonl").write_text("\n".join(lines) + "\n")
    old = json.loads((mixed / "manifest.json").read_text())
    (mixed / "manifest.json").write_text(json.dumps({**old, "version": 2}))
    with pytest.raises(DataError, match=r"is a mobile-vla-caption-corpus v2; .* render it again"):
        load_corpus(mixed)
    (mixed / "captions.jsonl").unlink()
    with pytest.raises(DataError, match="incomplete"):
        load_corpus(mixed)
    assert main(["pretrain-data", "--out", str(corpus), "--images", "2", "-q"]) == 2  # not empty
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["command"] == "" and manifest["images"] == 60


def _render(renderer, scene, size: int) -> np.ndarray:
    import mujoco

    from mobile_vla.pretraining.caption_scenes import scene_xml

    model = mujoco.MjModel.from_xml_string(scene_xml(scene, size))
    data = mujoco.MjData(model)
    mujoco.mj_forward(model, data)
    return renderer.render(model, data, "cam")


def test_every_object_is_wholly_in_view() -> None:
    """Each object, removed from its scene, changes pixels inside the image and none on its
    border: the captions only name what the image shows. ``in_view`` refuses a scene with an
    object pushed out to the side."""
    from dataclasses import replace

    from mobile_vla.pretraining.caption_scenes import in_view
    from mobile_vla.sim.gl import ModelRenderer, ensure_gl_backend

    ensure_gl_backend()
    size = 64
    with ModelRenderer(size, size) as renderer:
        for seed in range(25):
            scene = sample_scene(seed)
            assert in_view(scene)
            full = _render(renderer, scene, size).astype(int)
            for k in range(len(scene.objects)):
                rest = replace(scene, objects=scene.objects[:k] + scene.objects[k + 1 :])
                changed = np.abs(full - _render(renderer, rest, size)).sum(-1) > 0
                assert changed.sum() >= 4, (seed, scene.objects[k])
                border = np.concatenate([changed[0], changed[-1], changed[:, 0], changed[:, -1]])
                assert not border.any(), (seed, scene.objects[k])
        scene = sample_scene(3)
        aside = replace(scene.objects[0], y=scene.objects[0].y + 1.5)
        assert not in_view(replace(scene, objects=(aside, *scene.objects[1:])))


def test_one_gl_context_renders_what_mujoco_renderer_renders() -> None:
    import mujoco

    from mobile_vla.pretraining.caption_scenes import scene_xml
    from mobile_vla.sim.gl import ModelRenderer, ensure_gl_backend

    ensure_gl_backend()
    with ModelRenderer(48, 48) as renderer:
        for seed in (1, 2):
            scene = sample_scene(seed)
            ours = _render(renderer, scene, 48)
            model = mujoco.MjModel.from_xml_string(scene_xml(scene, 48))
            data = mujoco.MjData(model)
            mujoco.mj_forward(model, data)
            with mujoco.Renderer(model, 48, 48) as reference:
                reference.update_scene(data, camera="cam")
                np.testing.assert_array_equal(ours, reference.render())
