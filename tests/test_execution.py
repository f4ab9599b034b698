"""Robot-side execution: the timed action queue (stale actions dropped, overlaps blended, the
deadman), and closed loop in the simulator through a live server with the network delayed
0, 200 and 800 ms, and a server that stops answering."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from mobile_vla.data.commands import full_commands
from mobile_vla.errors import MobileVLAError
from mobile_vla.serving.execution import (
    ActionQueue,
    DelayedQueueController,
    ExecutionSettings,
    RealtimeQueueClient,
)

from .test_serving import KEY, start


def chunk(n: int, start: float) -> np.ndarray:
    return np.array([[start + k, 0.5, 0.0] for k in range(n)], np.float32)


def test_stale_actions_are_dropped_and_overlaps_blended() -> None:
    q = ActionQueue(ExecutionSettings(dt=0.1, blend=0.75, deadman_s=0.35))
    # a reply for a frame taken at t=0 arrives at t=0.2: its first two actions are past
    assert q.push(0.0, chunk(4, 0.0), now=0.2) == 2
    assert q.remaining(0.2) == 2
    np.testing.assert_array_equal(q.pop(0.2), [2.0, 0.5, 0.0])
    # the next reply (frame at 0.2) overlaps at t=0.3: 0.75 new + 0.25 old
    q.push(0.2, chunk(4, 10.0), now=0.3)
    np.testing.assert_allclose(q.pop(0.3), [0.75 * 11.0 + 0.25 * 3.0, 0.5, 0.0])
    np.testing.assert_allclose(q.pop(0.4), [12.0, 0.5, 0.0])
    np.testing.assert_allclose(q.pop(0.5), [13.0, 0.5, 0.0])
    # nothing queued: the last command is kept until the deadman, then a stop
    assert [float(q.pop(t)[0]) for t in (0.6, 0.7, 0.8, 0.9)] == [13.0, 13.0, 13.0, 0.0]
    st = q.stats
    assert (st.fresh, st.held, st.stopped, st.stale_dropped) == (4, 3, 1, 3)  # 2 + 1 (t=0.2)
    assert st.longest_gap_s == pytest.approx(0.4)


def test_the_queue_stops_before_any_action_and_refuses_bad_settings() -> None:
    q = ActionQueue(ExecutionSettings())
    assert not q.pop(0.0).any() and q.stats.stopped == 1  # no action yet: stopped
    for bad in (
        {"dt": 0.0},
        {"refill_below": 0},
        {"blend": 0.0},
        {"blend": 1.5},
        {"deadman_s": 0.0},
    ):
        with pytest.raises(MobileVLAError, match=next(iter(bad))):
            ActionQueue(ExecutionSettings(**bad))
    cmds = full_commands([[1.0, 2.0]], ["linear_y", "angular_z"])
    np.testing.assert_array_equal(cmds, [[0.0, 1.0, 2.0]])


@pytest.fixture(scope="module")
def live(served_run: Path):
    server, engine = start(served_run, api_key=KEY)
    yield server, engine
    server.stop()


def drive(live, delay_s: float, silent_after_s: float = float("inf"), **settings: float):
    from mobile_vla.evaluation.closed_loop import closed_loop
    from mobile_vla.serving.client import PredictClient

    server, engine = live
    client = PredictClient(server.url, KEY, timeout=10)
    ex = ExecutionSettings(dt=1.0 / engine.cfg.sim.control_hz, **{"refill_below": 4, **settings})
    ctrl = DelayedQueueController(
        client.predict_timed,
        engine.policy.action_dims,
        ex,
        delay_s=delay_s,
        silent_after_s=silent_after_s,
        deadman_check=0.2,
    )
    summary, results = closed_loop(ctrl, engine.cfg.sim, 4, 5)
    return summary, results, ctrl.episodes


def test_no_delay_replacing_chunks_drives_as_the_robot_node(live, served_run: Path) -> None:
    """Delay 0, a request every tick and the new chunk replacing the old: the queue executes
    each fresh chunk's first action, as the synchronous robot node does (episode for
    episode)."""
    from mobile_vla.evaluation.closed_loop import closed_loop, robot_camera
    from mobile_vla.models.runtime import PolicyController
    from mobile_vla.training.runs import load_policy

    _, queued, stats = drive(live, 0.0, blend=1.0, deadman_s=0.2)
    policy, cfg = load_policy(served_run)
    _, local = closed_loop(PolicyController(policy, cfg, camera=robot_camera), cfg.sim, 4, 5)
    for r, loc in zip(queued, local, strict=True):
        assert (r.end, r.steps) == (loc.end, loc.steps)
        np.testing.assert_allclose(r.trajectory, loc.trajectory, atol=1e-5)
    assert all(s.fresh == s.requests and s.stopped == 0 for s in stats)


@pytest.mark.parametrize("delay_ms", [200, 800])
def test_delays_drop_stale_actions_and_the_deadman_holds(live, delay_ms: int) -> None:
    summary, _, stats = drive(live, delay_ms / 1000, deadman_s=0.2)
    dropped = sum(s.stale_dropped for s in stats)
    gap = max(s.longest_gap_s for s in stats)
    print(
        f"delay {delay_ms} ms: success {summary.overall.successes}/4, dropped {dropped}, "
        f"gap {gap:.1f} s"
    )
    assert dropped > 0  # a reply's first actions are for ticks already past
    assert sum(s.over_deadman_moving for s in stats) == 0
    if delay_ms == 800:  # 4-action chunks (0.4 s) cannot cover 0.8 s: the deadman stops
        assert sum(s.stopped for s in stats) > 0 and gap > 0.2


def test_a_server_that_stops_answering_stops_the_robot_within_the_deadman(live) -> None:
    _, _, stats = drive(live, 0.1, silent_after_s=0.3, deadman_s=0.2)
    assert all(s.over_deadman_moving == 0 for s in stats)
    assert all(s.stopped > 0 for s in stats)
    # the same run with the deadman off keeps moving past it: this check can fail
    _, _, off = drive(live, 0.1, silent_after_s=0.3, deadman_s=float("inf"))
    assert sum(s.over_deadman_moving for s in off) > 0


def test_drive_sim_reports_the_queue(live, tmp_path: Path, capsys) -> None:
    from mobile_vla.cli import main

    server, _ = live
    out = tmp_path / "q.json"
    args = ["drive-sim", "--server", server.url, "--api-key", KEY, "--episodes", "2"]
    args += ["--execution", "queue", "--delay-ms", "200", "--deadman", "0.3", "-q"]
    assert main([*args, "--out", str(out)]) == 0
    report = json.loads(out.read_text())["execution"]
    assert report["delay_ms"] == 200 and report["deadman_s"] == 0.3
    assert report["stale_dropped"] > 0 and report["over_deadman_moving"] == 0
    assert "robot queue (every frame): delay 200 ms" in capsys.readouterr().out
    assert main([*args[:-1], "--refill-below", "-1", "-q"]) == 2  # bad setting: refused


@pytest.mark.serial
def test_realtime_client_refills_in_the_background_and_stops_when_the_server_dies() -> None:
    dead = threading.Event()

    def transport(image, instruction, session, reset, obs_time):
        time.sleep(0.03)
        if dead.is_set():
            raise OSError("server gone")
        return {"chunk": [[0.5, 0.1]] * 4, "obs_time": obs_time}

    client = RealtimeQueueClient(
        transport, ["linear_x", "linear_y"], ExecutionSettings(dt=0.05, deadman_s=0.2)
    )
    frame = np.zeros((8, 8, 3), np.uint8)
    moving = []
    for _ in range(20):  # 1 s at 20 Hz
        moving.append(bool(np.abs(client.act(frame, "go")).max() > 0))
        time.sleep(0.05)
    assert sum(moving) >= 10  # it drove on chunks fetched in the background
    dead.set()
    t_dead = client.now()
    last_moving = t_dead
    for _ in range(16):
        if np.abs(client.act(frame, "go")).max() > 0:
            last_moving = client.now()
        time.sleep(0.05)
    # queued actions (a reply already on its way: <= 4 x 0.05 s) + the deadman (0.2 s) + one
    # tick of sleep jitter on a busy machine
    assert last_moving - t_dead < 0.2 + 0.2 + 0.15
    assert client.errors > 0 and client.queue.stats.stopped > 0
    client.close()


def test_refill_only_sends_a_frame_when_the_queue_runs_low(live) -> None:
    """LeRobot's / openpi's way: a request only below refill_below with none in flight, so
    with 4-action chunks and refill below 2, about one frame in three reaches the server."""
    _, _, stats = drive(live, 0.0, deadman_s=0.5, every_frame=False, refill_below=2)
    ticks = sum(s.fresh + s.held + s.stopped for s in stats)
    assert 0 < sum(s.requests for s in stats) < 0.5 * ticks
