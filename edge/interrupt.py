"""Ctrl-C that is never lost inside llama.cpp.

llama-cpp-python routes llama.cpp's log lines through a ctypes callback; a
KeyboardInterrupt raised while Python runs that callback is printed and dropped
("Exception ignored on calling ctypes callback function"), so a sweep could ignore
Ctrl-C. During a sweep SIGINT only sets a flag, and the runner raises KeyboardInterrupt
at safe points: between decode calls, cooldown polls and tests.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType


class InterruptGuard:
    def __init__(self) -> None:
        self.hit = False
        self._old: object = None
        self._installed = False

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        self.hit = True

    def check(self) -> None:
        if self.hit:
            raise KeyboardInterrupt

    def __enter__(self) -> InterruptGuard:
        # signal handlers can only be set from the main thread; elsewhere, no guard
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, self._handler)
            self._installed = True
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._old)  # type: ignore[arg-type]
            self._installed = False
