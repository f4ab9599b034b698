"""The stop probe (``python -m mobile_vla.analysis.stop_probe``): its stop frame, its read-out
with a planted signal and with shuffled labels, and a run on simulated episodes."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pytest

from mobile_vla.analysis.stop_probe import format_stop_probe, probe_stop, readout, stop_frame
from mobile_vla.errors import MobileVLAError


def test_stop_frame_is_the_first_frame_after_the_last_forward_command() -> None:
    assert stop_frame(np.array([1.15, 1.15, 0.0, 1.15, 0.0, 0.0])) == 4
    assert stop_frame(np.array([1.15, 1.15, 1.15])) is None  # never stops within its frames
    assert stop_frame(np.array([0.0, 0.0])) is None  # never drives forward


def test_readout_finds_a_planted_signal_and_not_a_shuffled_one() -> None:
    rng = np.random.default_rng(0)
    n = 400
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 50))
    x[:, 7] += 3.0 * (2 * y - 1)  # one informative dimension among noise
    train = np.arange(n) < 300
    planted = readout(x, y, train)
    assert planted["held_out"] > 0.9 and planted["train"] > 0.9
    shuffled = readout(x, rng.permutation(y), train)
    assert 0.3 < shuffled["held_out"] < 0.7


def test_probe_on_simulated_episodes(sim_dataset, tmp_path) -> None:
    usable = 0
    for path in sorted(sim_dataset.glob("episode_*.h5")):
        with h5py.File(path, "r") as fh:
            stop = stop_frame(np.asarray(fh["actions"][:, 0]))
        usable += stop is not None and stop >= 2
    result = probe_stop(sim_dataset, episodes=100, gaps=(1, 2), held_out=0.25)
    assert result["episodes"] == usable >= 8
    assert set(result["gaps"]) == {"1", "2"}
    row = result["gaps"]["1"]
    assert set(row) == {"vision tokens", "pixels", "shuffled labels"}
    for r in row.values():
        assert 0.0 <= r["held_out"] <= 1.0 and 0.0 <= r["train"] <= 1.0
    assert "gap 2 (23.0 cm)" in "\n".join(format_stop_probe(result))

    few = tmp_path / "few"
    few.mkdir()
    for path in sorted(sim_dataset.glob("episode_*.h5"))[:3]:
        shutil.copy(path, few / path.name)
    with pytest.raises(MobileVLAError, match=r"'.*few'.*needs >= 8"):
        probe_stop(few, gaps=(1,))
    with pytest.raises(MobileVLAError, match="--gaps must be >= 1"):
        probe_stop(sim_dataset, gaps=(0,))
