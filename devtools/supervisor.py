"""Start child processes, relay their output, and stop every one of them on the way out."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int) -> None:
    """Ask Linux to signal the child if the supervisor dies without cleaning up (SIGKILL)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, sig)


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    stop_signal: int
    log_path: Path
    relay: threading.Thread = field(repr=False)


class Supervisor:
    """Owns the children of `make run` (or of a test): in start order, stopped in reverse."""

    def __init__(self, log_dir: Path, *, console: IO[str] | None = None) -> None:
        self.log_dir = log_dir
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.console = console
        self.children: list[Child] = []
        self._console_lock = threading.Lock()

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        env: Mapping[str, str] | None = None,
        stop_signal: int = signal.SIGTERM,
        user: str | None = None,
        echo: bool = True,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        log_path = self.log_dir / f"{name}.log"
        proc = subprocess.Popen(
            argv,
            env=dict(env) if env is not None else None,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            # Its own session: a Ctrl-C on the terminal reaches the supervisor only, which
            # then stops the children in order.
            start_new_session=True,
            user=user,
            preexec_fn=lambda: _die_with_parent(stop_signal),
        )
        relay = threading.Thread(target=self._relay, args=(name, proc, log_path, echo), daemon=True)
        relay.start()
        self.children.append(Child(name, proc, stop_signal, log_path, relay))
        return proc

    def _relay(self, name: str, proc: subprocess.Popen[bytes], log_path: Path, echo: bool) -> None:
        assert proc.stdout is not None
        with log_path.open("ab") as log:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                if echo and self.console is not None:
                    text = line.decode(errors="replace").rstrip()
                    with self._console_lock:
                        print(f"{name:>8} | {text}", file=self.console, flush=True)

    def exited(self) -> Child | None:
        """The first child that is no longer running, if any."""
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop_all(self, timeout: float = 20.0) -> None:
        for child in reversed(self.children):
            self._stop(child, timeout)
        self.children.clear()

    @staticmethod
    def _stop(child: Child, timeout: float) -> None:
        proc = child.proc
        if proc.poll() is None:
            _signal_group(proc.pid, child.stop_signal)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                print(f"{child.name} did not stop in {timeout:.0f}s; killing it", file=sys.stderr)
        # Whatever the child left in its process group goes too.
        _signal_group(proc.pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(5)
        child.relay.join(timeout=2)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def wait_until(
    check: object,
    *,
    timeout: float,
    what: str,
    interval: float = 0.2,
    alive: subprocess.Popen[bytes] | None = None,
) -> None:
    """Poll `check()` until it returns true; fail early if `alive` exited."""
    assert callable(check)
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if alive is not None and alive.poll() is not None:
            raise RuntimeError(f"{what} exited with code {alive.returncode} while starting")
        try:
            if check():
                return
        except Exception as exc:
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout:.0f}s (last error: {last_error})")
