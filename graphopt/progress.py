"""A spinner on stderr for steps that take more than about a second (loading, rewriting,
saving); shown on a terminal, silent in CI logs unless asked for."""

from __future__ import annotations

import contextlib
import sys
import threading
import time

_FRAMES = "|/-\\"
DELAY_S = 1.0


def wanted(forced: bool, quiet: bool = False) -> bool:
    """On when forced (--progress); otherwise only when stderr is a terminal and not --quiet."""
    return forced or (not quiet and sys.stderr.isatty())


@contextlib.contextmanager
def step(label: str, enabled: bool, stream=None):
    """Show `label` with a spinner and the elapsed seconds once the step passes DELAY_S."""
    if not enabled:
        yield
        return
    stream = stream or sys.stderr
    done = threading.Event()
    start = time.monotonic()
    shown = False

    def spin():
        nonlocal shown
        frame = 0
        if done.wait(DELAY_S):
            return
        while not done.is_set():
            shown = True
            elapsed = time.monotonic() - start
            stream.write(f"\r{_FRAMES[frame % 4]} {label} ({elapsed:.0f} s)")
            stream.flush()
            frame += 1
            done.wait(0.2)

    thread = threading.Thread(target=spin, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
        if shown:
            stream.write(f"\r{label}: done in {time.monotonic() - start:.1f} s\n")
            stream.flush()
