"""The fault campaigns of docs/reliability.md, short: a few kills each. The long runs, with
hundreds of kills and thousands of files, are `python bench/kill_campaign.py`."""

from __future__ import annotations

import os
import random
import time

import pytest
from campaign import (
    FIELDMAP,
    assert_dump_empty,
    assert_journal_agrees,
    check,
    corpus_cache,
    crash_points,
    make_inputs,
    quarantined,
    serve_kills,
    sort_once_kills,
    storescp_kills,
    tree_sops,
    write_config,
)
from dcmtk import write_config as dcmtk_config
from pydicom import dcmread

KILLS = 6  # at least, in each short campaign


@pytest.mark.parametrize("anonymise", [False, True], ids=["move", "basic-profile"])
def test_sort_once_killed_again_and_again(tmp_path, testdata, anonymise):
    """Rounds of fresh inputs until enough kills have landed; after each round, every input
    is in the tree once and whole, or in the quarantine."""
    rng = random.Random(11)
    kills = 0
    for number in range(20):
        site = tmp_path / f"round-{number}"
        write_config(site, anonymise)
        inputs = make_inputs(site / "dump", testdata, files=300, fieldmaps=2, seed=number)
        kills += sort_once_kills(site, inputs, rng, per_file=0.004 if anonymise else 0.001,
                                 steps=crash_points(anonymise)).kills
        check(site, inputs, anonymise)
        if kills >= KILLS:
            break
    assert kills >= KILLS


@pytest.mark.parametrize("anonymise", [False, True], ids=["move", "basic-profile"])
def test_serve_killed_again_and_again_while_files_arrive(tmp_path, testdata, anonymise):
    rng = random.Random(12)
    site = tmp_path / "site"
    write_config(site, anonymise)
    inputs = make_inputs(tmp_path / "arriving", testdata, files=300, fieldmaps=2, seed=12)
    result = serve_kills(site, tmp_path / "arriving", inputs, rng, budget=1.0, kills=KILLS,
                         steps=crash_points(anonymise))
    assert result.kills >= KILLS
    check(site, inputs, anonymise)


@pytest.mark.dcmtk
def test_storescp_killed_mid_association_then_the_scanner_sends_again(tmp_path, testdata):
    """Each send is cut by a kill -9 of storescp; the partial files it leaves are quarantined as
    truncated, and after one whole send every instance is in the tree exactly once."""
    files = sorted((corpus_cache(300)).iterdir()) + sorted((testdata / FIELDMAP).iterdir())
    sops = {str(dcmread(f, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            for f in files}
    cfg = dcmtk_config(tmp_path / "site")
    result = storescp_kills(cfg, files, random.Random(13), kills=KILLS, budget=0.35)
    assert result.kills >= KILLS
    site = cfg.parent
    assert_dump_empty(site / "dump")
    assert set(tree_sops(site / "sorted")) == sops
    reasons = quarantined(site / "quarantine")
    assert all(r.startswith(("truncated", "incomplete")) for r in reasons.values()), reasons
    assert_journal_agrees(site / "sorted")


@pytest.mark.dcmtk
def test_eight_scanners_at_once_each_sending_twice(tmp_path):
    """The short form of bench/load.py: eight storescu processes at once, each its own series,
    each sent twice (the second time an identical re-send): every instance once in the tree."""
    from dcmtk import Serve, Storescp, storescu

    files = sorted(corpus_cache(300).iterdir())
    shares = [files[number::8] for number in range(8)]
    cfg = dcmtk_config(tmp_path / "site")
    scp, serve = Storescp(cfg), Serve(cfg)
    try:
        for _ in range(2):
            senders = [storescu(scp.port, share, tmp_path, wait=False) for share in shares]
            for sender in senders:
                out, _ = sender.communicate(timeout=300)
                assert sender.returncode == 0, out
        site = cfg.parent
        deadline = time.monotonic() + 60
        while any(n != ".dumpwatch.lock" for n in os.listdir(site / "dump")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert_dump_empty(site / "dump")
        sops = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
        assert set(tree_sops(site / "sorted")) == sops
        assert not quarantined(site / "quarantine")
    finally:
        code = serve.stop()
        scp.stop()
    assert code == 0
    assert_journal_agrees(site / "sorted")
