"""The MuJoCo simulator: determinism, both sides passable, the expert, collection."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import h5py
import numpy as np
import pytest

from mobile_vla.cli import main
from mobile_vla.config import SimConfig, load_config
from mobile_vla.data.hdf5 import read_episode_info
from mobile_vla.errors import ConfigError, MobileVLAError
from mobile_vla.sim.collect import collect, plan_jobs
from mobile_vla.sim.env import NavEnv
from mobile_vla.sim.expert import run_expert
from mobile_vla.sim.scenario import make_scenario, parse_scenarios

SMALL = SimConfig(image_size=[48, 64])


def test_same_seed_same_frames() -> None:
    s = make_scenario(11, "2box", "right", "far", SMALL)
    with NavEnv(SMALL) as a, NavEnv(SMALL) as b:
        ep_a, ep_b = run_expert(a, s), run_expert(b, s)
    np.testing.assert_array_equal(ep_a.frames, ep_b.frames)
    np.testing.assert_array_equal(ep_a.actions, ep_b.actions)
    assert (
        ep_a.frames.shape == (SMALL.episode_length, 48, 64, 3) and ep_a.frames.std() > 5
    )  # a real picture
    other = make_scenario(12, "2box", "right", "far", SMALL)
    with NavEnv(SMALL) as c:
        assert not np.array_equal(run_expert(c, other).frames[0], ep_a.frames[0])


def test_both_sides_share_the_layout_and_the_paths_differ() -> None:
    for seed in range(5):
        for layout in ("1box", "2box"):
            left = make_scenario(seed, layout, "left", "medium", SMALL)
            right = make_scenario(seed, layout, "right", "medium", SMALL)
            assert left.boxes == right.boxes and left.appearance == right.appearance
            assert (left.target_x, left.target_y, left.target) == (
                right.target_x,
                right.target_y,
                right.target,
            )
            assert "left" in left.instruction and "right" in right.instruction
            with NavEnv(SMALL) as env:
                ep_l = run_expert(env, left)
                first_l = ep_l.frames[0]
                traj_l = np.array(env.trajectory)
                ep_r = run_expert(env, right)
                traj_r = np.array(env.trajectory)
            np.testing.assert_array_equal(first_l, ep_r.frames[0])  # same view at the start
            assert ep_l.outcome.success and ep_r.outcome.success
            assert ep_l.outcome.passed_side == "left" and ep_r.outcome.passed_side == "right"
            assert traj_l[:, 1].max() > 0.3 and traj_r[:, 1].min() < -0.3
            assert not np.array_equal(ep_l.actions, ep_r.actions)


@pytest.mark.slow
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("mode", ["teleop_default_length", "continuous_noisy_to_completion"])
def test_expert_succeeds_in_random_scenarios(side: str, mode: str) -> None:
    cfg = (
        SimConfig()
        if mode.startswith("teleop")
        else SimConfig(teleop_actions=False, episode_length=0, action_noise=0.1, yaw_jitter_deg=10)
    )
    rng = np.random.default_rng(2024)
    successes = 0
    with NavEnv(cfg, render=False) as env:
        for _ in range(200):
            s = make_scenario(
                int(rng.integers(1 << 30)),
                str(rng.choice(["1box", "2box"])),
                side,
                str(rng.choice(["close", "medium", "far"])),
                cfg,
            )
            ep = run_expert(env, s, np.random.default_rng(s.seed), record_frames=False)
            successes += ep.outcome.success
    assert successes >= 198, f"expert succeeded in {successes}/200"


def test_judge_collision_wrong_side_and_zero_policy() -> None:
    s = make_scenario(3, "1box", "left", "close", SMALL)
    with NavEnv(SMALL, render=False) as env:
        env.reset(s)
        for _ in range(20):
            env.step([1.15, 0.0, 0.0])  # straight into the obstacle
        out = env.outcome()
        assert out.collision and not out.success
        env.reset(s)
        for _ in range(20):
            env.step([0, 0, 0])
        out = env.outcome()
        assert not out.success and not out.collision and out.passed_side is None
        # the expert of the other side succeeds on its own instruction, not on this one
        right = make_scenario(3, "1box", "right", "close", SMALL)
        run_expert(env, right, record_frames=False)
        assert env.outcome().success
        env.scenario = s  # judge the same path against the left instruction
        assert not env.outcome().success and env.outcome().passed_side == "right"


def test_teleop_and_continuous_actions() -> None:
    s = make_scenario(4, "1box", "right", "far", SMALL)
    with NavEnv(SMALL, render=False) as env:
        tele = run_expert(env, s, record_frames=False)
        assert np.isin(tele.actions, np.float32([-1.15, 0.0, 1.15])).all()
        assert tele.event_types[0] == "episode_start"
        cont_cfg = dataclasses.replace(SMALL, teleop_actions=False)
        env.cfg = cont_cfg
        cont = run_expert(env, s, record_frames=False)
        assert len(np.unique(cont.actions.round(4))) > 3
        assert np.abs(cont.actions).max() <= 1.15 + 1e-6


def test_parse_scenarios() -> None:
    assert len(parse_scenarios(None)) == 12
    assert parse_scenarios(["1box_left_far"]) == [("1box", "left", "far")]
    assert len(parse_scenarios(["right"])) == 6
    assert len(parse_scenarios(["1box_left", "1box_left_close"])) == 3
    with pytest.raises(ConfigError, match="unknown word"):
        parse_scenarios(["3box_left"])


def test_collect_is_deterministic_across_workers(tmp_path: Path, small_sim_cfg: SimConfig) -> None:
    cells = parse_scenarios(["1box_left_close", "2box_right_far"])
    a = collect(tmp_path / "a", 4, cells, seed=5, workers=1, cfg=small_sim_cfg, progress=False)
    b = collect(tmp_path / "b", 4, cells, seed=5, workers=2, cfg=small_sim_cfg, progress=False)
    assert [Path(r.path).name for r in a] == [Path(r.path).name for r in b]
    for ra, rb in zip(a, b, strict=True):
        with h5py.File(ra.path) as fa, h5py.File(rb.path) as fb:
            np.testing.assert_array_equal(fa["images"][()], fb["images"][()])
            np.testing.assert_array_equal(fa["actions"][()], fb["actions"][()])
            assert dict(fa.attrs) == dict(fb.attrs)
    assert [j.layout for j in plan_jobs(4, cells, 5)] == ["1box", "2box", "1box", "2box"]


def test_collect_cli_writes_the_robot_format(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data"
    code = main(
        [
            "collect",
            "--out",
            str(out),
            "--episodes",
            "3",
            "--scenarios",
            "2box_right",
            "--seed",
            "1",
            "-q",
            "--sim.image_size=[32, 40]",
            "--sim.episode_length=12",
        ]
    )
    assert code == 0
    assert "wrote 3 episodes (36 frames)" in capsys.readouterr().out
    files = sorted(out.glob("episode_*.h5"))
    assert len(files) == 3
    for path in files:
        info = read_episode_info(path)
        assert info.scenario == "2box_right" and info.side == "right"
        assert info.num_frames == 12 and info.image_shape == (32, 40, 3)
        assert info.instruction_source == "file" and "right" in info.instruction
        for key in (
            "episode_name",
            "num_frames",
            "action_chunk_size",
            "time_period",
            "collection_datetime",
            "scenario",
            "distance_level",
            "seed",
        ):
            assert key in info.attrs, key
        assert info.attrs["time_period"] in ("dawn", "morning", "evening", "night")
        with h5py.File(path) as fh:
            assert fh["images"].compression == "gzip" and fh["images"].chunks == (1, 32, 40, 3)
            assert fh["actions"].dtype == np.float32 and fh["actions"].shape == (12, 3)
    saved = load_config(out / "collect_seed1.yaml")  # the resolved settings, reusable as a config
    assert saved.seed == 1 and saved.sim.episode_length == 12 and saved.sim.image_size == [32, 40]
    assert main(["collect", "--out", str(out), "--episodes", "0", "-q"]) == 2
    assert main(["collect", "--out", str(out), "--episodes", "1", "--scenarios", "3box", "-q"]) == 2


def test_collection_pairs_left_and_right_on_one_scene(
    tmp_path: Path, small_sim_cfg: SimConfig
) -> None:
    """The left and the right episode of a (layout, distance, repeat) share the scene, so the
    first frames are equal and only the instruction tells the sides apart: a policy cannot
    learn the side from a training scene's look."""
    cells = parse_scenarios(["1box_left_far", "1box_right_far"])
    jobs = plan_jobs(4, cells, 3)
    assert jobs[0].seed == jobs[1].seed != jobs[2].seed == jobs[3].seed
    results = collect(tmp_path, 2, cells, seed=3, workers=1, cfg=small_sim_cfg, progress=False)
    with h5py.File(results[0].path) as left, h5py.File(results[1].path) as right:
        np.testing.assert_array_equal(left["images"][0], right["images"][0])
        assert left["language_instruction"][()] != right["language_instruction"][()]
        assert left["actions"][2, 1] > 0 > right["actions"][2, 1]  # the paths differ


def test_collect_never_overwrites_and_numbers_from_start_index(
    tmp_path: Path, small_sim_cfg: SimConfig
) -> None:
    cells = parse_scenarios(["2box_left_close"])
    first = collect(tmp_path, 1, cells, seed=0, cfg=small_sim_cfg, progress=False)
    before = Path(first[0].path).read_bytes()
    with pytest.raises(MobileVLAError, match=r"already holds .*--start-index"):
        collect(tmp_path, 1, cells, seed=1, cfg=small_sim_cfg, progress=False)
    assert Path(first[0].path).read_bytes() == before
    more = collect(tmp_path, 1, cells, seed=1, cfg=small_sim_cfg, progress=False, start_index=7)
    assert Path(more[0].path).name.endswith("_00007.h5")


def test_corrected_episodes_are_policy_driven_and_expert_labelled(
    tmp_path: Path, small_sim_cfg: SimConfig
) -> None:
    """DAgger: the controller drives, every recorded action is the expert's command at the pose
    the controller reached, and the episode ends at the collision."""
    from dataclasses import replace

    from mobile_vla.evaluation.closed_loop import ConstantController, ExpertReplayController
    from mobile_vla.sim.env import NavEnv
    from mobile_vla.sim.expert import Expert, run_corrected
    from mobile_vla.sim.scenario import make_scenario

    cfg = replace(small_sim_cfg, max_steps=40)
    scenario = make_scenario(11, "1box", "left", "medium", cfg)
    rng = np.random.default_rng(0)
    with NavEnv(cfg) as env:
        crash = run_corrected(env, scenario, ConstantController([1.15, 0, 0]), rng)
        poses = env.trajectory
        assert env.collision
        expert = Expert(scenario, cfg)
        labels = np.stack([expert.act(p) for p in poses[: len(crash.actions)]])
        np.testing.assert_array_equal(crash.actions, labels)
        assert crash.actions[0, 1] > 0  # the expert would have stepped left
        assert len(crash.actions) < cfg.max_steps and all(crash.perturbed)
        # the expert itself as the driver: a clean demonstration that ends on its stop frames
        good = run_corrected(env, scenario, ExpertReplayController(cfg), rng, hold_frames=2)
        assert env.outcome().success
        assert not good.actions[-2:].any() and good.actions[-3].any()
        # a DAgger collection through collect() writes the driven episodes with their origin
    results = collect(
        tmp_path,
        2,
        parse_scenarios(["1box_left_medium"]),
        seed=0,
        cfg=cfg,
        progress=False,
        controller=ExpertReplayController(cfg),
        expert_prob=0.5,
    )
    with h5py.File(results[0].path) as fh:
        assert fh.attrs["driven_by"] == "policy" and fh.attrs["expert_prob"] == 0.5


def test_default_demonstrations_end_with_the_stop() -> None:
    """Collected with the default length, a clean demonstration ends in the goal with stop
    frames, so a policy learns where to stop (cut at 18 frames, a quarter never showed it)."""
    cfg = dataclasses.replace(SimConfig(), image_size=[24, 24])
    stops = []
    with NavEnv(cfg, render=False) as env:
        for i, cell in enumerate(parse_scenarios(None)):
            ep = run_expert(env, make_scenario(50 + i, *cell, cfg), record_frames=False)
            assert ep.outcome.success
            stops.append(int((np.abs(ep.actions).sum(1) == 0)[-2:].all()))
    assert sum(stops) == len(stops)


def test_counterfactual_twin_retraces_the_start_labelled_for_the_other_side(
    tmp_path: Path, small_sim_cfg: SimConfig, capsys: pytest.CaptureFixture[str]
) -> None:
    """collect --counterfactual writes, beside each expert episode, its first frames with the
    instruction's side swapped and the other side's expert labels: the frames are the
    source's, the lateral command points the other way, and the twin ends before the robot
    is level with the obstacle."""
    cells = parse_scenarios(["1box_left_medium", "2box_right_close"])
    results = collect(
        tmp_path, 2, cells, seed=4, cfg=small_sim_cfg, progress=False, counterfactual=True
    )
    assert len(results) == 4
    sources = [r for r in results if not r.path.endswith("_cf.h5")]
    twins = [r for r in results if r.path.endswith("_cf.h5")]
    assert len(sources) == len(twins) == 2
    for src, twin in zip(sources, twins, strict=True):
        s, t = read_episode_info(src.path), read_episode_info(twin.path)
        assert t.source == Path(src.path).stem and s.source is None
        assert t.side != s.side and t.scenario.split("_")[0] == s.scenario.split("_")[0]
        # the same sentence, the side word swapped
        assert t.instruction.replace("right", "left") == s.instruction.replace("right", "left")
        assert t.instruction != s.instruction
        assert 3 <= t.num_frames < s.num_frames
        with h5py.File(src.path) as fs, h5py.File(twin.path) as ft:
            np.testing.assert_array_equal(ft["images"][()], fs["images"][: t.num_frames])
            lateral_src, lateral_twin = fs["actions"][0, 1], ft["actions"][0, 1]
            assert lateral_src * lateral_twin < 0  # the first command goes the other way
    with pytest.raises(MobileVLAError, match="already holds"):
        collect(tmp_path, 2, cells, seed=4, cfg=small_sim_cfg, progress=False, counterfactual=True)
    out = tmp_path / "cli"
    args = ["collect", "--out", str(out), "--episodes", "2", "--scenarios", "1box_left", "-q"]
    assert main([*args, "--counterfactual", "--sim.image_size=[32,32]"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 2 episodes" in printed and "and 2 counterfactual twins" in printed
