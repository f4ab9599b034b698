"""``mobile-vla serve``: the robot's ``/predict`` server, a drop-in replacement for the
Mobile-VLA robot node's server (``shared/specs/predict_api.md``), plus ``/reset``, ``/health``,
a msgpack WebSocket stream (``/stream``) and openpi's WebSocket policy protocol at ``/``, so robot
code written for ``openpi_client.WebsocketClientPolicy`` works unchanged.

One policy object serves every session. Each session (``session_id``; one shared session by
default) owns a :class:`PolicyController`: a ring buffer of per-frame context vectors, so a
request encodes only its new frame, and the chunk executor. Model calls run one at a time in a
worker thread behind a lock, so concurrent sessions never touch each other's history and the
event loop keeps answering. Sessions idle for ``session_ttl`` seconds are dropped.
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from mobile_vla.config import ACTION_NAMES, Config
from mobile_vla.data.commands import full_commands
from mobile_vla.models.runtime import FIRST, ChunkSpec, PolicyController, act_many
from mobile_vla.serving.protocol import (
    MAX_BODY_BYTES,
    MAX_IMAGE_SIDE,
    MAX_INSTRUCTION_CHARS,
    BadRequest,
    Observation,
    check_image_array,
    check_instruction,
    check_obs_time,
    check_reset,
    check_session,
    packb,
    packb_openpi,
    parse_openpi,
    parse_predict,
    unpackb,
)

log = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    api_key: str = ""
    max_body_bytes: int = MAX_BODY_BYTES
    max_instruction_chars: int = MAX_INSTRUCTION_CHARS
    max_image_side: int = MAX_IMAGE_SIDE
    session_ttl_s: float = 300.0
    max_sessions: int = 256
    chunk: ChunkSpec = field(default_factory=ChunkSpec)  # how a session executes chunks
    history_cache: bool = True
    max_batch: int = 16  # requests of different sessions answered by one forward pass
    body_timeout_s: float = 10.0  # a request body not complete by then gets 408
    header_timeout_s: float = 10.0  # request headers not complete by then: 408, connection closed
    openpi_image_key: str = "observation/image"  # where an openpi observation holds the frame
    openpi_prompt_key: str = "prompt"  # ... and the instruction


class Engine:
    """The policy and its sessions; every model call goes through :meth:`step`."""

    def __init__(
        self, policy: Any, cfg: Config, settings: ServeSettings, name: str = "policy"
    ) -> None:
        self.policy, self.cfg, self.settings, self.name = policy, cfg, settings, name
        self.sessions: OrderedDict[str, tuple[PolicyController, float]] = OrderedDict()
        self.lock = threading.Lock()
        self.nonfinite = 0  # replies whose policy output was NaN/inf, replaced by a stop

    def _controller(
        self, session_id: str, create: bool = True, chunk: ChunkSpec | None = None
    ) -> PolicyController | None:
        now = time.monotonic()
        ttl = self.settings.session_ttl_s
        for sid in [s for s, (_, seen) in self.sessions.items() if now - seen > ttl]:
            del self.sessions[sid]
        entry = self.sessions.get(session_id)
        if entry is None:
            if not create:
                return None
            while len(self.sessions) >= self.settings.max_sessions:
                self.sessions.popitem(last=False)  # the least recently used
            s = self.settings
            ctrl = PolicyController(
                self.policy,
                self.cfg,
                chunk or s.chunk,
                cache_features=s.history_cache,
            )
        else:
            ctrl = entry[0]
        self.sessions[session_id] = (ctrl, now)
        self.sessions.move_to_end(session_id)
        return ctrl

    def step(self, obs: Observation) -> dict[str, Any]:
        with self.lock:
            return self._step_one(obs)

    def step_many(self, batch: Sequence[Observation]) -> list[dict[str, Any]]:
        """Several requests at once: the first request of each session goes through one
        forward pass for all their frames and one for all their heads (each session keeps its
        own history); a session's second request in the same batch follows on its own, after
        its first. Replies equal :meth:`step`'s one by one, up to summation order."""
        with self.lock:
            t0 = time.perf_counter()
            seen: set[str] = set()
            together, after = [], []
            for i, obs in enumerate(batch):
                (after if obs.session_id in seen else together).append(i)
                seen.add(obs.session_id)
            results: list[dict[str, Any] | None] = [None] * len(batch)
            if self.settings.history_cache and len(together) > 1:
                ctrls = []
                for i in together:
                    ctrl = self._controller(batch[i].session_id, chunk=batch[i].chunk)
                    assert ctrl is not None
                    if batch[i].reset:
                        ctrl.reset(None)
                    ctrls.append(ctrl)
                images = [batch[i].image for i in together]
                commands = act_many(ctrls, images, [batch[i].instruction for i in together])
                for i, ctrl, command in zip(together, ctrls, commands, strict=True):
                    results[i] = self._reply(batch[i], ctrl, command, t0, len(together))
            else:
                after = sorted(together + after)
            for i in after:
                results[i] = self._step_one(batch[i])
            return [r for r in results if r is not None]

    def _step_one(self, obs: Observation) -> dict[str, Any]:
        t0 = time.perf_counter()
        ctrl = self._controller(obs.session_id, chunk=obs.chunk)
        assert ctrl is not None
        if obs.reset:
            ctrl.reset(None)
        return self._reply(obs, ctrl, ctrl.act(obs.image, obs.instruction), t0, 1)

    def _reply(
        self, obs: Observation, ctrl: PolicyController, command: np.ndarray, t0: float, batch: int
    ) -> dict[str, Any]:
        chunk = np.asarray(ctrl.last_chunk if ctrl.last_chunk is not None else [], np.float32)
        out: dict[str, Any] = {}
        if not (np.isfinite(command).all() and np.isfinite(chunk).all()):
            # a robot must never receive NaN/inf: it gets a stop command, the reply says
            # why, and the session's history (which may hold the bad values) starts over
            self.nonfinite += 1
            log.error(
                "session %s: the policy produced a non-finite action (%d so far); sent a "
                "stop command and cleared the session's history",
                obs.session_id,
                self.nonfinite,
            )
            command = np.zeros_like(command, dtype=np.float32)
            chunk = np.zeros_like(chunk)
            ctrl.reset(None)
            out["fallback"] = "non-finite policy output; stop command sent, history cleared"
        infer_ms = (time.perf_counter() - t0) * 1000
        out.update(
            {
                "action": command,
                "chunk": chunk,
                "infer_ms": infer_ms,
                "step": ctrl.steps,
                "batch": batch,
            }
        )
        return out

    def reset(self, session_id: str) -> bool:
        with self.lock:
            ctrl = self._controller(session_id, create=False)
            if ctrl is None:
                return False
            ctrl.reset(None)
            return True

    def drop(self, session_id: str) -> None:
        """Forget a session (its connection closed)."""
        with self.lock:
            self.sessions.pop(session_id, None)

    def metadata(self) -> dict[str, Any]:
        return {
            "model": self.name,
            "backbone": self.cfg.backbone.name,
            "action_names": list(ACTION_NAMES),
            "predicted_dims": list(self.policy.action_dims),
            "chunk_length": self.cfg.data.fwd_pred_next_n,
            "window_size": self.cfg.data.window_size,
            "image_size": list(self.cfg.data.image_size),
            "chunk_mode": self.settings.chunk.mode,
            "history_cache": self.settings.history_cache,
        }


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def given_key(headers: Any) -> str | None:
    """The key a request carries: ``X-API-Key: <key>``, or ``Authorization: Api-Key <key>``
    (openpi's client); never from the URL, which lands in access logs."""
    key = headers.get("x-api-key")
    if key is not None:
        return key
    scheme, _, value = (headers.get("authorization") or "").strip().partition(" ")
    return value.strip() if scheme.lower() == "api-key" and value.strip() else None


def _authorised(settings: ServeSettings, given: str | None) -> bool:
    if not settings.api_key:
        return True
    return given is not None and hmac.compare_digest(given.encode(), settings.api_key.encode())


def parse_json(body: bytes) -> Any:
    """JSON that Python can parse and a reply can echo: nesting deeper than the parser's
    recursion limit, integers over Python's 4,300-digit limit and unpaired surrogates are
    refused as bad requests, not 500s."""
    try:
        payload = json.loads(body)
    except RecursionError:
        raise BadRequest("the body's JSON is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, huge integers
        detail = str(exc).splitlines()[0][:120]
        raise BadRequest(f"the body is not valid JSON ({detail})") from None
    return payload


async def _read_body(request: Request, limit: int, timeout: float = 10.0) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BadRequest(f"request body is {int(declared)} bytes; at most {limit}", 413)
    body = bytearray()

    async def read() -> None:
        async for chunk in request.stream():
            body.extend(chunk)
            if len(body) > limit:
                raise BadRequest(f"request body is over {limit} bytes", 413)

    try:
        await asyncio.wait_for(read(), timeout)
    except asyncio.TimeoutError:
        raise BadRequest(f"the request body was not complete within {timeout:g} s", 408) from None
    except ClientDisconnect:  # nobody is left to answer; not a server error to log
        raise BadRequest("the client closed the connection before the body was complete") from None
    return bytes(body)


class FrameBatcher:
    """Requests wait in ``pending`` while the model is busy; one drain task answers everything
    that waited (up to ``max_batch``) with one :meth:`Engine.step_many` call, so N robots cost
    about one forward pass of N frames per cycle instead of N forward passes."""

    def __init__(self, engine: Engine, max_batch: int) -> None:
        self.engine, self.max_batch = engine, max(1, max_batch)
        self.pending: list[tuple[Observation, asyncio.Future]] = []
        self.task: asyncio.Task | None = None

    async def infer(self, obs: Observation) -> dict[str, Any]:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((obs, fut))
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._drain())
        return await fut

    async def _drain(self) -> None:
        while self.pending:
            batch = self.pending[: self.max_batch]
            del self.pending[: len(batch)]
            try:
                outs = await run_in_threadpool(self.engine.step_many, [o for o, _ in batch])
            except Exception as exc:
                for _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                continue
            for (_, fut), out in zip(batch, outs, strict=True):
                if not fut.done():
                    fut.set_result(out)


def _unpack_message(data: bytes, s: ServeSettings) -> Any:
    """A WebSocket message within the body limit, unpacked (either msgpack spelling)."""
    if len(data) > s.max_body_bytes:
        raise BadRequest(f"message is {len(data)} bytes; at most {s.max_body_bytes}", 413)
    return unpackb(data)


def _ws_observation(data: bytes, s: ServeSettings, default_session: str) -> Observation:
    """One WebSocket message (msgpack map) -> an observation, or BadRequest."""
    msg = _unpack_message(data, s)
    if not isinstance(msg, dict):
        raise BadRequest("message must be a map with 'image' and 'instruction'")
    return Observation(
        image=check_image_array(msg.get("image"), s.max_image_side),
        instruction=check_instruction(msg.get("instruction"), s.max_instruction_chars),
        session_id=check_session(msg.get("session_id", default_session)),
        reset=check_reset(msg.get("reset")),
    )


def _openpi_observation(data: bytes, s: ServeSettings, session_id: str) -> Observation:
    """One openpi message (msgpack, openpi's numpy encoding) -> an observation, or BadRequest."""
    obs = parse_openpi(
        _unpack_message(data, s),
        s.openpi_image_key,
        s.openpi_prompt_key,
        session_id,
        s.max_instruction_chars,
        s.max_image_side,
    )
    obs.chunk = FIRST  # a fresh chunk every call: the robot executes it (its broker)
    return obs


def _fallback(out: dict[str, Any]) -> dict[str, Any]:
    return {"fallback": out["fallback"]} if "fallback" in out else {}


class _Endpoints:
    """The server's endpoints over one engine: every one that changes state checks the key
    before it reads the body."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.s = engine, engine.settings
        self.batcher = FrameBatcher(engine, self.s.max_batch)
        self.ws_ids = itertools.count()

    async def _read_json(self, request: Request) -> Any:
        if not _authorised(self.s, given_key(request.headers)):
            raise BadRequest(
                "missing or wrong key (an X-API-Key or Authorization: Api-Key header)", 401
            )
        body = await _read_body(request, self.s.max_body_bytes, self.s.body_timeout_s)
        return parse_json(body) if body else {}

    async def predict(self, request: Request) -> JSONResponse:
        t0 = time.perf_counter()
        s = self.s
        try:
            payload = await self._read_json(request)
            # decoding runs in a worker thread: a slow image never stalls the event loop
            t_decode = time.perf_counter()
            obs = await run_in_threadpool(
                parse_predict, payload, s.max_instruction_chars, s.max_image_side
            )
            decode_ms = (time.perf_counter() - t_decode) * 1000
        except BadRequest as exc:
            return _error(str(exc), exc.status)
        try:
            obs_time = check_obs_time(payload.get("obs_time"))
        except BadRequest as exc:
            return _error(str(exc), exc.status)
        out = await self.batcher.infer(obs)
        echo = {} if obs_time is None else {"obs_time": obs_time}
        return JSONResponse(
            {
                **echo,
                "action": [float(v) for v in out["action"]],
                "chunk": np.asarray(out["chunk"]).round(6).tolist(),
                "session_id": obs.session_id,
                "step": out["step"],
                "infer_ms": out["infer_ms"],
                "decode_ms": decode_ms,
                "batch": out["batch"],
                "latency_ms": (time.perf_counter() - t0) * 1000,
                **_fallback(out),
            }
        )

    async def reset(self, request: Request) -> JSONResponse:
        try:
            payload = await self._read_json(request)  # the key first, whatever the body
            if not isinstance(payload, dict):
                raise BadRequest("the body must be a JSON object")
            sid = check_session(payload.get("session_id"))
        except BadRequest as exc:
            return _error(str(exc), exc.status)
        if not await run_in_threadpool(self.engine.reset, sid):
            return _error(f"unknown session_id {sid!r}", 404)
        return JSONResponse({"session_id": sid, "reset": True})

    async def healthz(self, request: Request) -> PlainTextResponse:
        """openpi's liveness probe: 200 ``OK`` once the model is loaded."""
        return PlainTextResponse("OK")

    def openpi_metadata(self) -> dict[str, Any]:
        return {
            **self.engine.metadata(),
            "protocol": "openpi",
            "action_columns": list(ACTION_NAMES),  # the columns of every reply's "actions"
            "action_horizon": self.engine.cfg.data.fwd_pred_next_n,
            "image_key": self.s.openpi_image_key,
            "prompt_key": self.s.openpi_prompt_key,
        }

    async def openpi(self, ws: WebSocket) -> None:
        """openpi's policy protocol (``openpi_client.websocket_client_policy``): the metadata
        first, then one reply per observation, ``{"actions": float32 (chunk, 3), "server_timing":
        {...}}``, in openpi's msgpack numpy encoding. Each connection is a session with its own
        history (an observation may carry ``reset: true`` to start over). Bad input gets a text
        frame, which openpi's client raises as an error; the connection stays open."""
        if not _authorised(self.s, given_key(ws.headers)):
            await ws.close(code=1008, reason="missing or wrong key")
            return
        await ws.accept()
        session = f"openpi-{next(self.ws_ids)}"
        await ws.send_bytes(packb_openpi(self.openpi_metadata()))
        dims = self.engine.policy.action_dims
        prev_total_ms: float | None = None
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                t0 = time.perf_counter()
                data = message.get("bytes")
                try:
                    if data is None:
                        raise BadRequest("send binary msgpack messages (openpi's msgpack_numpy)")
                    obs = await run_in_threadpool(_openpi_observation, data, self.s, session)
                except BadRequest as exc:
                    await ws.send_text(f"error {exc.status}: {exc}")
                    continue
                out = await self.batcher.infer(obs)
                timing = {"infer_ms": out["infer_ms"]}
                if prev_total_ms is not None:
                    timing["prev_total_ms"] = prev_total_ms
                reply = {
                    "actions": full_commands(out["chunk"], dims),
                    "session_id": session,
                    "step": out["step"],
                    "server_timing": timing,
                    **_fallback(out),
                }
                await ws.send_bytes(packb_openpi(reply))
                prev_total_ms = (time.perf_counter() - t0) * 1000
        except WebSocketDisconnect:
            return
        finally:
            await run_in_threadpool(self.engine.drop, session)

    async def health(self, request: Request) -> JSONResponse:
        if self.s.api_key and not _authorised(self.s, given_key(request.headers)):
            return JSONResponse({"model_loaded": True})  # the rest is behind the key
        return JSONResponse(
            {
                "model_loaded": True,
                "sessions": len(self.engine.sessions),
                **self.engine.metadata(),
                "sim": asdict(self.engine.cfg.sim),
            }
        )

    async def stream(self, ws: WebSocket) -> None:
        if not _authorised(self.s, given_key(ws.headers)):
            await ws.close(code=1008, reason="missing or wrong key")
            return
        await ws.accept()
        default_session = f"ws-{next(self.ws_ids)}"
        await ws.send_bytes(packb({"type": "metadata", **self.engine.metadata()}))
        try:
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                data = message.get("bytes")
                if data is None:
                    await ws.send_bytes(
                        packb({"error": "send binary msgpack messages", "status": 400})
                    )
                    continue
                try:
                    obs = _ws_observation(data, self.s, default_session)
                except BadRequest as exc:
                    await ws.send_bytes(packb({"error": str(exc), "status": exc.status}))
                    continue
                out = await self.batcher.infer(obs)
                reply = {
                    "actions": np.asarray(out["chunk"], np.float32),
                    "action": np.asarray(out["action"], np.float32),
                    "session_id": obs.session_id,
                    "server_timing": {"infer_ms": out["infer_ms"]},
                    **_fallback(out),
                }
                await ws.send_bytes(packb(reply))
        except WebSocketDisconnect:
            return


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    status = getattr(exc, "status_code", 500)
    detail = getattr(exc, "detail", None) or "internal error"
    return _error(str(detail), status)


async def _server_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error on %s", request.url.path)
    return _error(f"internal error ({type(exc).__name__})", 500)


def create_app(engine: Engine) -> Starlette:
    """The Starlette app: ``/predict``, ``/reset``, ``/health``, the ``/stream`` WebSocket and
    openpi's protocol at ``/`` (and its ``/healthz``); every HTTP error a JSON
    ``{"error": ...}``."""
    api = _Endpoints(engine)
    return Starlette(
        exception_handlers={HTTPException: _http_error, Exception: _server_error},
        routes=[
            Route("/predict", api.predict, methods=["POST"]),
            Route("/reset", api.reset, methods=["POST"]),
            Route("/health", api.health, methods=["GET"]),
            WebSocketRoute("/stream", api.stream),
            WebSocketRoute("/", api.openpi),
            Route("/healthz", api.healthz, methods=["GET"]),
        ],
    )


def load_engine(
    run: str | Path, settings: ServeSettings, device: str = "cpu", which: str = "best"
) -> Engine:
    from mobile_vla.training.runs import load_policy

    policy, cfg = load_policy(run, which)
    policy.to(device)
    return Engine(policy, cfg, settings, name=Path(run).name)


def header_deadline_protocol(timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline on each request's headers.

    uvicorn times out idle keep-alive connections, but once a client has sent part of a
    request line or headers it waits for the rest forever, so a few hundred half-sent requests
    hold a few hundred sockets open (the body has its own deadline, ``body_timeout_s``). Here a
    connection waiting for headers (a new one, or a kept-alive one that has started its next
    request) gets ``timeout_s`` seconds to complete them; then it is answered 408 and closed.
    A request that is not HTTP at all gets uvicorn's 400, with a JSON body like every other
    error of this server (uvicorn's is plain text).
    """
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    body = json.dumps({"error": f"request headers not complete within {timeout_s:g} s"}).encode()
    reply = (
        b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(body)}\r\nconnection: close\r\n\r\n".encode()
        + body
    )

    class HeaderDeadlineProtocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def send_400_response(self, msg: str) -> None:
            data = json.dumps({"error": f"not a valid HTTP request: {msg}"}).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(data)).encode()),
                (b"connection", b"close"),
            ]
            try:
                self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers)))
                self.transport.write(self.conn.send(h11.Data(data=data)))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:  # a response had already started: just close
                pass
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._deadline is None and self.conn.their_state is h11.IDLE:
                self._arm()  # a kept-alive connection starts its next request
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:
                self._disarm()  # headers complete: the body deadline takes over

        def on_response_complete(self) -> None:
            super().on_response_complete()
            # a pipelined next request whose headers are already partly buffered
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._deadline = self.loop.call_later(timeout_s, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _expired(self) -> None:
            self._deadline = None
            if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
                self.transport.write(reply)
                self.transport.close()

    return HeaderDeadlineProtocol


def uvicorn_config(engine: Engine, host: str, port: int, **kwargs: Any) -> Any:
    """The uvicorn configuration ``serve`` runs (tests run the same one on a loopback port)."""
    import uvicorn

    return uvicorn.Config(
        create_app(engine),
        host=host,
        port=port,
        http=header_deadline_protocol(engine.settings.header_timeout_s),
        **kwargs,
    )


def serve(engine: Engine, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Run until SIGINT/SIGTERM; uvicorn finishes the requests in flight before exiting."""
    import uvicorn

    config = uvicorn_config(engine, host, port, log_level="info", timeout_graceful_shutdown=5)
    asyncio.run(uvicorn.Server(config).serve())
