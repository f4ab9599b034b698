"""Robot-side execution of action chunks that survives a slow network: a queue of timed
actions, a refill request when it runs low, blending where chunks overlap, stale actions
dropped, and a deadman that stops the base when no fresh action exists.

Every action in the queue is for a time: a reply's chunk answers an observation taken at
``obs_time`` (the request carries it, the reply echoes it), and its k-th action is for
``obs_time + k * dt``. At each control tick the robot executes the action for that tick; one
whose time has passed is never executed. When the queue has no action for the tick, the robot
keeps its last command until ``deadman_s`` after the last fresh one, then sends a stop (LeKiwi
stops its base after 500 ms without a command; so does this default).

:class:`ActionQueue` is the logic, with time passed in, so it is tested without a clock.
:class:`DelayedQueueController` drives the simulator through a server with the network's
delay simulated on the control clock (deterministic: a reply computed now arrives ``delay_s``
later, or never once the server "stops answering"), which is how the delay table is measured.
:class:`RealtimeQueueClient` is the same queue on the wall clock, with the request in a
background thread, for a real robot.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mobile_vla.config import ACTION_NAMES
from mobile_vla.data.commands import full_commands
from mobile_vla.errors import MobileVLAError


@dataclass
class ExecutionSettings:
    dt: float = 0.1  # control period (s); a chunk's actions are dt apart
    refill_below: int = 10  # ask for a chunk when fewer future actions than this are queued
    blend: float = 0.7  # weight of the newer chunk where two overlap (1: replace)
    deadman_s: float = 0.5  # no fresh action for this long: stop (inf: never)
    every_frame: bool = True  # send every frame (the server's history needs it), see below
    max_in_flight: int = 8  # requests outstanding at once when sending every frame

    def validate(self) -> None:
        if not self.dt > 0:
            raise MobileVLAError(f"execution dt must be > 0 s, got {self.dt}")
        if self.refill_below < 1:
            raise MobileVLAError(f"refill_below must be >= 1, got {self.refill_below}")
        if not 0.0 < self.blend <= 1.0:
            raise MobileVLAError(f"blend must be in (0, 1], got {self.blend}")
        if self.max_in_flight < 1:
            raise MobileVLAError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if not self.deadman_s > 0:
            raise MobileVLAError(f"deadman_s must be > 0 s (inf: off), got {self.deadman_s}")


@dataclass
class TickStats:
    """What the robot did, tick by tick: fresh (an action for the tick), held (the last
    command kept), stopped (deadman), and the longest time without a fresh action."""

    fresh: int = 0
    held: int = 0
    stopped: int = 0
    stale_dropped: int = 0
    requests: int = 0
    longest_gap_s: float = 0.0
    over_deadman_moving: int = 0  # ticks past the deadman with a non-zero command (must be 0)


class ActionQueue:
    """Timed actions; see the module docstring. Times are seconds on the robot's clock."""

    def __init__(self, settings: ExecutionSettings) -> None:
        settings.validate()
        self.s = settings
        self.times: list[float] = []
        self.actions: list[np.ndarray] = []
        self.last_command = np.zeros(len(ACTION_NAMES), np.float32)
        self.last_fresh: float | None = None
        self.start: float | None = None  # the first tick: gaps count from there
        self.status = "stopped"  # of the last tick: fresh, held or stopped (no action to run)
        self.stats = TickStats()

    def _slot(self, t: float) -> int:
        return round(t / self.s.dt)

    def push(self, obs_time: float, chunk: np.ndarray, now: float) -> int:
        """Add a reply's chunk (N, 3) for ``obs_time``; actions for ticks already past are
        dropped (returned count), overlapping ones blended with what is queued."""
        first_live = self._slot(now)
        queued = {self._slot(t): i for i, t in enumerate(self.times)}
        dropped = 0
        for k, action in enumerate(np.asarray(chunk, np.float32)):
            slot = self._slot(obs_time) + k
            if slot < first_live:
                dropped += 1
                continue
            if slot in queued:
                i = queued[slot]
                self.actions[i] = self.s.blend * action + (1 - self.s.blend) * self.actions[i]
            else:
                self.times.append(slot * self.s.dt)
                self.actions.append(action.copy())
        order = np.argsort(self.times, kind="stable")
        self.times = [self.times[i] for i in order]
        self.actions = [self.actions[i] for i in order]
        self.stats.stale_dropped += dropped
        return dropped

    def remaining(self, now: float) -> int:
        """Queued actions for this tick and later."""
        return sum(self._slot(t) >= self._slot(now) for t in self.times)

    def pop(self, now: float) -> np.ndarray:
        """The command for the tick at ``now``."""
        tick = self._slot(now)
        self.start = now if self.start is None else self.start
        while self.times and self._slot(self.times[0]) < tick:  # stale: never executed
            self.times.pop(0)
            self.actions.pop(0)
        st = self.stats
        if self.times and self._slot(self.times[0]) == tick:
            self.times.pop(0)
            self.last_command = self.actions.pop(0)
            self.last_fresh = now
            st.fresh += 1
            self.status = "fresh"
            return self.last_command.copy()
        since = now - (self.last_fresh if self.last_fresh is not None else -np.inf)
        # before the first action, the time counts from the tick before the first
        gap_from = self.last_fresh if self.last_fresh is not None else self.start - self.s.dt
        st.longest_gap_s = max(st.longest_gap_s, now - gap_from)
        if since > self.s.deadman_s or self.last_fresh is None:
            self.last_command = np.zeros_like(self.last_command)
            st.stopped += 1
            self.status = "stopped"
            return self.last_command.copy()
        st.held += 1
        self.status = "held"
        return self.last_command.copy()

    def check_deadman(self, now: float, command: np.ndarray, deadman_s: float) -> None:
        """Count a tick past ``deadman_s`` without a fresh action whose command still moves."""
        since = now - (self.last_fresh if self.last_fresh is not None else -np.inf)
        if since > deadman_s + 1e-9 and float(np.abs(command).max()) > 0:
            self.stats.over_deadman_moving += 1


Transport = Callable[[np.ndarray, str, str, bool, float], dict[str, Any]]


class DelayedQueueController:
    """A closed-loop controller that drives through a server with a simulated network: a
    request sent at tick time t is answered at t + ``delay_s`` on the control clock (never, at
    or after ``silent_after_s``: the server stops answering). ``transport(image, instruction,
    session, reset, obs_time)`` returns the server's reply (``chunk`` of the predicted
    dimensions and the echoed ``obs_time``). ``deadman_check`` (seconds) counts ticks past it
    that still move, whatever the queue's own deadman is.

    When to send (``settings.every_frame``): a policy with a window of history (every policy
    here) needs every frame in its server-side history, so by default each tick's frame is
    sent, up to ``max_in_flight`` requests outstanding, and each reply blends into the queue.
    With ``every_frame`` off, a frame is sent only when fewer than ``refill_below`` actions
    are queued and no request is in flight (LeRobot's and openpi's way, for policies that read
    only the current frame); the frames in between never reach the server's history."""

    def __init__(
        self,
        transport: Transport,
        dims: Sequence[str],
        settings: ExecutionSettings,
        delay_s: float = 0.0,
        silent_after_s: float = float("inf"),
        deadman_check: float = 0.5,
    ) -> None:
        self.transport, self.dims, self.s = transport, list(dims), settings
        self.delay_s, self.silent_after_s = delay_s, silent_after_s
        self.deadman_check = deadman_check
        self.episodes: list[TickStats] = []

    def reset(self, scenario: Any) -> None:
        self.queue = ActionQueue(self.s)
        self.episodes.append(self.queue.stats)
        self.session, self.first, self.tick = uuid.uuid4().hex, True, 0
        self.in_flight: list[tuple[float, float, np.ndarray]] = []  # arrival, obs_time, chunk

    def _deliver(self, now: float) -> None:
        while self.in_flight and self.in_flight[0][0] <= now + 1e-9:
            _, obs_time, chunk = self.in_flight.pop(0)
            self.queue.push(obs_time, chunk, now)

    def _should_send(self, now: float) -> bool:
        if self.s.every_frame:
            return len(self.in_flight) < self.s.max_in_flight
        return not self.in_flight and self.queue.remaining(now) < self.s.refill_below

    def act(self, image: np.ndarray, instruction: str) -> np.ndarray:
        now = self.tick * self.s.dt
        self.tick += 1
        q = self.queue
        self._deliver(now)
        if self._should_send(now):
            reply = self.transport(image, instruction, self.session, self.first, now)
            self.first = False
            q.stats.requests += 1
            if now < self.silent_after_s:
                chunk = full_commands(reply["chunk"], self.dims)
                self.in_flight.append((now + self.delay_s, float(reply["obs_time"]), chunk))
            else:  # the reply never comes; the robot waits for it forever
                self.in_flight.append((float("inf"), now, np.zeros((0, 3), np.float32)))
            self._deliver(now)  # no delay: the reply is here this tick
        command = q.pop(now)
        q.check_deadman(now, command, self.deadman_check)
        return command

    @property
    def waiting(self) -> bool:
        """The last tick had no action to run (before the first reply, or the deadman): the
        closed loop does not take that stop for the policy's decision to stop."""
        return self.queue.status == "stopped"


class RealtimeQueueClient:
    """The queue on the wall clock for a real robot: call :meth:`act` once per control tick
    with the newest camera frame. A background thread sends the frames in order through
    ``transport`` (e.g. :meth:`PredictClient.predict_timed`): every frame, up to
    ``max_in_flight`` waiting (the server's history needs them), or with ``every_frame`` off
    one when fewer than ``refill_below`` actions are queued and none is pending. A request that
    fails leaves the queue to run out, and the deadman stops the robot. :meth:`close` stops
    the thread."""

    def __init__(
        self,
        transport: Transport,
        dims: Sequence[str],
        settings: ExecutionSettings,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        import queue

        self.transport, self.dims, self.s, self.clock = transport, list(dims), settings, clock
        self.queue = ActionQueue(settings)
        self.lock = threading.Lock()
        self.session, self.first = uuid.uuid4().hex, True
        self.t0 = clock()
        self.outbox: queue.Queue = queue.Queue()
        self.pending = 0  # frames queued or being sent
        self.errors = 0
        self.thread = threading.Thread(target=self._send_loop, daemon=True)
        self.thread.start()

    def now(self) -> float:
        return self.clock() - self.t0

    def _send_loop(self) -> None:
        while (item := self.outbox.get()) is not None:
            image, instruction, obs_time, reset = item
            try:
                reply = self.transport(image, instruction, self.session, reset, obs_time)
                chunk = full_commands(reply["chunk"], self.dims)
                with self.lock:
                    self.queue.push(float(reply["obs_time"]), chunk, self.now())
            except Exception:  # a slow or dead server: the queue runs out, the deadman stops
                self.errors += 1
            finally:
                with self.lock:
                    self.pending -= 1

    def act(self, image: np.ndarray, instruction: str) -> np.ndarray:
        now = self.now()
        with self.lock:
            if self.s.every_frame:
                send = self.pending < self.s.max_in_flight
            else:
                send = self.pending == 0 and self.queue.remaining(now) < self.s.refill_below
            command = self.queue.pop(now)
            if send:
                self.pending += 1
                self.queue.stats.requests += 1
        if send:
            self.outbox.put((image, instruction, now, self.first))
            self.first = False
        return command

    def close(self) -> None:
        self.outbox.put(None)
        self.thread.join(timeout=5)
