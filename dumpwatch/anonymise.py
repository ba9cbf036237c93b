"""Anonymisation: DcmServer's anon_fields, emptied wherever they occur."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from pydicom.dataset import Dataset


def datasets(ds: Dataset) -> Iterator[Dataset]:
    """ds and every item of every sequence in it, however deep."""
    yield ds
    for tag in list(ds.keys()):
        if ds.get_item(tag).VR in ("SQ", "UN", None):  # only these can hold items
            elem = ds[tag]
            if elem.VR == "SQ":
                for item in elem.value:
                    yield from datasets(item)


def empty_fields(ds: Dataset, tags: Iterable[int]) -> bool:
    """Empty each listed element wherever it occurs; absent ones are skipped.

    Returns True when anything changed, so that an unchanged file is moved, not rewritten.
    """
    tags = tuple(tags)
    if not tags:
        return False
    changed = False
    for dataset in datasets(ds):
        for tag in tags:
            if tag in dataset:
                elem = dataset[tag]
                if not elem.is_empty:
                    elem.value = [] if elem.VR == "SQ" else elem.empty_value
                    changed = True
    return changed
