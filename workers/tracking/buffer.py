"""The non-blocking side of run mirroring: each tracker gets a bounded buffer of
calls and one background thread that drains it in order, retrying a call that
failed for a passing reason (server down, timeout) with exponential backoff.

Training only ever appends to the buffer (no network, no import of the tracker's
package on the training thread); a full buffer drops the newest call with one
warning. When the run ends, `close` waits a bounded time for every buffer to
drain and then gives up, so a tracker that is down costs the worker at most
that time (STUDIO_TRACKING_FLUSH_S) and never fails the run.
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from typing import Callable

log = logging.getLogger("peft_studio.tracking")

MAX_PENDING = 20_000          # calls held per tracker while it is down (one per step, plus a few)
BACKOFF_START_S = 0.5
BACKOFF_MAX_S = 5.0

_USERINFO = re.compile(r"(\w+://)([^/@\s:]+):([^/@\s]+)@")


def redact(text: str) -> str:
    """`text` with any URL password replaced (`scheme://user:***@host`)."""
    return _USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}:***@", str(text))


class TrackerProblem(Exception):
    """A tracker call that failed; `transient` says whether retrying may help."""

    def __init__(self, kind: str, message: str, transient: bool):
        super().__init__(message)
        self.kind, self.transient = kind, transient


def default_classify(e: BaseException) -> tuple[str, bool]:
    """(problem kind, transient) of a tracker exception: network and timeouts are
    worth retrying; anything else (a refused value, bad credentials) is not."""
    if isinstance(e, TrackerProblem):
        return e.kind, e.transient
    if isinstance(e, (ConnectionError, TimeoutError, OSError)):
        return "unreachable", True
    return type(e).__name__, False


class BufferedTracker:
    """One tracker behind a bounded FIFO of calls and a daemon thread draining it."""

    def __init__(self, tracker, warn: Callable[[str, str, str], None], maxsize: int = MAX_PENDING):
        self.tracker, self.name = tracker, tracker.name
        self._warn = warn                     # (tracker name, problem kind, message)
        self._maxsize = maxsize
        self._calls: collections.deque = collections.deque()
        self._cv = threading.Condition()
        self._closing = False
        self._gave_up = False
        self.delivered = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._loop, daemon=True, name=f"tracker-{self.name}")
        self._thread.start()

    # -------------------------------------------------------------- the training side

    def submit(self, what: str, fn: Callable[[], None]) -> None:
        """Queue a call; never blocks, never raises."""
        with self._cv:
            if self._closing:
                return
            if len(self._calls) >= self._maxsize:
                self.dropped += 1
                full = True
            else:
                self._calls.append((what, fn))
                self._cv.notify()
                full = False
        if full:
            self._warn(self.name, "buffer-full", f"{self.name}: its buffer is full ({self._maxsize} calls waiting, "
                       f"the tracker is not keeping up or is down); newer metrics are dropped")

    def pending(self) -> int:
        with self._cv:
            return len(self._calls)

    def close(self, deadline: float) -> bool:
        """Stop taking calls and wait until `deadline` (time.monotonic) for the buffer to
        drain; True if everything was delivered. Past the deadline the thread stops
        after its current call and what is left is dropped (with a warning)."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if not self._thread.is_alive():
            return True
        with self._cv:
            self._gave_up = True
            left = len(self._calls)
            self._cv.notify_all()
        self._warn(self.name, "gave-up", f"{self.name}: gave up when the run ended; {left} call(s) not delivered "
                   f"(the tracker did not answer in time; STUDIO_TRACKING_FLUSH_S sets how long the worker waits)")
        return False

    # -------------------------------------------------------------- the background side

    def _loop(self) -> None:
        delay = BACKOFF_START_S
        while True:
            with self._cv:
                while not self._calls and not self._closing and not self._gave_up:
                    self._cv.wait()
                if self._gave_up or not self._calls:
                    return
                what, fn = self._calls[0]
            try:
                fn()
            except BaseException as e:   # noqa: BLE001 -- a tracker problem must never leave this thread
                if self._gave_up:
                    return
                kind, transient = getattr(self.tracker, "classify", default_classify)(e)
                msg = redact(f"{type(e).__name__}: {e}")[:600]
                if transient:
                    self._warn(self.name, kind, f"{self.name}: {what} failed ({kind}: {msg}); the run goes on and "
                               f"the calls are kept and retried in the background")
                    with self._cv:
                        if not self._gave_up:
                            self._cv.wait(delay)   # close() may wake it early; the loop retries or stops
                    delay = min(delay * 2, BACKOFF_MAX_S)
                    continue
                self._warn(self.name, kind, f"{self.name}: {what} failed ({msg}); this call is dropped")
                with self._cv:
                    self._calls.popleft()
                continue
            delay = BACKOFF_START_S
            with self._cv:
                self._calls.popleft()
                self.delivered += 1


class Once:
    """Remembers which (tracker, problem kind) pairs were already reported."""

    def __init__(self):
        self._seen: set = set()
        self._lock = threading.Lock()

    def first(self, key) -> bool:
        with self._lock:
            if key in self._seen:
                return False
            self._seen.add(key)
            return True


def wait_all(buffers: list[BufferedTracker], timeout_s: float) -> bool:
    """Close every buffer against one shared deadline; True if all drained."""
    deadline = time.monotonic() + max(0.0, timeout_s)
    ok = True
    for b in buffers:
        ok = b.close(deadline) and ok
    return ok


def lazy(fn: Callable[[], object]) -> Callable[[], object]:
    """`fn` computed once, on first call, by whichever thread asks first (thread-safe)."""
    lock, box = threading.Lock(), []

    def get():
        with lock:
            if not box:
                box.append(fn())
            return box[0]
    return get

