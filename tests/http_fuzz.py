"""The kept HTTP fuzz corpus of the robot server: how it is made, sent and judged.

``tests/data/http_fuzz.jsonl.gz`` holds raw requests (bytes as sent on the socket, base64),
each with a name saying what was fuzzed: mutated and truncated bodies, wrong JSON types for
every field, deep nesting, huge integers, NaN literals, images that are not what they claim,
bad and conflicting headers, garbage request lines, other methods and paths, half-sent
headers and bodies, and ``/reset`` variants. The corpus is kept (not drawn anew on each run) so
that a failure names a request that can be replayed; ``python -m tests.http_fuzz`` rewrites it
from the same seed after a change of the protocol.

The invariants checked for every request (``test_serving.py``): an answer (never a silent
close), never a 5xx, a JSON body with ``error`` for every 4xx, within the server's deadlines;
and the server answers a good request afterwards.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import io
import json
import socket
import time
from pathlib import Path

import numpy as np
from PIL import Image

CORPUS = Path(__file__).parent / "data" / "http_fuzz.jsonl.gz"
KEY = "s3cret-key"  # the key the corpus's authorised requests carry


def _jpeg(size: tuple[int, int] = (32, 32), mode: str = "RGB", seed: int = 0) -> bytes:
    w, h = size  # a smooth picture, so that big ones stay small in the kept corpus
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([x * 255 // max(w, 1), y * 255 // max(h, 1), (x + y + seed) % 256], -1)
    arr = arr.astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG")
    return buf.getvalue()


def _png(size: tuple[int, int], mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="PNG")
    return buf.getvalue()


def _request(
    body: bytes,
    path: str = "/predict",
    method: str = "POST",
    key: str | None = KEY,
    headers: list[tuple[str, str]] | None = None,
    content_length: int | None = None,
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    if headers is None:
        headers = [("Content-Type", "application/json")]
    lines += [f"{k}: {v}" for k, v in headers]
    if key is not None:
        lines.append(f"X-API-Key: {key}")
    if content_length is not None or body:
        lines.append(f"Content-Length: {len(body) if content_length is None else content_length}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _json(obj: object) -> bytes:
    return json.dumps(obj).encode()


def build(seed: int = 0) -> list[tuple[str, bytes]]:
    """The corpus: (name, raw request bytes), a pure function of ``seed``."""
    rng = np.random.default_rng(seed)
    image = base64.b64encode(_jpeg()).decode()
    good = {"image": image, "instruction": "go around the box on the left"}
    good_body = _json(good)
    out: list[tuple[str, bytes]] = [("good", _request(good_body))]

    for i in range(60):  # flipped bytes anywhere in a valid body
        b = bytearray(good_body)
        for _ in range(int(rng.integers(1, 6))):
            b[int(rng.integers(len(b)))] = int(rng.integers(256))
        out.append((f"flipped_body_{i}", _request(bytes(b))))
    for i in range(30):  # truncated bodies, declared as what was sent
        cut = int(rng.integers(0, len(good_body)))
        out.append((f"truncated_body_{i}", _request(good_body[:cut], content_length=cut)))

    weird: list[object] = [
        None, True, 0, -1, 2**70, 1.5, "", "x" * 5000, [], [1, 2], {}, {"a": {"b": [None]}},
        "\u0000", "\u202e\u200b", "🤖" * 50, ["go", "left"], -0.0,
    ]  # fmt: skip
    for field in ("image", "instruction", "session_id", "reset"):
        for j, value in enumerate(weird):
            body = dict(good, **{field: value})
            out.append((f"type_{field}_{j}", _request(_json(body))))
    for j, value in enumerate(weird):
        out.append((f"top_level_{j}", _request(_json(value))))
    out.append(("missing_image", _request(_json({"instruction": "go"}))))
    out.append(("missing_instruction", _request(_json({"image": image}))))
    out.append(("extra_keys", _request(_json(dict(good, extra=[1] * 100, nested={"x": 1})))))
    out.append(("control_chars", _request(_json(dict(good, instruction="go\x00\x07\x1b left")))))
    out.append(("nan_literal", _request(good_body[:-1] + b', "reset": NaN}')))
    out.append(("infinity_literal", _request(good_body[:-1] + b', "x": -Infinity}')))
    out.append(("duplicate_keys", _request(good_body[:-1] + b', "image": 5}')))
    out.append(
        (
            "lone_surrogate",
            _request(b'{"image": "' + image.encode() + b'", "instruction": "\\udfff"}'),
        )
    )
    out.append(("latin1_body", _request('{"image": "é", "instruction": "ü"}'.encode("latin-1"))))
    out.append(("utf16_body", _request(json.dumps(good).encode("utf-16"))))
    for depth in (10, 100, 1_000, 10_000, 100_000):
        out.append((f"deep_list_{depth}", _request(b"[" * depth + b"]" * depth)))
        out.append((f"deep_object_{depth}", _request(b'{"a":' * depth + b"1" + b"}" * depth)))
    for digits in (10, 100, 4_300, 4_301, 10_000):
        out.append(
            (f"big_int_{digits}", _request(good_body[:-1] + b', "n": ' + b"9" * digits + b"}"))
        )

    images = {
        "random_bytes": rng.integers(0, 256, 300, dtype=np.uint8).tobytes(),
        "empty": b"",
        "png_1x1": _png((1, 1)),
        "png_1x2000": _png((1, 2000)),
        "png_grey": _png((64, 64), "L"),
        "png_rgba": _png((64, 64), "RGBA"),
        "png_16bit": _png((64, 64), "I;16"),
        "png_palette": _png((64, 64), "P"),
        "jpeg_grey": _jpeg(mode="L"),
        "jpeg_cmyk": _jpeg(mode="CMYK"),
        "jpeg_truncated": _jpeg()[:200],
        "jpeg_224": _jpeg((224, 224)),
        "jpeg_1024": _jpeg((1024, 1024)),
        "gif": b"GIF89a" + bytes(20),
        "bmp": b"BM" + bytes(60),
    }
    # a JPEG whose header declares 4096 x 4096 (an image bomb that costs 900 bytes to send)
    small = bytearray(_jpeg((8, 8)))
    sof = small.index(b"\xff\xc0")
    small[sof + 5 : sof + 9] = (4096).to_bytes(2, "big") * 2
    images["jpeg_declares_4096"] = bytes(small)
    for name, raw in images.items():
        body = _json(dict(good, image=base64.b64encode(raw).decode()))
        out.append((f"image_{name}", _request(body)))
    out.append(("image_not_base64", _request(_json(dict(good, image="%%%not base64%%%")))))
    out.append(
        ("image_data_url", _request(_json(dict(good, image="data:image/jpeg;base64," + image))))
    )

    heads: dict[str, bytes] = {
        "no_key": _request(good_body, key=None),
        "wrong_key": _request(good_body, key="wrong"),
        "latin1_key": _request(good_body, key="schlüssel"),
        "empty_key": _request(good_body, key=""),
        "text_plain": _request(good_body, headers=[("Content-Type", "text/plain")]),
        "no_content_type": _request(good_body, headers=[]),
        "length_negative": _request(good_body, content_length=-5),
        "length_not_a_number": _request(good_body[:0]).replace(
            b"Connection", b"Content-Length: ten\r\nConnection"
        ),
        "length_twice_differs": _request(good_body).replace(
            b"Connection", b"Content-Length: 3\r\nConnection"
        ),
        "length_and_chunked": _request(good_body).replace(
            b"Connection", b"Transfer-Encoding: chunked\r\nConnection"
        ),
        "chunked_bad_size": _request(
            b"zz\r\nabc\r\n0\r\n\r\n", headers=[("Transfer-Encoding", "chunked")]
        ),
        "chunked_good": _request(
            f"{len(good_body):x}\r\n".encode() + good_body + b"\r\n0\r\n\r\n",
            headers=[("Content-Type", "application/json"), ("Transfer-Encoding", "chunked")],
        ),
        "header_100kb": _request(good_body, headers=[("X-Junk", "a" * 100_000)]),
        "header_no_colon": _request(good_body).replace(b"Connection", b"Nonsense\r\nConnection"),
        "header_space_name": _request(good_body).replace(
            b"Connection", b"Bad Name: 1\r\nConnection"
        ),
        "body_over_8_mib": _request(b" " * (8 * 2**20 + 10)),
        "length_over_8_mib": _request(b"", content_length=9 * 2**20),
    }
    out += [(f"header_{k}", v) for k, v in heads.items()]

    lines = {
        "garbage": rng.integers(0, 256, 64, dtype=np.uint8).tobytes() + b"\r\n\r\n",
        "hello": b"HELLO\r\n\r\n",
        "http2_preface": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
        "tls_client_hello": bytes.fromhex("160301002001000100") + bytes(30) + b"\r\n\r\n",
        "http_0_9": b"GET /health\r\n\r\n",
        "version_9": b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n",
        "no_host": b"GET /health HTTP/1.1\r\n\r\n",
        "lf_only": b"GET /health HTTP/1.1\nHost: x\n\n",
        "long_path": b"GET /" + b"a" * 70_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        "nul_in_path": b"GET /he\x00alth HTTP/1.1\r\nHost: x\r\n\r\n",
    }
    out += [(f"line_{k}", v) for k, v in lines.items()]
    for method in ("GET", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO"):
        out.append((f"method_{method}_predict", _request(good_body, method=method)))
    for path in ("/", "/predict/", "/predict?x=1", "/../health", "/%2e%2e/health", "/%00",
                 "/health?" + "a" * 5000, "//predict", "/stream", "/reset/x"):  # fmt: skip
        out.append((f"path_{path[:20]}", _request(good_body, path=path)))

    resets: dict[str, bytes] = {
        "empty": _request(b"", path="/reset"),
        "empty_no_key": _request(b"", path="/reset", key=None),
        "unknown_session": _request(_json({"session_id": "nobody"}), path="/reset"),
        "session_int": _request(_json({"session_id": 7}), path="/reset"),
        "session_list": _request(_json({"session_id": ["a"]}), path="/reset"),
        "not_json": _request(b"{{{", path="/reset"),
        "chunked_no_key": _request(
            b"0\r\n\r\n", path="/reset", key=None, headers=[("Transfer-Encoding", "chunked")]
        ),
        "chunked_session": _request(
            b'17\r\n{"session_id": "nobody"}\r\n0\r\n\r\n',
            path="/reset",
            headers=[("Transfer-Encoding", "chunked")],
        ),
        "deep": _request(b"[" * 10_000 + b"]" * 10_000, path="/reset"),
        "get": _request(b"", path="/reset", method="GET"),
    }
    out += [(f"reset_{k}", v) for k, v in resets.items()]

    # half-sent: headers cut short, or a body shorter than its Content-Length
    full = _request(good_body)
    for i, cut in enumerate((3, 20, 40, full.index(b"\r\n\r\n"))):
        out.append((f"half_headers_{i}", full[:cut]))
    for i, cut in enumerate((0, 10, len(good_body) // 2)):
        out.append((f"half_body_{i}", _request(good_body[:cut], content_length=len(good_body))))
    return out


def write(path: Path = CORPUS, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="ascii") as f:
        for name, raw in build(seed):
            f.write(json.dumps({"name": name, "raw": base64.b64encode(raw).decode()}) + "\n")


def load(path: Path = CORPUS) -> list[tuple[str, bytes]]:
    with gzip.open(path, "rt", encoding="ascii") as f:
        return [(o["name"], base64.b64decode(o["raw"])) for o in map(json.loads, f)]


def send(port: int, raw: bytes, timeout: float = 10.0) -> tuple[int | None, bytes, float]:
    """Send raw bytes, read the answer; (status or None, body, seconds). A server that closes
    early while the rest is sent still gets its answer read."""
    t0 = time.perf_counter()
    data = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(raw)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                break
            if not chunk:
                break
            data += chunk
            head, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                length = _content_length(head)
                if length is not None and len(body) >= length:
                    break
    seconds = time.perf_counter() - t0
    if not data.startswith(b"HTTP/1.1 "):
        return None, data, seconds
    head, _, body = data.partition(b"\r\n\r\n")
    length = _content_length(head)
    return int(head[9:12]), body if length is None else body[:length], seconds


def _content_length(head: bytes) -> int | None:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value.strip())
    return None


if __name__ == "__main__":
    write()
    print(f"wrote {len(build())} requests to {CORPUS}")
