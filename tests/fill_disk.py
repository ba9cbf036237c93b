"""Run by tests/test_disk.py inside a mount namespace of its own (unshare --mount): a small
tmpfs holds a whole site (dump, tree, quarantine, journal), storescp and serve receive two
real files into it, then a file grown with fallocate fills it to each level in turn; what
`dumpwatch status` says (and its exit status) and what the page says at each level is
printed as JSON. The namespace, its mount and everything in it end with this process.

    python tests/fill_disk.py FOLDER
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dcmtk import Serve, Storescp, storescu, wait_for, write_config  # noqa: E402

from dumpwatch import page  # noqa: E402
from dumpwatch.config import read_config  # noqa: E402
from dumpwatch.web import make_view  # noqa: E402

SIZE = 32 << 20
LEVELS = (None, 88, 97, None)  # as received; past disk_warn; past disk_alarm; room made again


def fill_to(filler: Path, percent: float | None, root: Path) -> None:
    """Grow (or shrink) filler until the filesystem is percent full (None: remove it)."""
    if percent is None:
        filler.unlink(missing_ok=True)
        return
    vfs = os.statvfs(root)
    have = filler.stat().st_size if filler.exists() else 0
    used = (vfs.f_blocks - vfs.f_bfree) * vfs.f_frsize - have
    want = int(percent / 100 * vfs.f_blocks * vfs.f_frsize) - used
    with open(filler, "wb") as file:
        os.posix_fallocate(file.fileno(), 0, max(4096, want))


def main() -> None:
    folder = Path(sys.argv[1])
    root = folder / "fs"
    root.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SIZE},mode=0755", "tmpfs", str(root)], check=True)
    site = write_config(root / "site", workers=1, series_idle=1, study_idle=1)
    files = sorted(Path(sys.argv[2]).glob("*/*"))
    scp, serve = Storescp(site), Serve(site)
    results = []
    try:
        storescu(scp.port, files, folder)
        tree = root / "site" / "sorted"
        wait_for(lambda: len(list(tree.rglob("*.dcm"))) == len(files), 60, "the files sorted")
        kept = sum(f.stat().st_size for f in tree.rglob("*.dcm"))
        for level in LEVELS:
            fill_to(root / "filler", level, root)
            done = subprocess.run([sys.executable, "-m", "dumpwatch", "--config", str(site), "status", "--json"],
                                  capture_output=True, text=True)
            status = json.loads(done.stdout)
            html = page.render(make_view(read_config(site)))
            verdict = html.split('<p class="verdict">', 1)[1].split("</p>", 1)[0]
            results.append({"level": level, "exit": done.returncode, "status": status, "verdict": verdict,
                            "tree_files": len(list(tree.rglob("*.dcm"))), "kept": kept, "sent": len(files)})
    finally:
        serve.stop()
        scp.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
