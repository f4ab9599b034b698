"""Similarity of two models' representations of the same inputs (``shared/specs/metrics.md``).

Every measure pairs rows by input (row i of ``a`` and row i of ``b`` come from the same
window); nothing compares across inputs. Cosine, distances, KL and correlation need the two
feature spaces to have the same width; linear CKA does not, and is reported beside them
because raw cosine and distances depend on each model's basis and anisotropy.
"""

from __future__ import annotations

from typing import Any

import numpy as np

KL_TEMPERATURE = 1.0


def _center(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0, keepdims=True)


def linear_cka(a: np.ndarray, b: np.ndarray) -> float:
    """Linear CKA (Kornblith et al. 2019) of (n, p) and (n, q) feature matrices."""
    x, y = _center(a.astype(np.float64)), _center(b.astype(np.float64))
    cross = np.linalg.norm(y.T @ x, "fro") ** 2
    denom = np.linalg.norm(x.T @ x, "fro") * np.linalg.norm(y.T @ y, "fro")
    return float(cross / denom) if denom > 0 else float("nan")


def _hsic_unbiased(k: np.ndarray, ell: np.ndarray) -> float:
    n = k.shape[0]
    k = k.copy()
    ell = ell.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(ell, 0.0)
    ones = np.ones(n)
    term1 = np.trace(k @ ell)
    term2 = (ones @ k @ ones) * (ones @ ell @ ones) / ((n - 1) * (n - 2))
    term3 = 2.0 / (n - 2) * (ones @ k @ ell @ ones)
    return float((term1 + term2 - term3) / (n * (n - 3)))


def linear_cka_debiased(a: np.ndarray, b: np.ndarray) -> float:
    """Debiased linear CKA (unbiased HSIC estimator, Song et al. 2012); needs n >= 4."""
    x, y = a.astype(np.float64), b.astype(np.float64)
    k, ell = x @ x.T, y @ y.T
    num = _hsic_unbiased(k, ell)
    den = np.sqrt(max(_hsic_unbiased(k, k), 0.0) * max(_hsic_unbiased(ell, ell), 0.0))
    return float(num / den) if den > 0 else float("nan")


def _describe(values: np.ndarray) -> dict[str, float]:
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "p05": float(np.percentile(values, 5)),
        "median": float(np.median(values)),
        "p95": float(np.percentile(values, 95)),
    }


def paired_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    na = np.linalg.norm(a, axis=1)
    nb = np.linalg.norm(b, axis=1)
    return (a * b).sum(1) / np.maximum(na * nb, 1e-12)


def _softmax(x: np.ndarray, t: float) -> np.ndarray:
    z = x / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def softmax_kl(
    a: np.ndarray, b: np.ndarray, temperature: float = KL_TEMPERATURE
) -> dict[str, float]:
    """KL between the softmax (over features, at ``temperature``) of paired rows, both
    directions and their sum, averaged over inputs."""
    p, q = _softmax(a.astype(np.float64), temperature), _softmax(b.astype(np.float64), temperature)
    eps = 1e-12
    ab = np.sum(p * (np.log(p + eps) - np.log(q + eps)), axis=1)
    ba = np.sum(q * (np.log(q + eps) - np.log(p + eps)), axis=1)
    return {
        "kind": "softmax over features",
        "temperature": temperature,
        "kl_a_b": float(ab.mean()),
        "kl_b_a": float(ba.mean()),
        "symmetric": float((ab + ba).mean()),
    }


def compare_features(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """All measures of metrics.md for paired feature matrices a (n, p), b (n, q)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"features must be paired by input: {a.shape[0]} vs {b.shape[0]} rows")
    n = a.shape[0]
    debias = n < max(a.shape[1], b.shape[1]) and n >= 4
    out: dict[str, Any] = {
        "samples": n,
        "dims": [int(a.shape[1]), int(b.shape[1])],
        "cka": linear_cka_debiased(a, b) if debias else linear_cka(a, b),
        "cka_kind": "debiased linear (samples < features)" if debias else "linear",
    }
    if a.shape[1] != b.shape[1]:
        reason = f"feature widths differ ({a.shape[1]} vs {b.shape[1]})"
        for key in ("cosine", "euclidean", "euclidean_standardized", "kl", "correlation"):
            out[key] = {"value": None, "reason": reason}
        return out
    cos = paired_cosine(a, b)
    out["cosine"] = _describe(cos)
    out["cosine_histogram"] = np.histogram(cos, bins=20, range=(-1, 1))[0].tolist()
    out["euclidean"] = _describe(np.linalg.norm(a - b, axis=1))

    def standardize(x: np.ndarray) -> np.ndarray:
        return (x - x.mean(0)) / np.maximum(x.std(0), 1e-8)

    out["euclidean_standardized"] = _describe(
        np.linalg.norm(standardize(a) - standardize(b), axis=1)
    )
    out["kl"] = softmax_kl(a, b)
    ma, mb = a.mean(0), b.mean(0)
    out["correlation"] = {
        "kind": "Pearson r of per-dimension mean features",
        "value": float(np.corrcoef(ma, mb)[0, 1]) if ma.std() > 0 and mb.std() > 0 else None,
    }
    return out


def pca_2d(x: np.ndarray) -> np.ndarray:
    xc = _center(x.astype(np.float64))
    _, _, vt = np.linalg.svd(xc, full_matrices=False)
    return xc @ vt[:2].T
