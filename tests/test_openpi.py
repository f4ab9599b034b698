"""openpi's WebSocket policy protocol on `mobile-vla serve`: the real `openpi-client` from PyPI
(in `.venv-openpi`, which `make test` installs) drives the simulator, and the protocol's edges
(keys, encodings, errors, per-connection history) are checked with a plain WebSocket client."""

from __future__ import annotations

import os
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from mobile_vla.serving.protocol import BadRequest, packb_openpi, unpackb

from .test_serving import KEY, LiveServer, frame, start

ROOT = Path(__file__).resolve().parents[1]
OPENPI_PYTHON = Path(os.environ.get("MOBILE_VLA_OPENPI_PYTHON", ROOT / ".venv-openpi/bin/python"))


class OpenpiRobot:
    """The robot program of tests/openpi_robot.py, in its own venv, over pipes."""

    def __init__(self) -> None:
        if not OPENPI_PYTHON.exists():
            pytest.fail(
                f"{OPENPI_PYTHON} is missing: `make test` installs the real openpi-client there "
                "(`make openpi-client`), or point MOBILE_VLA_OPENPI_PYTHON at a Python that has it"
            )
        self.proc = subprocess.Popen(
            [str(OPENPI_PYTHON), str(Path(__file__).with_name("openpi_robot.py"))],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        )

    def call(self, **cmd: Any) -> dict:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        data = packb_openpi(cmd)  # our encoder, read by openpi's decoder
        self.proc.stdin.write(struct.pack("<I", len(data)) + data)
        self.proc.stdin.flush()
        header = self.proc.stdout.read(4)
        assert len(header) == 4, f"the openpi robot process died (exit {self.proc.poll()})"
        (size,) = struct.unpack("<I", header)
        return unpackb(self.proc.stdout.read(size))  # openpi's encoder, read by ours

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def robot() -> Iterator[OpenpiRobot]:
    r = OpenpiRobot()
    yield r
    r.close()


class OpenpiController:
    """A closed-loop controller that acts through the openpi robot process: a new connection
    per episode, the frame as a raw uint8 array under ``observation/image``."""

    def __init__(self, robot: OpenpiRobot, url: str, horizon: int = 1) -> None:
        self.robot, self.url, self.horizon = robot, url, horizon
        self.metadata: dict = {}
        self.chunks: list[np.ndarray] = []

    def reset(self, scenario: Any) -> None:
        out = self.robot.call(cmd="connect", url=self.url, api_key=KEY, horizon=self.horizon)
        assert "error" not in out, out
        self.metadata = out["metadata"]

    def act(self, image: np.ndarray, instruction: str) -> np.ndarray:
        out = self.robot.call(cmd="infer", obs={"observation/image": image, "prompt": instruction})
        assert "error" not in out, out
        action = out["result"]["actions"]
        self.chunks.append(action)
        return np.asarray(action, np.float32)


def test_the_real_openpi_client_drives_the_simulator_as_in_process(
    served_run: Path, robot: OpenpiRobot
) -> None:
    """openpi's `WebsocketClientPolicy` + `ActionChunkBroker` (horizon 1: a fresh chunk each
    step, whose first action is executed) drive 4 held-out scenes episode for episode as the
    policy does in process."""
    from mobile_vla.evaluation.closed_loop import closed_loop
    from mobile_vla.models.runtime import PolicyController
    from mobile_vla.training.runs import load_policy

    live, engine = start(served_run, api_key=KEY)
    try:
        ctrl = OpenpiController(robot, f"ws://127.0.0.1:{live.port}")
        remote, remote_eps = closed_loop(ctrl, engine.cfg.sim, 4, 5)
        # openpi's client never closes a connection it replaced: each episode's session stays
        # until the server's session TTL (or the LRU bound) drops it
        assert len(engine.sessions) == 4
    finally:
        live.stop()
    meta = ctrl.metadata
    assert meta["protocol"] == "openpi" and meta["action_horizon"] == 4
    assert meta["action_columns"] == ["linear_x", "linear_y", "angular_z"]
    assert all(c.shape == (3,) and np.isfinite(c).all() for c in ctrl.chunks)
    assert len(ctrl.chunks) == sum(e.steps for e in remote_eps)
    policy, cfg = load_policy(served_run)
    local, local_eps = closed_loop(PolicyController(policy, cfg), cfg.sim, 4, 5)
    assert remote.success_rate == local.success_rate
    for r, loc in zip(remote_eps, local_eps, strict=True):
        assert (r.success, r.end, r.steps) == (loc.success, loc.end, loc.steps)
        np.testing.assert_allclose(r.trajectory, loc.trajectory, atol=1e-5)


def test_the_real_openpi_client_gets_errors_and_whole_chunks(
    served_run: Path, robot: OpenpiRobot
) -> None:
    live, _ = start(served_run, api_key=KEY)
    url = f"ws://127.0.0.1:{live.port}"
    try:
        refused = robot.call(cmd="connect", url=url, api_key="wrong", horizon=4)
        assert "403" in refused["error"]
        assert "error" not in robot.call(cmd="connect", url=url, api_key=KEY, horizon=4)
        image = frame(3, size=64)
        bad = robot.call(cmd="infer", obs={"observation/image": image, "text": "go left"})
        assert bad["error"].startswith("RuntimeError") and "missing 'prompt'" in bad["error"]
        bad = robot.call(
            cmd="infer", obs={"observation/image": image.astype(np.float32), "prompt": "go"}
        )
        assert "'observation/image' must be a uint8 array" in bad["error"]
        # the connection survived; the broker hands out one chunk's rows, then asks again
        rows = [
            robot.call(cmd="infer", obs={"observation/image": image, "prompt": "go left"})
            for _ in range(5)
        ]
        assert [r["result"]["step"] for r in rows] == [1, 1, 1, 1, 2]
        chunk = np.stack([r["result"]["actions"] for r in rows[:4]])
        assert chunk.shape == (4, 3) and np.isfinite(chunk).all()
        assert rows[0]["result"]["server_timing"]["infer_ms"] > 0
    finally:
        live.stop()


# ---- the protocol's edges, with a plain WebSocket client (no openpi venv needed) --------------


def wait_for_no_sessions(engine: Any, timeout: float = 5.0) -> None:
    """A closed connection's session is dropped (the server notices the close a moment later)."""
    deadline = time.monotonic() + timeout
    while engine.sessions and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.sessions, list(engine.sessions)


def connect(live: LiveServer, headers: dict | None = None) -> Any:
    from websockets.sync.client import connect as ws_connect

    return ws_connect(f"ws://127.0.0.1:{live.port}", additional_headers=headers, max_size=2**24)


def infer(ws: Any, obs: dict) -> Any:
    ws.send(packb_openpi(obs))
    reply = ws.recv(10)
    return reply if isinstance(reply, str) else unpackb(reply)


def test_openpi_keys_encoding_errors_and_per_connection_history(served_run: Path) -> None:
    from websockets.exceptions import InvalidStatus

    live, engine = start(served_run, api_key=KEY, openpi_image_key="cam/front")
    try:
        with pytest.raises(InvalidStatus, match="403"):
            connect(live)
        with pytest.raises(InvalidStatus, match="403"):
            connect(live, {"Authorization": f"Bearer {KEY}"})
        texts = ["go around on the left", "go around on the right"]
        frames = [frame(20 + t, size=48) for t in range(3)]
        # two connections interleaved answer as each alone: a connection is a session
        with (
            connect(live, {"Authorization": f"Api-Key {KEY}"}) as a,
            connect(live, {"X-API-Key": KEY}) as b,
        ):
            meta = unpackb(a.recv(10))
            unpackb(b.recv(10))
            assert meta["image_key"] == "cam/front" and meta["prompt_key"] == "prompt"
            both = [
                (
                    infer(a, {"cam": {"front": f}, "prompt": texts[0]}),  # nested a/b key
                    infer(b, {"cam/front": f.transpose(2, 0, 1).copy(), "prompt": texts[1]}),
                )
                for f in frames
            ]
            assert len(engine.sessions) == 2
        for k, text in enumerate(texts):
            with connect(live, {"X-API-Key": KEY}) as alone:
                alone.recv(10)
                for f, pair in zip(frames, both, strict=True):
                    out = infer(alone, {"cam/front": f, "prompt": text})
                    np.testing.assert_allclose(out["actions"], pair[k]["actions"], atol=1e-5)
                    assert out["step"] == pair[k]["step"]
                # reset: the history starts over
                again = infer(alone, {"cam/front": frames[0], "prompt": text, "reset": True})
                assert again["step"] == 1
                np.testing.assert_allclose(again["actions"], both[0][k]["actions"], atol=1e-5)
        wait_for_no_sessions(engine)
        # bad input: a text frame naming what is wrong, and the connection keeps serving
        with connect(live, {"X-API-Key": KEY}) as ws:
            ws.recv(10)
            good = {"cam/front": frames[0], "prompt": texts[0]}
            for message, words in [
                (b"\xc1 not msgpack", "not valid msgpack"),
                ("a text frame", "binary msgpack"),
                (packb_openpi([1, 2]), "must be a map"),
                (packb_openpi({"prompt": "go"}), "missing 'cam/front'"),
                (packb_openpi({**good, "prompt": ""}), "'prompt' is empty"),
                (packb_openpi({**good, "prompt": 7}), "'prompt' must be a string"),
                (packb_openpi({**good, "reset": "yes"}), "'reset' must be true or false"),
                (packb_openpi({**good, "cam/front": np.zeros((2000, 8, 3), np.uint8)}), "at most"),
                (
                    packb_openpi({**good, "cam/front": np.zeros((4, 4, 3), np.complex64)}),
                    "dtype",
                ),
                (b"\x00" * (8 * 1024 * 1024 + 1), "at most"),
            ]:
                ws.send(message)
                reply = ws.recv(10)
                assert isinstance(reply, str) and reply.startswith("error 4"), reply
                assert words in reply, (words, reply)
            assert infer(ws, good)["actions"].shape == (4, 3)
    finally:
        live.stop()


def test_openpi_encoding_reads_both_spellings_and_healthz(served_run: Path) -> None:
    import http.client

    from mobile_vla.serving.protocol import packb

    arr = np.arange(6, dtype=np.float32).reshape(2, 3)
    for pack in (packb, packb_openpi):
        np.testing.assert_array_equal(unpackb(pack({"a": arr}))["a"], arr)
    # openpi's scalar spelling (np.generic) and its forged variants
    scalar = {b"__npgeneric__": True, b"data": 2.5, b"dtype": "<f4"}
    import msgpack

    assert unpackb(msgpack.packb({"x": scalar}, use_bin_type=True))["x"] == 2.5
    with pytest.raises(BadRequest, match="dtype"):
        unpackb(msgpack.packb({**scalar, b"dtype": "|O"}, use_bin_type=True))
    with pytest.raises(BadRequest, match="bytes"):
        forged = {b"__ndarray__": True, b"data": b"\x00" * 3, b"dtype": "<f4", b"shape": [1]}
        unpackb(msgpack.packb(forged, use_bin_type=True))
    live, _ = start(served_run, api_key=KEY)
    try:
        conn = http.client.HTTPConnection("127.0.0.1", live.port, timeout=10)
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert resp.status == 200 and resp.read() == b"OK"
        # /predict takes openpi's Authorization header as well
        conn.request(
            "POST",
            "/reset",
            body=b'{"session_id": "nobody"}',
            headers={"Authorization": f"Api-Key {KEY}"},
        )
        resp = conn.getresponse()
        assert resp.status == 404 and b"unknown session_id" in resp.read()
        conn.request(
            "POST",
            "/reset",
            body=b'{"session_id": "nobody"}',
            headers={"Authorization": "Api-Key wrong"},
        )
        assert conn.getresponse().status == 401
        conn.close()
    finally:
        live.stop()
