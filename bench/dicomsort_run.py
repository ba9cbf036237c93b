"""Run dicomsort (PyPI) on a folder, as its GUI would, for a side-by-side figure.

dicomsort 3.0.0 has no command line (its GUI is wxPython) and needs pydicom < 3, so
bench/sort_once.py installs it in a separate venv and runs this script there. Its library
API is driven directly; the wx module its GUI events import is replaced by a stand-in,
since no GUI listener is attached.

    python bench/dicomsort_run.py SOURCE OUT [--copy]
"""

from __future__ import annotations

import sys
import types

wx = types.ModuleType("wx")
wx.PostEvent = lambda *args: None
wx_lib = types.ModuleType("wx.lib")
wx_newevent = types.ModuleType("wx.lib.newevent")
wx_newevent.NewEvent = lambda: (object, object)
sys.modules.update({"wx": wx, "wx.lib": wx_lib, "wx.lib.newevent": wx_newevent})

from dicomsort.dicomsorter import DicomSorter  # noqa: E402


def main(source: str, out: str, copy: bool) -> None:
    sorter = DicomSorter([source])
    sorter.folders = ["%(StudyDate)s-%(PatientName)s", "%(SeriesNumber)03d-%(SeriesDescription)s"]
    sorter.filename = "%(InstanceNumber)04d.dcm"
    sorter.keep_original = copy
    sorter.sort(out)
    for thread in sorter.sorters:
        thread.join()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], "--copy" in sys.argv[3:])
