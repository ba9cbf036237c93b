"""A stand-in converter for bench/hooks.py: keeps one CPU busy for argv[1] seconds and writes
argv[3] MB (default 4) into the folder argv[2] every half second, as dcm2niix on a large series would (like
dcm2niix, it does not fsync: the kernel writes it back)."""

import os
import sys
import time

seconds, folder = float(sys.argv[1]), sys.argv[2]
megabytes = int(sys.argv[3]) if len(sys.argv) > 3 else 4
end = time.monotonic() + seconds
block = os.urandom(megabytes << 20)
next_write = 0.0
path = os.path.join(folder, f"busy-{os.getpid()}.bin")
with open(path, "wb") as out:
    while time.monotonic() < end:
        if block and time.monotonic() >= next_write:
            out.seek(0)
            out.write(block)
            out.flush()
            next_write = time.monotonic() + 0.5
        sum(range(20000))  # the CPU
os.unlink(path)
