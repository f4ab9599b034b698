"""The robot-facing protocol (``shared/specs/predict_api.md``): request validation, and the
msgpack encoding of numpy arrays used on the WebSocket (no pickle anywhere)."""

from __future__ import annotations

import base64
import binascii
import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
from PIL import Image, UnidentifiedImageError

if TYPE_CHECKING:  # the robot client imports this module: no torch at run time
    from mobile_vla.models.runtime import ChunkSpec

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
    chunk: ChunkSpec | None = None  # None: the server's (openpi's clients execute whole chunks)


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


def check_obs_time(value: Any) -> float | None:
    """The optional ``obs_time``: when the frame was taken on the robot's clock (seconds); the
    reply echoes it, so the robot knows which times the chunk's actions are for."""
    if value is None:
        return None
    bad = BadRequest(f"field 'obs_time' must be a finite number of seconds, got {value!r:.40}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise bad
    try:
        seconds = float(value)  # an integer of hundreds of digits overflows
    except OverflowError:
        raise bad from None
    if not np.isfinite(seconds):
        raise bad
    return seconds


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


def lookup(message: dict, key: str) -> Any:
    """``message[key]``, or the nested path ``a/b`` (``message["a"]["b"]``) when the flat key is
    absent; None when neither is there."""
    if key in message:
        return message[key]
    node: Any = message
    for part in key.split("/"):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def parse_openpi(
    message: Any,
    image_key: str,
    prompt_key: str,
    session_id: str,
    max_instruction: int = MAX_INSTRUCTION_CHARS,
    max_side: int = MAX_IMAGE_SIDE,
) -> Observation:
    """An openpi observation (``WebsocketClientPolicy.infer(obs)``) -> an observation: the camera
    frame under ``image_key`` (uint8, H x W x 3 or 3 x H x W, as openpi's examples send it), the
    instruction under ``prompt_key``, and an optional ``reset`` flag."""
    if not isinstance(message, dict):
        raise BadRequest(
            f"the observation must be a map with '{image_key}' and '{prompt_key}', "
            f"got {type(message).__name__}"
        )
    image = lookup(message, image_key)
    if image is None:
        keys = sorted(str(k) for k in message)[:12]
        raise BadRequest(
            f"missing '{image_key}' (the camera frame, uint8 H x W x 3); the observation has "
            f"{keys}. The server's --openpi-image-key names the key it reads"
        )
    prompt = lookup(message, prompt_key)
    if prompt is None:
        raise BadRequest(
            f"missing '{prompt_key}' (the instruction text); the server's --openpi-prompt-key "
            "names the key it reads"
        )
    if (
        isinstance(image, np.ndarray)
        and image.ndim == 3
        and image.shape[0] == 3
        and image.shape[2] != 3
    ):
        image = np.ascontiguousarray(image.transpose(1, 2, 0))  # 3 x H x W -> H x W x 3
    try:
        image = check_image_array(image, max_side)
        text = check_instruction(prompt, max_instruction)
    except BadRequest as exc:  # name the key the robot sent, not the /stream field
        message_text = str(exc).replace("field 'image'", f"'{image_key}'")
        raise BadRequest(message_text.replace("field 'instruction'", f"'{prompt_key}'")) from None
    return Observation(image, text, session_id, check_reset(message.get("reset")))


# ---- msgpack with numpy arrays ------------------------------------------------------------------
# Two spellings of one encoding: ``/stream`` writes the marker keys as text
# (``{"__ndarray__": true, ...}``, shared/specs/predict_api.md); openpi's ``msgpack_numpy`` (the
# ``/`` endpoint) writes them as bytes (``{b"__ndarray__": true, ...}``) and scalars as
# ``{b"__npgeneric__": true, ...}``. Both are read everywhere; each endpoint answers in its own.


def _array_encoder(key: Callable[[str], Any]) -> Callable[[Any], Any]:
    """msgpack's ``default`` for numpy values, its marker keys spelled by ``key`` (``str``:
    ``/stream``'s; ``str.encode``: openpi's)."""

    def encode(obj: Any) -> Any:
        if isinstance(obj, np.ndarray):
            fields = ("__ndarray__", "data", "dtype", "shape")
            values = (True, obj.tobytes(), obj.dtype.str, list(obj.shape))
            return {key(k): v for k, v in zip(fields, values, strict=True)}
        if isinstance(obj, np.generic):
            return obj.item()
        raise TypeError(f"cannot encode {type(obj).__name__}")

    return encode


_encode = _array_encoder(str)
_encode_openpi = _array_encoder(str.encode)


_ALLOWED_DTYPES = {"|u1", "<f4", "<f8", "<i4", "<i8", "|b1", "<f2"}
_MARKERS = {b"__ndarray__": "__ndarray__", b"__npgeneric__": "__npgeneric__"}
_FIELDS = {b"data": "data", b"dtype": "dtype", b"shape": "shape"}


def _check_dtype(dtype: Any) -> str:
    if isinstance(dtype, bytes):
        dtype = dtype.decode("ascii", "replace")
    if dtype not in _ALLOWED_DTYPES:
        raise BadRequest(
            f"array dtype {dtype!r} is not accepted (one of {sorted(_ALLOWED_DTYPES)})"
        )
    return dtype


def _decode(obj: dict) -> Any:
    if any(k in obj for k in _MARKERS):  # openpi's spelling: bytes keys
        obj = {_MARKERS.get(k, _FIELDS.get(k, k)): v for k, v in obj.items()}
    if obj.get("__npgeneric__") is True:
        dtype = _check_dtype(obj.get("dtype"))
        value = obj.get("data")
        if not isinstance(value, (bool, int, float)):
            raise BadRequest("malformed scalar: expected a number in 'data'")
        return np.dtype(dtype).type(value).item()
    if obj.get("__ndarray__") is True:
        dtype = _check_dtype(obj.get("dtype"))
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
    """msgpack with numpy arrays in ``/stream``'s spelling (text marker keys)."""
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def packb_openpi(obj: Any) -> bytes:
    """msgpack with numpy arrays in openpi's spelling (``openpi_client.msgpack_numpy``)."""
    return msgpack.packb(obj, default=_encode_openpi, use_bin_type=True)


def unpackb(data: bytes) -> Any:
    """Either spelling back to Python and numpy; anything else is a :class:`BadRequest`."""
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
        OverflowError,
    ) as exc:
        raise BadRequest(f"message is not valid msgpack ({type(exc).__name__})") from None
