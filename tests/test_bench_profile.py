"""`duospec profile`: the cost table and plot come from the budget's own measurement functions."""

from __future__ import annotations

import json

import pytest

import duospec
from bench_fixtures import one_thread, tiny_pipeline
from duospec.bench.profile import PROFILE_JSON, PROFILE_PNG, format_table, run_profile, write_profile
from duospec.cli import main


@pytest.fixture(scope="module")
def pipe():
    with one_thread():
        yield tiny_pipeline()


def test_profile_measures_each_size_and_the_draft_step(pipe, tmp_path):
    profile = run_profile(pipe, (4, 1, 2, 2), context_tokens=16, repeats=1)
    assert list(profile["target_pass_seconds"]) == ["1", "2", "4"]  # sorted, duplicates dropped
    assert all(seconds > 0 for seconds in profile["target_pass_seconds"].values())
    assert profile["draft_step_seconds"] > 0
    table = format_table(profile)
    single = profile["target_pass_seconds"]["1"]
    four = profile["target_pass_seconds"]["4"]
    assert f"{4:>5}  {four:>9.4f}  {four / single:>8.2f}" in table  # ratio to n = 1, recomputed
    assert "cost ratio c" in table
    paths = write_profile(tmp_path, profile, {"command": "test"})
    assert [path.name for path in paths] == [PROFILE_JSON, PROFILE_PNG]
    assert json.loads((tmp_path / PROFILE_JSON).read_text())["target_pass_seconds"] == profile["target_pass_seconds"]
    assert (tmp_path / PROFILE_PNG).read_bytes()[:4] == b"\x89PNG"


def test_profile_leaves_the_target_cache_empty(pipe):
    run_profile(pipe, (1, 2), context_tokens=8, repeats=1, with_draft=False)
    assert pipe.target.cache_len == 0


def test_cli_profile_prints_the_table_and_writes_the_files(pipe, monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(duospec, "load", lambda *a, **k: pipe)
    stale = 99.0
    pipe.costs.target_costs, pipe.costs.draft_step = {1: stale, 2: stale}, stale  # stale figures the budget holds
    assert main(["profile", "--sizes", "1,2", "--context", "8", "--repeats", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "one pass over n new tokens after 8 cached ones" in printed and "cost ratio c" in printed
    assert "renewed the draft budget's measured costs" in printed
    assert pipe.costs.draft_step_seconds() != stale  # renewed from the measurement, not kept
    assert all(seconds != stale for seconds in pipe.costs.target_profile().target_pass_seconds.values())
    assert (tmp_path / PROFILE_PNG).exists()
    assert "--sizes 1,2 --context 8 --repeats 1" in json.loads((tmp_path / PROFILE_JSON).read_text())["meta"]["command"]


def test_cli_profile_refuses_bad_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["profile", "--sizes", "1,0"])
    assert "sizes must be positive integers" in capsys.readouterr().err
