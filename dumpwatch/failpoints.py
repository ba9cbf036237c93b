"""Named crash points for the kill tests, off unless DUMPWATCH_FAILPOINTS is set.

DUMPWATCH_FAILPOINTS="placed=3" kills the process with SIGKILL the third time it reaches
the point named "placed"; "placed=3:INT" sends it SIGINT (Ctrl-C) instead, "placed=3:TERM"
SIGTERM. Storage engines test crash safety the same way (failpoints); with the variable
unset, hit() is one dictionary test.
"""

from __future__ import annotations

import os
import signal

_points: dict[str, list] = {}
for _item in filter(None, os.environ.get("DUMPWATCH_FAILPOINTS", "").split(",")):
    _name, _, _spec = _item.partition("=")
    _count, _, _signal = _spec.partition(":")
    _points[_name.strip()] = [int(_count or 1), getattr(signal, "SIG" + (_signal or "KILL"))]


def hit(name: str) -> None:
    if _points and name in _points:
        point = _points[name]
        point[0] -= 1
        if point[0] == 0:
            os.kill(os.getpid(), point[1])
