"""The policy server on a real loopback port: the robot's request, bad input, sessions, the
WebSocket stream, and driving the simulator through the wire."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mobile_vla.serving.client import PredictClient, ServerError, StreamClient, jpeg_224
from mobile_vla.serving.protocol import packb, unpackb
from mobile_vla.serving.server import Engine, ServeSettings

from . import http_fuzz

KEY = http_fuzz.KEY


class LiveServer:
    def __init__(self, engine: Engine) -> None:
        import uvicorn

        from mobile_vla.serving.server import uvicorn_config

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn_config(engine, "127.0.0.1", self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.05)
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start(run: Path, **settings: object) -> tuple[LiveServer, Engine]:
    from mobile_vla.serving.server import load_engine

    engine = load_engine(run, ServeSettings(**settings))
    return LiveServer(engine), engine


@pytest.fixture(scope="module")
def server(served_run: Path) -> Iterator[LiveServer]:
    live, _ = start(served_run, api_key=KEY)
    yield live
    live.stop()


def frame(seed: int = 0, size: int = 224) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def b64_jpeg(image: np.ndarray) -> str:
    return base64.b64encode(jpeg_224(image)).decode()


def raw_post(
    url: str, path: str, body: bytes, key: str | None = KEY, headers: dict | None = None
) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    h = {"Content-Type": "application/json", **(headers or {})}
    if key is not None:
        h["X-API-Key"] = key
    conn.request("POST", path, body=body, headers=h)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


def test_the_robots_exact_request(server: LiveServer) -> None:
    body = json.dumps(
        {"image": b64_jpeg(frame()), "instruction": "Navigate to the gray basket on the left"}
    ).encode()
    status, out = raw_post(server.url, "/predict", body)
    assert status == 200
    assert isinstance(out["action"], list) and len(out["action"]) == 3
    assert all(isinstance(v, float) for v in out["action"][:2])  # robot reads action[0], [1]
    assert out["latency_ms"] > 0 and out["session_id"] == "default"
    assert np.asarray(out["chunk"]).shape == (4, 2)
    assert out["action"][:2] == pytest.approx(out["chunk"][0], abs=1e-5)
    health = PredictClient(server.url, KEY).health()
    assert health["model_loaded"] is True and health["chunk_length"] == 4


BAD = [
    ("not_json", b"this is not json", 400, "not valid JSON"),
    ("not_object", b"[1, 2]", 400, "JSON object"),
    ("missing_image", json.dumps({"instruction": "go left"}).encode(), 400, "'image'"),
    ("missing_instruction", json.dumps({"image": "AAAA"}).encode(), 400, "'instruction'"),
    (
        "not_base64",
        json.dumps({"image": "%%% not base64 %%%", "instruction": "go"}).encode(),
        400,
        "not valid base64",
    ),
    (
        "not_an_image",
        json.dumps(
            {"image": base64.b64encode(b"plain text, not a jpeg").decode(), "instruction": "go"}
        ).encode(),
        400,
        "not a decodable image",
    ),
    ("empty_instruction", None, 400, "is empty"),
    ("long_instruction", None, 400, "at most 1000"),
    ("zero_size_image", None, 400, "image"),
    ("huge_image", None, 400, "at most 1024 pixels"),
    ("gif_image", None, 400, "expected JPEG or PNG"),
    ("bad_session", None, 400, "session_id"),
    ("deep_json", b"[" * 100_000 + b"]" * 100_000, 400, "nested too deeply"),
    (
        "huge_integer",
        b'{"image": "AAAA", "instruction": "go", "n": ' + b"9" * 5000 + b"}",
        400,
        "not valid JSON",
    ),
    ("lone_surrogate", b'{"image": "AAAA", "instruction": "go \\ud800 left"}', 400, "surrogate"),
    ("surrogate_session", None, 400, "surrogate"),
]


def _body(kind: str) -> bytes:
    ok = b64_jpeg(frame())
    if kind == "empty_instruction":
        return json.dumps({"image": ok, "instruction": "   "}).encode()
    if kind == "long_instruction":
        return json.dumps({"image": ok, "instruction": "left " * 2000}).encode()
    if kind == "zero_size_image":
        return json.dumps({"image": "", "instruction": "go"}).encode()
    if kind in ("huge_image", "gif_image"):
        buf = io.BytesIO()
        if kind == "gif_image":
            Image.new("RGB", (8, 8)).save(buf, format="GIF")
        else:
            Image.new("RGB", (1500, 8)).save(buf, format="PNG")
        return json.dumps(
            {"image": base64.b64encode(buf.getvalue()).decode(), "instruction": "go"}
        ).encode()
    if kind == "surrogate_session":
        return f'{{"image": "{ok}", "instruction": "go", "session_id": "\\udc00"}}'.encode()
    if kind == "bad_session":
        return json.dumps({"image": ok, "instruction": "go", "session_id": 5}).encode()
    raise AssertionError(kind)


@pytest.mark.parametrize(("kind", "body", "status", "words"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_gets_4xx_and_the_server_keeps_serving(server, kind, body, status, words) -> None:
    code, out = raw_post(server.url, "/predict", body if body is not None else _body(kind))
    assert code == status and words in out["error"], out
    ok, _ = raw_post(
        server.url,
        "/predict",
        json.dumps({"image": b64_jpeg(frame()), "instruction": "go left"}).encode(),
    )
    assert ok == 200


def test_api_key_body_size_and_reset_errors(server: LiveServer) -> None:
    good = json.dumps({"image": b64_jpeg(frame()), "instruction": "go left"}).encode()
    assert raw_post(server.url, "/predict", good, key=None)[0] == 401
    code, out = raw_post(server.url, "/predict", good, key="wrong")
    assert code == 401 and "X-API-Key" in out["error"]
    big = json.dumps({"image": "A" * (9 * 1024 * 1024), "instruction": "go"}).encode()
    code, out = raw_post(server.url, "/predict", big)
    assert code == 413 and "at most" in out["error"]
    code, out = raw_post(server.url, "/reset", json.dumps({"session_id": "nobody"}).encode())
    assert code == 404 and "unknown session_id" in out["error"]
    assert raw_post(server.url, "/predict", good)[0] == 200
    code, out = raw_post(server.url, "/reset", json.dumps({"session_id": "default"}).encode())
    assert code == 200 and out["reset"] is True


def test_sessions_keep_separate_histories(served_run: Path) -> None:
    live, _ = start(served_run)
    try:
        client = PredictClient(live.url, timeout=10)
        a = [frame(i) for i in range(5)]
        b = [frame(100 + i) for i in range(5)]
        jpa, jpb = [jpeg_224(x) for x in a], [jpeg_224(x) for x in b]
        seq_a = [client.predict(j, "go left", "A")["action"] for j in jpa]
        seq_b = [client.predict(j, "go right", "B")["action"] for j in jpb]
        client.reset("A")
        client.reset("B")
        inter_a, inter_b = [], []
        for ja, jb in zip(jpa, jpb, strict=True):
            inter_a.append(client.predict(ja, "go left", "A")["action"])
            inter_b.append(client.predict(jb, "go right", "B")["action"])
        np.testing.assert_allclose(inter_a, seq_a, atol=1e-6)
        np.testing.assert_allclose(inter_b, seq_b, atol=1e-6)
        # and from threads at once
        results: dict[str, list] = {"A": [], "B": []}
        client.reset("A")
        client.reset("B")

        def drive(sid: str, jpegs: list[bytes], text: str) -> None:
            c = PredictClient(live.url, timeout=10)
            results[sid] = [c.predict(j, text, sid)["action"] for j in jpegs]

        threads = [
            threading.Thread(target=drive, args=("A", jpa, "go left")),
            threading.Thread(target=drive, args=("B", jpb, "go right")),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        np.testing.assert_allclose(results["A"], seq_a, atol=1e-6)
        np.testing.assert_allclose(results["B"], seq_b, atol=1e-6)
        # a history changes the answer: same frame, different past
        client.reset("A")
        fresh = client.predict(jpa[-1], "go left", "A", reset=True)["action"]
        assert not np.allclose(fresh, seq_a[-1])
    finally:
        live.stop()


def test_websocket_metadata_inference_and_bad_messages(server: LiveServer) -> None:
    with pytest.raises(Exception):  # noqa: B017 - the handshake is refused without the key
        StreamClient(f"ws://127.0.0.1:{server.port}/stream")
    with StreamClient(f"ws://127.0.0.1:{server.port}/stream", api_key=KEY) as ws:
        meta = ws.metadata
        assert meta["type"] == "metadata" and meta["chunk_length"] == 4
        assert meta["action_names"] == ["linear_x", "linear_y", "angular_z"]
        assert meta["image_size"] == [32, 32] and meta["model"] == "srv"
        out = ws.infer(frame(size=64), "go around on the left")
        assert out["actions"].dtype == np.float32 and out["actions"].shape == (4, 2)
        assert out["server_timing"]["infer_ms"] > 0
        err = ws.send_raw(b"\xc1 definitely not msgpack")
        assert err["status"] == 400 and "msgpack" in err["error"]
        err = ws.send_raw("a text frame")
        assert err["status"] == 400
        err = ws.infer(np.zeros((4, 4), np.float32), "go")
        assert err["status"] == 400 and "uint8" in err["error"]
        assert ws.infer(frame(size=64), "")["status"] == 400
        again = ws.infer(frame(size=64), "go around on the left")
        assert again["actions"].shape == (4, 2)


def test_msgpack_arrays_round_trip_without_pickle() -> None:
    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    back = unpackb(packb({"a": arr, "n": 3}))
    np.testing.assert_array_equal(back["a"], arr)
    forged = packb({"__ndarray__": True, "data": b"\x00" * 8, "dtype": "|O", "shape": [1]})
    from mobile_vla.serving.protocol import BadRequest

    with pytest.raises(BadRequest, match="dtype"):
        unpackb(forged)
    with pytest.raises(BadRequest, match="bytes"):
        unpackb(packb({"__ndarray__": True, "data": b"\x00" * 3, "dtype": "<f4", "shape": [1]}))


def test_drive_sim_through_the_server_matches_in_process(served_run: Path, capsys) -> None:
    from mobile_vla.cli import main
    from mobile_vla.evaluation.closed_loop import closed_loop, robot_camera
    from mobile_vla.models.runtime import PolicyController
    from mobile_vla.training.runs import load_policy

    live, _ = start(served_run)
    try:
        out = Path(served_run) / "drive.json"
        assert (
            main(
                [
                    "drive-sim",
                    "--server",
                    live.url,
                    "--episodes",
                    "4",
                    "--seed",
                    "5",
                    "--timeout",
                    "10",
                    "-q",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
        remote = json.loads(out.read_text())
        assert "through the server" in capsys.readouterr().out
    finally:
        live.stop()
    policy, cfg = load_policy(served_run)
    local, results = closed_loop(PolicyController(policy, cfg, camera=robot_camera), cfg.sim, 4, 5)
    assert remote["success_rate"] == local.success_rate
    assert remote["collision_rate"] == local.collision_rate
    assert [b["successes"] for b in remote["by_side"].values()] == [
        b.successes for b in local.by_side.values()
    ]
    assert remote["episodes"] == 4 and remote["latency_ms_p99"] < 1000
    # episode by episode: same ending, same number of steps, same path
    for r, loc in zip(remote["episodes_detail"], results, strict=True):
        assert (r["success"], r["end"], r["steps"]) == (loc.success, loc.end, loc.steps)
        np.testing.assert_allclose(r["trajectory"], loc.trajectory, atol=1e-6)


def test_client_reports_server_errors(server: LiveServer) -> None:
    client = PredictClient(server.url, KEY, timeout=10)
    with pytest.raises(ServerError, match="404"):
        client.reset("ghost")
    with pytest.raises(ServerError, match="'instruction' is empty"):
        client.predict(jpeg_224(frame()), " ")


def test_sessions_expire_and_are_bounded(served_run: Path) -> None:
    from mobile_vla.serving.protocol import Observation
    from mobile_vla.serving.server import load_engine

    engine = load_engine(served_run, ServeSettings(session_ttl_s=0.2, max_sessions=2))
    obs = [Observation(frame(i, 32), "go left", f"s{i}", False) for i in range(3)]
    engine.step(obs[0])
    engine.step(obs[1])
    engine.step(obs[2])  # over the bound: the least recently used session goes
    assert list(engine.sessions) == ["s1", "s2"]
    time.sleep(0.3)
    assert not engine.reset("s1")  # idle past the TTL: gone
    assert engine.sessions == {} or list(engine.sessions) == []
    out = engine.step(obs[0])
    assert out["step"] == 1  # a fresh history


def test_serve_cli_starts_answers_and_shuts_down_gracefully(served_run: Path) -> None:
    import signal
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mobile_vla.cli",
            "serve",
            str(served_run),
            "--port",
            str(port),
        ],
        env={**os.environ, "MOBILE_VLA_API_KEY": KEY},  # a key in argv is visible in ps
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        client = PredictClient(f"http://127.0.0.1:{port}", KEY, timeout=10)
        deadline = time.time() + 60
        while True:
            try:
                assert client.health()["model_loaded"] is True
                break
            except Exception:
                assert time.time() < deadline and proc.poll() is None, "server did not start"
                time.sleep(0.3)
        assert len(client.predict(jpeg_224(frame()), "go left")["action"]) == 3
        proc.send_signal(signal.SIGTERM)
        # uvicorn finishes in-flight work, then re-raises the signal for the parent to see
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
        out = proc.stdout.read()
        assert "Shutting down" in out and "Finished server process" in out
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_non_finite_policy_output_reaches_the_robot_as_a_stop(served_run: Path) -> None:
    import torch

    live, engine = start(served_run)
    try:
        with torch.no_grad():  # weights poisoned after loading, as a corrupted file would be
            last = [m for m in engine.policy.head.out if isinstance(m, torch.nn.Linear)][-1]
            last.bias[0] = float("nan")
        body = json.dumps({"image": b64_jpeg(frame()), "instruction": "go left"}).encode()
        status, out = raw_post(live.url, "/predict", body, key=None)
        assert status == 200 and out["action"] == [0.0, 0.0, 0.0]
        assert np.isfinite(out["chunk"]).all() and "non-finite" in out["fallback"]
        with StreamClient(f"ws://127.0.0.1:{live.port}/stream") as ws:
            got = ws.infer(frame(size=64), "go around on the left")
            assert np.isfinite(got["actions"]).all() and not got["action"].any()
            assert "fallback" in got
        assert engine.nonfinite == 2
    finally:
        live.stop()


def raw_request(url: str, method: str, path: str, body: bytes | None, headers: dict) -> tuple:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    conn.request(method, path, body=body, headers=headers, encode_chunked="chunked" in str(headers))
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, resp.getheader("content-type"), data


def test_framework_errors_are_json_and_reset_checks_the_key_first(server: LiveServer) -> None:
    for method, path in (("GET", "/nowhere"), ("GET", "/predict"), ("DELETE", "/reset")):
        status, ctype, data = raw_request(server.url, method, path, None, {"X-API-Key": KEY})
        assert status in (404, 405) and ctype == "application/json", (method, path, data)
        assert "error" in json.loads(data)
    # an empty or chunked body is no way around the key
    status, _, data = raw_request(server.url, "POST", "/reset", b"", {})
    assert status == 401 and "X-API-Key" in json.loads(data)["error"]
    chunked = {"Transfer-Encoding": "chunked", "Content-Type": "application/json"}
    body = iter([json.dumps({"session_id": "default"}).encode()])
    status, _, data = raw_request(server.url, "POST", "/reset", body, chunked)
    assert status == 401
    # with the key, a chunked body names the session it resets
    good = json.dumps({"image": b64_jpeg(frame()), "instruction": "go", "session_id": "robot7"})
    assert raw_post(server.url, "/predict", good.encode())[0] == 200
    body = iter([json.dumps({"session_id": "robot7"}).encode()])
    status, _, data = raw_request(server.url, "POST", "/reset", body, {**chunked, "X-API-Key": KEY})
    assert status == 200 and json.loads(data)["session_id"] == "robot7"


def test_serve_refuses_weak_key_settings(served_run: Path, tmp_path, monkeypatch, capsys) -> None:
    from mobile_vla.cli import main

    monkeypatch.delenv("MOBILE_VLA_API_KEY", raising=False)
    assert main(["serve", str(served_run), "--host", "0.0.0.0"]) == 2
    assert "--insecure" in capsys.readouterr().err
    assert main(["serve", str(served_run), "--api-key", ""]) == 2
    assert "empty API key" in capsys.readouterr().err
    empty = tmp_path / "key"
    empty.write_text("\n")
    assert main(["serve", str(served_run), "--api-key-file", str(empty)]) == 2
    assert f"--api-key-file '{empty}' gives an empty API key" in capsys.readouterr().err
    monkeypatch.setenv("MOBILE_VLA_API_KEY", " ")
    assert main(["serve", str(served_run)]) == 2
    assert "MOBILE_VLA_API_KEY gives an empty API key" in capsys.readouterr().err
    monkeypatch.setenv("MOBILE_VLA_API_KEY", "k")
    assert main(["serve", str(served_run), "--header-timeout", "0"]) == 2
    assert "--header-timeout must be a number of seconds > 0" in capsys.readouterr().err


def test_health_without_the_key_says_only_that_the_model_is_loaded(server: LiveServer) -> None:
    assert PredictClient(server.url).health() == {"model_loaded": True}
    full = PredictClient(server.url, KEY).health()
    assert full["model"] == "srv" and "sim" in full
    with pytest.raises(Exception):  # noqa: B017 - a key in the URL is not accepted
        StreamClient(f"ws://127.0.0.1:{server.port}/stream?api_key={KEY}")


def read_reply(sock: socket.socket) -> str:
    """One whole HTTP reply: the headers, then Content-Length bytes of body (TCP may deliver
    them in separate segments)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return data.decode()
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
         if line.lower().startswith(b"content-length:")),
        0,
    )  # fmt: skip
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_a_half_sent_body_gets_408_and_the_server_keeps_serving(served_run: Path) -> None:
    live, _ = start(served_run, body_timeout_s=0.5)
    try:
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(
                b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"image": '
            )
            t0 = time.time()
            reply = read_reply(sock)
            assert time.time() - t0 < 5
        assert reply.startswith("HTTP/1.1 408") and "not complete within 0.5 s" in reply
        good = json.dumps({"image": b64_jpeg(frame()), "instruction": "go left"}).encode()
        assert raw_post(live.url, "/predict", good, key=None)[0] == 200
    finally:
        live.stop()


def test_half_sent_headers_get_408_and_the_connection_closes(served_run: Path) -> None:
    """Before the deadline protocol a connection that had sent part of its headers (new, or
    kept alive after a first request) waited for the rest forever."""
    live, _ = start(served_run, header_timeout_s=0.5)
    good = json.dumps({"image": b64_jpeg(frame()), "instruction": "go left"}).encode()
    try:
        socks = [socket.create_connection(("127.0.0.1", live.port), timeout=10) for _ in range(20)]
        for sock in socks:
            sock.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
        # meanwhile the server answers complete requests
        assert raw_post(live.url, "/predict", good, key=None)[0] == 200
        t0 = time.time()
        for sock in socks:
            reply = read_reply(sock)
            assert reply.startswith("HTTP/1.1 408") and "headers not complete within 0.5 s" in reply
            assert sock.recv(4096) == b""  # closed by the server
            sock.close()
        assert time.time() - t0 < 5
        # a kept-alive connection: one full request, then half of the next one
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /health HTTP/1.1\r\nHo")
            replies = b""
            while b"408" not in replies:
                chunk = sock.recv(4096)
                assert chunk, replies
                replies += chunk
            assert replies.startswith(b"HTTP/1.1 200") and b"model_loaded" in replies
        # a slow but complete sender (headers in three parts, within the deadline) is served
        with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
            for part in (b"GET /hea", b"lth HTTP/1.1\r\n", b"Host: x\r\n\r\n"):
                sock.sendall(part)
                time.sleep(0.1)
            assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    finally:
        live.stop()


def test_the_kept_fuzz_corpus_gets_json_4xx_never_5xx(served_run: Path) -> None:
    """Every request of ``tests/data/http_fuzz.jsonl.gz`` (281: see tests/http_fuzz.py) gets an
    answer within the deadlines, never a 5xx, and every error is JSON with ``error``."""
    from concurrent.futures import ThreadPoolExecutor

    live, _ = start(served_run, api_key=KEY, header_timeout_s=1.0, body_timeout_s=1.0)
    corpus = http_fuzz.load()
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda item: http_fuzz.send(live.port, item[1]), corpus))
        good = json.dumps({"image": b64_jpeg(frame()), "instruction": "go left"}).encode()
        assert raw_post(live.url, "/predict", good)[0] == 200
    finally:
        live.stop()
    counts = {"tried": len(corpus), "2xx": 0, "4xx": 0, "5xx": 0, "no answer": 0, "slow": 0}
    bad = []
    for (name, raw), (status, body, seconds) in zip(corpus, answers, strict=True):
        counts["slow"] += seconds > 3.0  # deadlines are 1 s; model calls take milliseconds
        if status is None:
            counts["no answer"] += 1
            bad.append((name, "no answer", body[:80]))
            continue
        counts[f"{status // 100}xx"] = counts.get(f"{status // 100}xx", 0) + 1
        if status >= 500:
            bad.append((name, status, body[:200]))
        elif status >= 400 and not raw.startswith(b"HEAD "):
            try:
                ok = isinstance(json.loads(body).get("error"), str)
            except (ValueError, AttributeError):
                ok = False
            if not ok:
                bad.append((name, status, body[:200]))
    print("fuzz corpus:", counts)
    assert not bad, bad
    assert counts["slow"] == 0 and counts["5xx"] == 0
    assert counts["2xx"] >= 5  # the good request and the valid variants were answered


@pytest.mark.serial
def test_a_robot_is_not_starved_by_hostile_clients(served_run: Path) -> None:
    """A robot ticking at 10 Hz for a fixed 3 s budget while four clients send image bombs
    (900-byte JPEGs declaring 4096 x 4096), 1024 x 1024 PNGs that must be decoded, and
    half-sent requests: it gets at least 90% of its ticks answered, each within 1 s. (When the
    server decoded images on its event loop, such a client cut a robot to 22% of its ticks.)"""
    from concurrent.futures import ThreadPoolExecutor

    live, _ = start(served_run, api_key=KEY, header_timeout_s=1.0, body_timeout_s=1.0)
    corpus = dict(http_fuzz.load())
    png = io.BytesIO()
    Image.fromarray(frame(1, 1024)).save(png, format="PNG")
    attacks = [
        corpus["image_jpeg_declares_4096"],
        http_fuzz._request(
            json.dumps(
                {"image": base64.b64encode(png.getvalue()).decode(), "instruction": "go"}
            ).encode(),
            key=KEY,
        ),
        corpus["half_headers_2"],
        corpus["half_body_1"],
    ]
    stop = threading.Event()

    def attacker(raw: bytes) -> int:
        sent = 0
        while not stop.is_set():
            http_fuzz.send(live.port, raw, timeout=5)
            sent += 1
        return sent

    client = PredictClient(live.url, api_key=KEY, timeout=1.0)
    image = jpeg_224(frame())
    answered, ticks = [], 30
    try:
        with ThreadPoolExecutor(len(attacks)) as pool:
            sent = [pool.submit(attacker, raw) for raw in attacks]
            time.sleep(0.3)
            start_t = time.perf_counter()
            for tick in range(ticks):
                t0 = time.perf_counter()
                try:
                    client.predict(image, "go around the box on the left", session_id="robot")
                    answered.append(time.perf_counter() - t0)
                except (ServerError, OSError):
                    pass
                time.sleep(max(0.0, start_t + (tick + 1) / 10 - time.perf_counter()))
            stop.set()
            attacks_sent = [f.result() for f in sent]
    finally:
        stop.set()
        live.stop()
    print(f"robot: {len(answered)}/{ticks} answered; attacks sent {attacks_sent}")
    assert sum(attacks_sent) >= 10  # the attackers really ran
    assert len(answered) >= 0.9 * ticks and max(answered) < 1.0


def test_batched_sessions_answer_as_one_by_one(served_run: Path) -> None:
    from mobile_vla.serving.protocol import Observation
    from mobile_vla.serving.server import load_engine

    seq = load_engine(served_run, ServeSettings())
    bat = load_engine(served_run, ServeSettings())
    texts = ["go around on the left", "go around on the right", "go left", "go right"]
    for t in range(6):
        obs = [
            Observation(
                frame(10 * t + k, size=48), texts[k], f"robot{k}", reset=(t == 3 and k == 1)
            )
            for k in range(4)
        ]
        if t == 4:  # robot0 twice in one batch: its second request follows its first
            obs.append(Observation(frame(99, size=48), texts[0], "robot0", reset=False))
        one = [seq.step(o) for o in obs]
        many = bat.step_many(obs)
        assert [m["batch"] for m in many[:4]] == [4] * 4
        for a, b in zip(one, many, strict=True):
            np.testing.assert_allclose(a["action"], b["action"], atol=1e-5)
            np.testing.assert_allclose(a["chunk"], b["chunk"], atol=1e-5)
            assert a["step"] == b["step"]


def test_concurrent_robots_are_batched_over_http(served_run: Path) -> None:
    live, _ = start(served_run)
    try:
        bodies = [
            json.dumps(
                {"image": b64_jpeg(frame(k)), "instruction": "go left", "session_id": f"r{k}"}
            ).encode()
            for k in range(8)
        ]
        replies: list[tuple[int, dict]] = []

        def robot(body: bytes) -> None:
            for _ in range(5):
                replies.append(raw_post(live.url, "/predict", body, key=None))

        threads = [threading.Thread(target=robot, args=(b,)) for b in bodies]
        for th in threads:
            th.start()
        for th in threads:
            th.join(timeout=60)
        assert len(replies) == 40 and all(code == 200 for code, _ in replies)
        assert max(out["batch"] for _, out in replies) > 1  # requests that waited went together
        assert sorted(out["step"] for _, out in replies) == sorted(list(range(1, 6)) * 8)
    finally:
        live.stop()


def test_inference_loads_neither_the_trainer_nor_hdf5(served_run: Path) -> None:
    """The server, the policy runtime, the closed loop and the robot client: loading a run and
    answering a frame imports neither Lightning nor h5py (a robot or a server machine need
    not have the trainer)."""
    import subprocess
    import sys

    code = f"""
import sys
import numpy as np
from mobile_vla.serving.server import ServeSettings, create_app, load_engine
from mobile_vla.serving.client import PredictClient, StreamClient
from mobile_vla.evaluation.closed_loop import closed_loop
from mobile_vla.serving.protocol import Observation
engine = load_engine({str(served_run)!r}, ServeSettings())
create_app(engine)
frame = np.zeros((48, 48, 3), np.uint8)
assert np.isfinite(engine.step(Observation(frame, "go left", "s", False))["action"]).all()
loaded = [m for m in ("lightning", "lightning.pytorch", "h5py") if m in sys.modules]
print(loaded)
sys.exit(1 if loaded else 0)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr[-2000:]


def test_obs_time_is_echoed_and_checked(server: LiveServer) -> None:
    """The robot-side queue's ``obs_time``: echoed as sent; anything but a finite number of
    seconds (an integer too large for a float included) is a 400 naming the field."""
    good = {"image": b64_jpeg(frame(4)), "instruction": "go left", "session_id": "t"}
    status, out = raw_post(server.url, "/predict", json.dumps({**good, "obs_time": 12.5}).encode())
    assert status == 200 and out["obs_time"] == 12.5 and out["decode_ms"] >= 0
    status, out = raw_post(server.url, "/predict", json.dumps(good).encode())
    assert status == 200 and "obs_time" not in out
    for bad in (10**400, "soon", True, [1]):
        body = json.dumps({**good, "obs_time": bad}).encode()
        status, out = raw_post(server.url, "/predict", body)
        assert status == 400 and "obs_time" in out["error"], (bad, status, out)
    body = json.dumps({**good}).encode()[:-1] + b', "obs_time": NaN}'
    status, out = raw_post(server.url, "/predict", body)
    assert status == 400 and "obs_time" in out["error"]
