"""Clients of the policy server, and driving the simulator through it as the robot would.

client = PredictClient("http://127.0.0.1:8000", api_key="...")
client.predict(jpeg_bytes, "Navigate to the gray basket on the left")["action"]

with StreamClient("ws://127.0.0.1:8000/stream") as stream:
    stream.metadata; stream.infer(image_uint8, instruction)["actions"]
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
import uuid
from typing import Any

import numpy as np
from PIL import Image

from mobile_vla.data.images import resize_frames
from mobile_vla.errors import MobileVLAError
from mobile_vla.serving.protocol import packb, unpackb


class ServerError(MobileVLAError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"server answered {status}: {message}")
        self.status = status


def jpeg_224(image: np.ndarray, quality: int = 90) -> bytes:
    """The robot node's encoding: resize to 224x224, JPEG."""
    buf = io.BytesIO()
    Image.fromarray(resize_frames(image[None], (224, 224))[0]).save(
        buf, format="JPEG", quality=quality
    )
    return buf.getvalue()  # decoded, these are exactly the pixels of robot_camera(image)


class PredictClient:
    """HTTP client of ``/predict``, ``/reset`` and ``/health`` (standard library only)."""

    def __init__(self, url: str, api_key: str = "", timeout: float = 1.0) -> None:
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout

    def _request(self, path: str, payload: dict | None = None) -> dict[str, Any]:
        data = None if payload is None else json.dumps(payload).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method="GET" if data is None else "POST"
        )
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("X-API-Key", self.api_key)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (json.JSONDecodeError, AttributeError):
                message = str(exc.reason)
            raise ServerError(exc.code, message) from None
        except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
            raise MobileVLAError(f"cannot reach the policy server at {self.url} ({exc})") from None

    def predict(
        self,
        jpeg: bytes,
        instruction: str,
        session_id: str | None = None,
        reset: bool = False,
        obs_time: float | None = None,
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {
            "image": base64.b64encode(jpeg).decode(),
            "instruction": instruction,
        }
        if session_id is not None:
            payload["session_id"] = session_id
        if reset:
            payload["reset"] = True
        if obs_time is not None:
            payload["obs_time"] = obs_time
        return self._request("/predict", payload)

    def predict_timed(
        self, image: np.ndarray, instruction: str, session_id: str, reset: bool, obs_time: float
    ) -> dict[str, Any]:
        """The robot's request for a frame taken at ``obs_time`` (a transport of
        :mod:`mobile_vla.serving.execution`): resized to 224 x 224, JPEG, POSTed."""
        return self.predict(jpeg_224(image), instruction, session_id, reset, obs_time)

    def reset(self, session_id: str = "default") -> dict[str, Any]:
        return self._request("/reset", {"session_id": session_id})

    def health(self) -> dict[str, Any]:
        return self._request("/health")


class StreamClient:
    """WebSocket + msgpack client of ``/stream``."""

    def __init__(self, url: str, api_key: str = "", timeout: float = 5.0) -> None:
        from websockets.sync.client import connect

        headers = {"X-API-Key": api_key} if api_key else None
        self._connection = connect(
            url, additional_headers=headers, open_timeout=timeout, max_size=2**24
        )
        self.ws = self._connection.__enter__()
        self.metadata = unpackb(self.ws.recv(timeout))

    def infer(self, image: np.ndarray, instruction: str, **extra: Any) -> dict[str, Any]:
        self.ws.send(packb({"image": image, "instruction": instruction, **extra}))
        return unpackb(self.ws.recv())

    def send_raw(self, data: bytes | str) -> dict[str, Any]:
        self.ws.send(data)
        return unpackb(self.ws.recv())

    def close(self) -> None:
        self._connection.__exit__(None, None, None)

    def __enter__(self) -> StreamClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RemoteController:
    """Drives the simulator through the server exactly as the robot does: each camera frame
    is resized to 224x224, JPEG-encoded and POSTed; ``action[0:3]`` is executed. Each episode
    uses a fresh session."""

    def __init__(self, client: PredictClient, pace_hz: float = 0.0) -> None:
        self.client, self.pace_hz = client, pace_hz
        self.session = ""
        self.first = True
        self.latencies_ms: list[float] = []
        self._last = 0.0

    def reset(self, scenario: Any) -> None:
        self.session = uuid.uuid4().hex
        self.first = True

    def act(self, image: np.ndarray, instruction: str) -> np.ndarray:
        if self.pace_hz > 0:
            wait = self._last + 1.0 / self.pace_hz - time.perf_counter()
            if wait > 0:
                time.sleep(wait)
            self._last = time.perf_counter()
        t0 = time.perf_counter()
        out = self.client.predict(jpeg_224(image), instruction, self.session, reset=self.first)
        self.latencies_ms.append((time.perf_counter() - t0) * 1000)
        self.first = False
        action = np.zeros(3, np.float32)
        values = np.asarray(out["action"], np.float32)[:3]
        action[: len(values)] = values
        return action
