"""Representation analysis: the measures against known cases, and compare on two tiny runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mobile_vla.analysis.representations import (
    compare_features,
    linear_cka,
    linear_cka_debiased,
    softmax_kl,
)
from mobile_vla.config import load_config
from mobile_vla.errors import MobileVLAError

from .conftest import tiny_overrides


def test_cka_is_rotation_and_scale_invariant_and_cosine_is_not() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=(200, 16))
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    b = 3.0 * a @ q
    assert linear_cka(a, b) == pytest.approx(1.0)
    assert linear_cka_debiased(a, b) == pytest.approx(1.0)
    m = compare_features(a, b)
    assert m["cka"] == pytest.approx(1.0)
    assert m["cosine"]["mean"] < 0.5  # the basis changed: raw cosine says little
    same = compare_features(a, a)
    assert same["cosine"]["mean"] == pytest.approx(1.0)
    assert same["euclidean"]["mean"] == pytest.approx(0.0)
    assert same["kl"]["symmetric"] == pytest.approx(0.0, abs=1e-12)
    assert same["correlation"]["value"] == pytest.approx(1.0)
    noise = compare_features(a, rng.normal(size=(200, 16)))
    assert noise["cka"] < 0.2


def test_debiased_cka_is_used_when_samples_are_fewer_than_features() -> None:
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(20, 64)), rng.normal(size=(20, 64))
    m = compare_features(a, b)
    assert m["cka_kind"].startswith("debiased")
    # independent features: the biased estimator is inflated, the debiased one is near 0
    assert abs(m["cka"]) < linear_cka(a, b)


def test_kl_both_directions_and_different_widths() -> None:
    a = np.array([[0.0, 0.0], [1.0, 0.0]])
    b = np.array([[0.0, 0.0], [0.0, 1.0]])
    kl = softmax_kl(a, b, temperature=1.0)
    e = np.e
    p = np.array([e / (e + 1), 1 / (e + 1)])
    expected = np.sum(p * np.log(p / p[::-1])) / 2  # second pair only, averaged over 2
    assert kl["kl_a_b"] == pytest.approx(expected) and kl["kl_b_a"] == pytest.approx(expected)
    assert kl["symmetric"] == pytest.approx(2 * expected)
    m = compare_features(
        np.ones((10, 3)) + np.arange(30).reshape(10, 3), np.arange(40.0).reshape(10, 4) ** 1.5
    )
    assert m["cosine"]["value"] is None and "widths differ" in m["cosine"]["reason"]
    assert np.isfinite(m["cka"])


def test_compare_two_runs(train_data, tmp_path, capsys) -> None:
    from mobile_vla.cli import main
    from mobile_vla.training.run import train

    def run(name: str, *extra: str):
        cfg = load_config(
            None,
            [
                *tiny_overrides(train_data, tmp_path),
                f"trainer.run_name={name}",
                "trainer.max_steps=3",
                *extra,
            ],
        )
        return train(cfg, progress=False)

    a = run("frozen")
    b = run("lora", "train_setup.strategy=lora")
    out = tmp_path / "cmp"
    assert (
        main(["compare", str(a), str(a), "--out", str(tmp_path / "self"), "--samples", "40"]) == 0
    )
    same = json.loads((tmp_path / "self" / "compare.json").read_text())
    assert same["context"]["cka"] == pytest.approx(1.0, abs=1e-6)
    assert same["context"]["cosine"]["mean"] == pytest.approx(1.0, abs=1e-6)
    assert same["latent"]["cka"] == pytest.approx(1.0, abs=1e-6)
    assert main(["compare", str(a), str(b), "--out", str(out), "--samples", "40"]) == 0
    result = json.loads((out / "compare.json").read_text())
    assert result["inputs"]["samples"] == 40
    assert result["strategy_a"] == "frozen" and result["strategy_b"] == "lora"
    for key in ("cosine", "euclidean", "euclidean_standardized", "kl", "correlation"):
        assert key in result["context"] and key in result["latent"]
    assert result["plots"]["tsne_seed"] == 0
    page = (out / "compare.html").read_text()
    assert page.count("data:image/png;base64,") == 2 and "CKA" in page
    assert (out / "pca.png").stat().st_size > 1000 and (out / "tsne.png").exists()
    c = run("other_dims", "data.action_dims=[linear_x]")
    with pytest.raises(MobileVLAError, match="different action spaces"):
        from mobile_vla.analysis.compare import compare_runs

        compare_runs(a, c, tmp_path / "bad")
    assert main(["compare", str(a), str(tmp_path / "missing")]) == 2
