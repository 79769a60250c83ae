"""`--cooldown C`: wait until the SoC is below C °C before each test.

A Pi that starts a test hot throttles part-way through and its figures mean little;
waiting for a fixed temperature makes runs comparable across a sweep and across days.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from edge.device import probe_state
from edge.errors import BadOptionError

POLL_S = 2.0


@dataclass
class CooldownWait:
    waited_s: float
    reached: bool  # False: gave up after the timeout (the test still runs, and says so)
    temp_c: float | None


def require_sensor() -> None:
    if probe_state().temp_c is None:
        raise BadOptionError(
            "--cooldown needs a temperature sensor but none is readable under "
            "/sys/class/thermal; run without --cooldown on this machine"
        )


def wait_below(limit_c: float, timeout_s: float, *, sleep: Callable[[float], None] = time.sleep,
               poll_s: float = POLL_S) -> CooldownWait:
    """Poll the SoC temperature until it is below `limit_c` or `timeout_s` has passed.

    Time is counted as the sum of the sleeps, so tests can pass a fake `sleep`.
    """
    waited = 0.0
    temp = probe_state().temp_c
    while temp is not None and temp >= limit_c:
        if waited >= timeout_s:
            return CooldownWait(waited, False, temp)
        sleep(poll_s)
        waited += poll_s
        temp = probe_state().temp_c
    return CooldownWait(waited, True, temp)
