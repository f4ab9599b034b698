"""The pretraining caption corpus: rendering, captions, held-out splits, bad folders."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from mobile_vla.cli import main
from mobile_vla.errors import DataError
from mobile_vla.pretraining.corpus import build_corpus, load_corpus
from mobile_vla.sim.caption_scenes import EVAL_TEMPLATES, sample_scene


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
        from mobile_vla.sim.caption_scenes import left_right_probe

        probe = left_right_probe(scene)
        if probe is None:
            continue
        true, false = probe
        assert "to the left of" in true and "to the right of" in false
        first = true.split(" to the left of ")[0]
        a = next(o for o in scene.objects if first.endswith(f"{o.colour} {o.shape}"))
        second = true.split(" to the left of ")[1]
        b = next(o for o in scene.objects if second.endswith(f"{o.colour} {o.shape}"))
        assert a.y > b.y  # y points left


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
    (mixed / "captions.jsonl").unlink()
    with pytest.raises(DataError, match="incomplete"):
        load_corpus(mixed)
    assert main(["pretrain-data", "--out", str(corpus), "--images", "2", "-q"]) == 2  # not empty
    manifest = json.loads((corpus / "manifest.json").read_text())
    assert manifest["command"] == "" and manifest["images"] == 60
