"""Named crash points for the kill -9 tests, off unless DUMPWATCH_FAILPOINTS is set.

DUMPWATCH_FAILPOINTS="placed=3" kills the process with SIGKILL the third time it reaches
the point named "placed". Storage engines test crash safety the same way (failpoints);
with the variable unset, hit() is a dictionary test.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}
for _item in filter(None, os.environ.get("DUMPWATCH_FAILPOINTS", "").split(",")):
    _name, _, _count = _item.partition("=")
    _counts[_name.strip()] = int(_count or 1)


def hit(name: str) -> None:
    if _counts and name in _counts:
        _counts[name] -= 1
        if _counts[name] <= 0:
            os.kill(os.getpid(), signal.SIGKILL)
