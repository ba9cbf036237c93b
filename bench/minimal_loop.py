"""The baseline: the least a sorter can do, in one process. Read each header with pydicom,
make the folders, rename the file. No checks, no journal, no overwrite protection.

    python bench/minimal_loop.py SOURCE OUT
"""

from __future__ import annotations

import os
import sys

from pydicom import dcmread


def main(source: str, out: str) -> None:
    for name in os.listdir(source):
        path = os.path.join(source, name)
        ds = dcmread(path, stop_before_pixels=True)
        folder = os.path.join(out, f"{ds.StudyDate}-{ds.PatientName}",
                              f"{int(ds.SeriesNumber):03d}-{ds.SeriesDescription}")
        os.makedirs(folder, exist_ok=True)
        os.rename(path, os.path.join(folder, f"{int(ds.InstanceNumber):04d}.dcm"))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
