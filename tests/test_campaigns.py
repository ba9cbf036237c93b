"""The fault campaigns of docs/reliability.md, short: a few kills each. The long runs, with
hundreds of kills and thousands of files, are `python bench/campaign.py`."""

from __future__ import annotations

import random

import pytest
from campaign import check, make_inputs, serve_kills, sort_once_kills, write_config

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
        kills += sort_once_kills(site, inputs, rng, per_file=0.004 if anonymise else 0.001).kills
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
    result = serve_kills(site, tmp_path / "arriving", inputs, rng, budget=1.0, kills=KILLS)
    assert result.kills >= KILLS
    check(site, inputs, anonymise)
