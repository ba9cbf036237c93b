"""Named crash points for the kill tests, off unless DUMPWATCH_FAILPOINTS is set.

DUMPWATCH_FAILPOINTS="placed=3" kills the process with SIGKILL the third time it reaches
the point named "placed"; "placed=3:INT" sends it SIGINT (Ctrl-C) instead, "placed=3:TERM"
SIGTERM. "read~MR.x" kills it every time it reaches "read" for a file whose path holds
"MR.x" ("read~MR.x=:SEGV" with SIGSEGV): a file that kills whoever reads it, as one that
exhausts memory or crashes a C library does. Storage engines test crash safety the same way
(failpoints); with the variable unset, hit() is one dictionary test.
"""

from __future__ import annotations

import os
import signal

_points: dict[str, list] = {}  # name -> [hits left, signal]
_keyed: dict[str, list[tuple[str, int]]] = {}  # name -> [(text in the path, signal)]
for _item in filter(None, os.environ.get("DUMPWATCH_FAILPOINTS", "").split(",")):
    _name, _, _spec = _item.partition("=")
    _count, _, _signal = _spec.partition(":")
    _name, _tilde, _text = _name.strip().partition("~")
    if _tilde:
        _keyed.setdefault(_name, []).append((_text, getattr(signal, "SIG" + (_signal or "KILL"))))
        _points.setdefault(_name, [0, 0])  # hit() looks further only for names in _points
    else:
        _points[_name] = [int(_count or 1), getattr(signal, "SIG" + (_signal or "KILL"))]


def hit(name: str, path: str = "") -> None:
    if _points and name in _points:
        point = _points[name]
        point[0] -= 1
        if point[0] == 0:
            os.kill(os.getpid(), point[1])
        for text, signum in _keyed.get(name, ()):
            if text in path:
                os.kill(os.getpid(), signum)


def disarm() -> None:
    """Counted points stood for one crash, which has happened: worker processes forked anew
    from a parent whose counts never moved would crash again. Points keyed to a file stay."""
    for point in _points.values():
        point[0] = 0
