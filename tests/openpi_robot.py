"""Robot code written for openpi's client, unchanged, run by the Python of `.venv-openpi` (the
real `openpi-client` from PyPI, which pins numpy < 2 and so lives in a venv of its own).

It imports nothing of mobile-vla. The test that starts it (tests/test_openpi.py) plays the robot's
body: it runs the simulator and, for each camera frame, sends this process a command on stdin;
this process calls the policy exactly as openpi's robot runtimes do
(`ActionChunkBroker(WebsocketClientPolicy(...)).infer(obs)`) and writes the result to stdout.
Messages both ways are 4-byte little-endian lengths followed by msgpack in openpi's own numpy
encoding (`openpi_client.msgpack_numpy`).
"""

from __future__ import annotations

import struct
import sys

from openpi_client import action_chunk_broker, msgpack_numpy, websocket_client_policy


def read() -> dict | None:
    header = sys.stdin.buffer.read(4)
    if len(header) < 4:
        return None
    (size,) = struct.unpack("<I", header)
    return msgpack_numpy.unpackb(sys.stdin.buffer.read(size))


def write(obj: dict) -> None:
    data = msgpack_numpy.packb(obj)
    sys.stdout.buffer.write(struct.pack("<I", len(data)) + data)
    sys.stdout.buffer.flush()


def main() -> None:
    client = policy = None
    while (cmd := read()) is not None:
        try:
            if cmd["cmd"] == "connect":  # one connection per episode: its own history
                client = websocket_client_policy.WebsocketClientPolicy(
                    cmd["url"], api_key=cmd.get("api_key")
                )
                policy = action_chunk_broker.ActionChunkBroker(client, cmd["horizon"])
                write({"metadata": client.get_server_metadata()})
            elif cmd["cmd"] == "infer":
                write({"result": policy.infer(cmd["obs"])})
            else:
                write({"error": f"unknown command {cmd['cmd']!r}"})
        except Exception as exc:  # the test reads what openpi's client raised
            write({"error": f"{type(exc).__name__}: {exc}"})


if __name__ == "__main__":
    main()
