"""Persistent math-verify worker processes with hard time limits.

Why a separate process: math-verify's own timeout uses SIGALRM, which only works in the main
thread, and some inputs spend minutes inside C code (huge integer powers) where no signal handler
can run. A worker process can always be killed, so a check is bounded from any thread.

Each :class:`Worker` is a ``python _mv_worker.py`` subprocess talking JSON Lines over pipes. A
worker that misses its deadline is killed (SIGKILL) and a fresh one is started at once, so the
next check does not pay the full start-up time. Workers are spawned from one long-lived thread
so that, on Linux, ``PR_SET_PDEATHSIG`` kills them if the parent process dies.
"""

from __future__ import annotations

import atexit
import concurrent.futures
import json
import logging
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

from . import _mv_worker

logger = logging.getLogger(__name__)

WORKER_SCRIPT = Path(__file__).with_name("_mv_worker.py")

#: Seconds a worker may take to start (import sympy/math-verify, warm up) before we give up.
STARTUP_TIMEOUT_S = 60.0
#: Extra seconds after the soft timeout before the worker process is killed.
HARD_GRACE_S = 0.5


class WorkerDied(Exception):
    pass


class WorkerTimeout(Exception):
    pass


class WorkerUnavailable(Exception):
    pass


_spawner: concurrent.futures.ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _spawn_thread() -> concurrent.futures.ThreadPoolExecutor:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="opdkit-verify-spawner"
            )
        return _spawner


def _popen() -> subprocess.Popen:
    env = dict(os.environ)
    # Same import path as this process (math_verify may come from a path added at runtime).
    paths = [p for p in sys.path if p and os.path.isdir(p)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("PYTHONIOENCODING", "utf-8")
    return subprocess.Popen(
        [sys.executable, str(WORKER_SCRIPT)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=None,
        env=env,
        text=True,
        encoding="utf-8",
        errors="replace",
        close_fds=True,
        start_new_session=True,
    )


class Worker:
    """One worker process. Not thread-safe: use through :class:`WorkerPool` (one user at a time)."""

    def __init__(self) -> None:
        # Popen in the dedicated spawner thread (see module docstring).
        self.proc = _spawn_thread().submit(_popen).result()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._ready = False
        self._dead = False
        self._next_id = 0
        self.started = time.monotonic()
        threading.Thread(target=self._pump, name="opdkit-verify-reader", daemon=True).start()

    def _pump(self) -> None:
        stdout = self.proc.stdout
        try:
            assert stdout is not None
            for line in stdout:
                self._lines.put(line)
        except (OSError, ValueError):
            pass
        self._lines.put(None)

    @property
    def alive(self) -> bool:
        return not self._dead and self.proc.poll() is None

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> bool:
        if self._ready:
            return True
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                return False
            if line is None:
                self._dead = True
                return False
            try:
                if json.loads(line).get("ready"):
                    self._ready = True
                    return True
            except (ValueError, AttributeError):
                continue

    def request(self, pred: str, gold: str, timeout_s: float) -> str:
        """Send one comparison; return the worker's reason string.

        Raises WorkerTimeout (the caller must kill this worker) or WorkerDied.
        """
        self._next_id += 1
        rid = self._next_id
        msg = json.dumps({"id": rid, "p": pred, "g": gold, "t": timeout_s}) + "\n"
        try:
            assert self.proc.stdin is not None
            self.proc.stdin.write(msg)
            self.proc.stdin.flush()
        except (OSError, ValueError) as e:
            self._dead = True
            raise WorkerDied(str(e)) from e
        deadline = time.monotonic() + timeout_s + HARD_GRACE_S
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise WorkerTimeout()
            try:
                line = self._lines.get(timeout=remaining)
            except queue.Empty:
                raise WorkerTimeout() from None
            if line is None:
                self._dead = True
                raise WorkerDied("worker exited")
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            if isinstance(reply, dict) and reply.get("id") == rid:
                return str(reply.get("r"))

    def kill(self) -> None:
        self._dead = True
        try:
            self.proc.kill()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:  # pragma: no cover
            pass
        self._close_pipes()

    def close(self) -> None:
        """Polite shutdown: EOF on stdin makes the worker exit; kill it if it lingers."""
        self._dead = True
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def _close_pipes(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            try:
                if f is not None:
                    f.close()
            except OSError:
                pass


class WorkerPool:
    """Idle workers kept for reuse. `acquire` hands a worker to one caller at a time."""

    def __init__(self, max_idle: int | None = None) -> None:
        self.max_idle = max_idle if max_idle is not None else max(2, os.cpu_count() or 2)
        self._idle: list[Worker] = []
        self._lock = threading.Lock()
        self._startup_failures = 0
        self.disabled = False

    def _new_worker(self) -> Worker:
        try:
            return Worker()
        except OSError as e:
            self._note_failure(f"cannot start verification worker: {e}")
            raise WorkerUnavailable(str(e)) from e

    def _note_failure(self, why: str) -> None:
        with self._lock:
            self._startup_failures += 1
            if self._startup_failures >= 2 and not self.disabled:
                self.disabled = True
                logger.error("%s; falling back to in-process verification from now on", why)
            else:
                logger.warning("%s", why)

    def acquire(self) -> Worker:
        """Return a started, ready worker, or raise WorkerUnavailable."""
        if self.disabled:
            raise WorkerUnavailable("worker processes disabled after repeated start-up failures")
        while True:
            with self._lock:
                w = self._idle.pop() if self._idle else None
            if w is not None and not w.alive:  # an idle worker that died meanwhile
                w.kill()
                continue
            if w is None:
                w = self._new_worker()
            if w.wait_ready(STARTUP_TIMEOUT_S):
                with self._lock:
                    self._startup_failures = 0
                return w
            w.kill()
            self._note_failure("verification worker did not start")
            if self.disabled:
                raise WorkerUnavailable("verification worker did not start")

    def release(self, w: Worker) -> None:
        with self._lock:
            if w.alive and len(self._idle) < self.max_idle:
                self._idle.append(w)
                return
        w.close()

    def replace(self, w: Worker) -> Worker:
        """Kill `w` and return a freshly spawned (possibly still starting) replacement."""
        w.kill()
        if self.disabled:
            raise WorkerUnavailable("worker processes disabled")
        return self._new_worker()

    def shutdown(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for w in idle:
            w.close()


POOL = WorkerPool()
atexit.register(POOL.shutdown)


def _after_fork_in_child() -> None:
    # The parent's workers, pipes and spawner thread belong to the parent: start afresh.
    global _spawner, _spawner_lock
    _spawner = None
    _spawner_lock = threading.Lock()
    POOL._idle = []
    POOL._lock = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def check_in_thread(pred: str, gold: str, timeout_s: float) -> str:
    """Fallback when no worker process can be started: run math-verify in a daemon thread and
    stop waiting after the deadline. The caller is never blocked past the deadline, but a runaway
    check keeps burning CPU in its abandoned thread."""
    box: list[str] = []

    def run() -> None:
        try:
            box.append(_mv_worker.check(pred, gold))
        except Exception:
            box.append(_mv_worker.PARSE_ERROR)

    t = threading.Thread(target=run, name="opdkit-verify-fallback", daemon=True)
    t.start()
    t.join(timeout_s + HARD_GRACE_S)
    return box[0] if box else _mv_worker.TIMEOUT
