"""The robot-facing protocol (``shared/specs/predict_api.md``): request validation, and the
msgpack encoding of numpy arrays used on the WebSocket (no pickle anywhere)."""

from __future__ import annotations

import base64
import binascii
import io
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
from PIL import Image, UnidentifiedImageError

MAX_BODY_BYTES = 8 * 1024 * 1024
MAX_INSTRUCTION_CHARS = 1000
MAX_IMAGE_SIDE = 1024  # the robot sends 224x224; ``serve --max-image-side`` raises it
IMAGE_FORMATS = ("JPEG", "PNG")
MAX_SESSION_ID_CHARS = 128


class BadRequest(Exception):
    """A request the server refuses; ``status`` is the HTTP status, the message says why."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Observation:
    image: np.ndarray  # uint8 (H, W, 3)
    instruction: str
    session_id: str
    reset: bool


def _check_utf8(text: str, field: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(
            f"field '{field}' is not valid Unicode text (it holds an unpaired surrogate)"
        ) from None


def check_instruction(value: Any, limit: int = MAX_INSTRUCTION_CHARS) -> str:
    if value is None:
        raise BadRequest("missing field 'instruction' (the instruction text)")
    if not isinstance(value, str):
        raise BadRequest(f"field 'instruction' must be a string, got {type(value).__name__}")
    text = value.strip()
    _check_utf8(text, "instruction")
    if not text:
        raise BadRequest("field 'instruction' is empty")
    if len(text) > limit:
        raise BadRequest(f"field 'instruction' has {len(text)} characters; at most {limit}")
    return text


def check_image_array(image: Any, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    if (
        not isinstance(image, np.ndarray)
        or image.dtype != np.uint8
        or image.ndim != 3
        or image.shape[2] != 3
    ):
        shape = getattr(image, "shape", None)
        dtype = getattr(image, "dtype", type(image).__name__)
        raise BadRequest(
            f"field 'image' must be a uint8 array of shape (H, W, 3), got {dtype} {shape}"
        )
    h, w = image.shape[:2]
    if h == 0 or w == 0:
        raise BadRequest(f"field 'image' is empty ({w}x{h})")
    if max(h, w) > max_side:
        raise BadRequest(f"field 'image' is {w}x{h}; at most {max_side} pixels per side")
    return image


def decode_image(b64: Any, max_side: int = MAX_IMAGE_SIDE) -> np.ndarray:
    """base64 JPEG/PNG -> uint8 (H, W, 3), refusing what is not an image or too large."""
    if b64 is None:
        raise BadRequest("missing field 'image' (a base64-encoded JPEG)")
    if not isinstance(b64, str):
        raise BadRequest(f"field 'image' must be a base64 string, got {type(b64).__name__}")
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("field 'image' is not valid base64") from None
    if not raw:
        raise BadRequest("field 'image' is empty")
    try:
        img = Image.open(io.BytesIO(raw), formats=IMAGE_FORMATS)
        w, h = img.size  # header only: the size is checked before decoding the pixels
        if w == 0 or h == 0:
            raise BadRequest(f"field 'image' is empty ({w}x{h})")
        if max(w, h) > max_side:
            raise BadRequest(f"field 'image' is {w}x{h}; at most {max_side} pixels per side")
        return np.asarray(img.convert("RGB"))
    except BadRequest:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        raise BadRequest("field 'image' is not a decodable image (expected JPEG or PNG)") from None


def check_session(value: Any) -> str:
    if value is None:
        return "default"
    if not isinstance(value, str) or not value or len(value) > MAX_SESSION_ID_CHARS:
        raise BadRequest(
            f"field 'session_id' must be a non-empty string of at most "
            f"{MAX_SESSION_ID_CHARS} characters"
        )
    _check_utf8(value, "session_id")
    return value


def check_reset(value: Any) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest("field 'reset' must be true or false")
    return value


def parse_predict(
    payload: Any, max_instruction: int = MAX_INSTRUCTION_CHARS, max_side: int = MAX_IMAGE_SIDE
) -> Observation:
    if not isinstance(payload, dict):
        raise BadRequest("the body must be a JSON object with 'image' and 'instruction'")
    if "image" not in payload:
        raise BadRequest("missing field 'image' (a base64-encoded JPEG)")
    # the cheap fields first, the image (decoding) last
    instruction = check_instruction(payload.get("instruction"), max_instruction)
    session_id = check_session(payload.get("session_id"))
    reset = check_reset(payload.get("reset"))
    return Observation(decode_image(payload["image"], max_side), instruction, session_id, reset)


# ---- msgpack with numpy arrays ------------------------------------------------------------------


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return {
            "__ndarray__": True,
            "data": obj.tobytes(),
            "dtype": obj.dtype.str,
            "shape": list(obj.shape),
        }
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot encode {type(obj).__name__}")


_ALLOWED_DTYPES = {"|u1", "<f4", "<f8", "<i4", "<i8", "|b1", "<f2"}


def _decode(obj: dict) -> Any:
    if obj.get("__ndarray__") is True:
        dtype = obj.get("dtype")
        if dtype not in _ALLOWED_DTYPES:
            raise BadRequest(f"array dtype {dtype!r} is not accepted")
        shape = obj.get("shape")
        data = obj.get("data")
        if (
            not isinstance(shape, list)
            or not all(isinstance(s, int) and s >= 0 for s in shape)
            or not isinstance(data, bytes)
        ):
            raise BadRequest("malformed array: expected 'data' bytes and a 'shape' list")
        count = int(np.prod(shape)) if shape else 1
        if count * np.dtype(dtype).itemsize != len(data):
            raise BadRequest(
                f"array data has {len(data)} bytes, shape {shape} needs "
                f"{count * np.dtype(dtype).itemsize}"
            )
        return np.frombuffer(data, dtype=dtype).reshape(shape)
    return obj


def packb(obj: Any) -> bytes:
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, object_hook=_decode, raw=False, strict_map_key=True)
    except BadRequest:
        raise
    except (
        msgpack.ExtraData,
        msgpack.FormatError,
        msgpack.StackError,
        ValueError,
        TypeError,
    ) as exc:
        raise BadRequest(f"message is not valid msgpack ({type(exc).__name__})") from None
