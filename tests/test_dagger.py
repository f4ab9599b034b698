"""``mobile-vla dagger``: expert round 0, a correction round driven by round 0's policy, the
summary file, and a rerun that continues instead of collecting or training twice."""

from __future__ import annotations

import json
from pathlib import Path

import h5py

from mobile_vla.cli import main

from .conftest import tiny_overrides


def _args(data: Path, out: Path, rounds: int) -> list[str]:
    over = [f"--{o}" for o in tiny_overrides(data, out)]
    return [
        "dagger",
        "configs/base.yaml",
        "--data",
        str(data),
        "--rounds",
        str(rounds),
        "--episodes",
        "6",
        "--scenarios",
        "1box_left_far",
        "1box_right_far",
        "--seed",
        "5",
        "-q",
        *over,
        "--sim.image_size=[32,32]",
        "--trainer.run_name=dg",
        "--trainer.max_steps=3",
    ]


def test_dagger_round_zero_then_corrections_then_rerun_continues(tmp_path, capsys) -> None:
    data, out = tmp_path / "data", tmp_path / "out"
    assert main(_args(data, out, 1)) == 0
    printed = capsys.readouterr().out
    assert "round 0: 6 episodes (expert" in printed and "round 1:" in printed
    summary = json.loads((out / "runs" / "dg_dagger.json").read_text())
    r0, r1 = summary["rounds"]
    assert r0["driven_by"] == "expert" and r0["goal_reached"] == 6 and r0["train_steps"] == 3
    assert r1["driven_by"] == str(out / "runs" / "dg_r0") and "collected" not in summary
    files = sorted(data.glob("episode_*.h5"))
    expert = [f for f in files if int(f.stem.rsplit("_", 1)[1]) < 100_000]
    corrected = [f for f in files if int(f.stem.rsplit("_", 1)[1]) >= 100_000]
    assert len(expert) == 6 and len(corrected) == r1["episodes"]
    for f in corrected:
        with h5py.File(f) as fh:
            assert fh.attrs["driven_by"] == "policy"
    for r in ("dg_r0", "dg_r1"):
        assert (out / "runs" / r / "checkpoints" / "last").exists()
    # round 1 trained on everything collected so far
    split = json.loads((out / "runs" / "dg_r1" / "split.json").read_text())
    assert sum(len(v) for v in split.values() if isinstance(v, list)) == len(files)

    # a rerun with the same rounds does nothing; the files and run folders stay as they were
    stamps = {p: p.stat().st_mtime_ns for p in (out / "runs" / "dg_r1").rglob("*") if p.is_file()}
    assert main(_args(data, out, 1)) == 0
    assert sorted(data.glob("episode_*.h5")) == files
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_dagger_round_zero_uses_episodes_already_there(train_data, tmp_path, capsys) -> None:
    out = tmp_path / "out"
    before = sorted(train_data.glob("episode_*.h5"))
    args = _args(train_data, out, 0)
    assert main(args) == 0
    assert f"round 0: {len(before)} episodes (existing episodes)" in capsys.readouterr().out
    assert sorted(train_data.glob("episode_*.h5")) == before
