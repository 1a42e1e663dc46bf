"""Kept cost figures stay honest: load detection, spot checks when read, online correction between requests.

Regression story (issue tracker): a first run on a busy machine measured the draft step at 1.46 s instead
of 0.047 s, kept it on disk, and every later run decoded at gamma 1 (0.73 tokens/s instead of about 9).

Setup: tiny in-memory models have no cost identity (CostBook.identity returns None, so nothing is kept),
so these tests give the pipeline one (`cost_identity`, `_draft_identity`) to exercise the disk path; the
profiles directory is the temporary one tests/conftest.py sets up. Load readings and, where a test needs
an exact timing, the spot check's clock are scripted through an injected LoadProbe, so the shared test
machine's real load cannot decide the outcome.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model, tiny_tokenizer

import duospec.budget.kept
from duospec.api import Pipeline
from duospec.budget.corrections import CostTracker, agrees, corrected_draft_step, corrected_target_costs, may_keep_correction
from duospec.budget.load import LoadProbe, LoadReading, under_load
from duospec.budget.model import CostProfile
from duospec.budget.policy import GammaPolicy
from duospec.models.hf import HFModel


class ScriptedClock:
    """A wall clock that advances `tick` seconds per reading (so every timed pass takes exactly `tick`),
    and a CPU clock that keeps 64 threads busy all along (a share of at least 1: no visible load)."""

    def __init__(self, tick: float) -> None:
        self.tick = tick
        self.now = 0.0

    def wall(self) -> float:
        self.now += self.tick
        return self.now

    def cpu(self) -> float:
        return 64 * self.now


def quiet_probe() -> LoadProbe:
    """Real wall clock; readings of a machine where our threads get all their CPU time and nobody queues."""
    return LoadProbe(cpu_clock=lambda: 64 * time.perf_counter(), load_average=lambda: 0.0, cores=2)


def busy_probe(clock: ScriptedClock | None = None) -> LoadProbe:
    """A load average of 99 on 2 cores: every reading is under visible load."""
    if clock is None:
        return LoadProbe(load_average=lambda: 99.0, cores=2)
    return LoadProbe(cpu_clock=clock.cpu, wall_clock=clock.wall, load_average=lambda: 99.0, cores=2)


def kept_path(key: list[str]) -> Path:
    """Where cached_measurement keeps a figure: profiles_dir()/<sha256 of the key parts, 16 hex>.json."""
    return duospec.budget.kept.profiles_dir() / f"{hashlib.sha256('|'.join(key).encode()).hexdigest()[:16]}.json"


def write_kept(key: list[str], value: object) -> Path:
    """Put a figure on disk the way cached_measurement writes it."""
    path = kept_path(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "value": value}, indent=1))
    return path


def read_kept(key: list[str]) -> object:
    return json.loads(kept_path(key).read_text())["value"]


@pytest.fixture
def identity(request: pytest.FixtureRequest) -> str:
    """A cost identity of this test's own (the profiles directory is shared by the whole session)."""
    return f"tiny-{request.node.name}"


def keyed_pipeline(identity: str, probe: LoadProbe, with_draft: bool = True) -> Pipeline:
    """A tiny float32 pipeline whose target and draft have cost identities, so figures go to disk."""
    pipe = Pipeline(
        HFModel(tiny_model(seed=0)),
        tiny_tokenizer(),
        device=torch.device("cpu"),
        dtype=torch.float32,
        threads=torch.get_num_threads(),
        cost_identity=[identity, "target"],
    )
    if with_draft:
        pipe.attach_draft(HFModel(tiny_model(seed=1)))
        pipe._draft_identity = [identity, "draft"]  # in-memory drafts have none; this test needs the disk path
    pipe.costs.probe = probe
    pipe.verbose = True  # cost diagnostics are printed only when asked for
    return pipe


def draft_key(identity: str) -> list[str]:
    return [identity, "draft", "draft-step"]


def target_key(identity: str) -> list[str]:
    return [identity, "target", "target", *map(str, duospec.budget.kept.DEFAULT_TARGET_SIZES)]


def _no_full_measurement(*args, **kwargs):
    raise AssertionError("a kept figure that agrees must not be measured again")


def _fast_target_curve(model, sizes, *args, **kwargs) -> dict[int, float]:
    """Stands in for measure_target_costs: its full run (36 passes and more) costs seconds on a loaded
    2-core machine, and these tests are about what happens to its result, not about the measurement."""
    return {n: 0.001 * (1 + n / 8) for n in sizes}


# -- the load rule -------------------------------------------------------------------------------------
def test_under_load_rules():
    quiet = LoadReading(cpu_seconds=1.8, wall_seconds=1.0, threads=2, load_average=1.0, cores=2)
    assert not under_load(quiet)  # share 0.9: every thread ran
    assert under_load(LoadReading(1.0, 1.0, 2, 1.0, 2))  # share 0.5: half our threads' time spent waiting
    assert under_load(LoadReading(1.8, 1.0, 2, 3.5, 2))  # 1.75 runnable threads per core over the last minute
    assert not under_load(LoadReading(1.8, 1.0, 2, 2.9, 2))  # up to 1.5 per core: our own threads may be that
    # On an accelerator the CPU waits for the device: a low share means nothing there (not "under load").
    assert not under_load(LoadReading(0.1, 1.0, 2, 1.0, 2, cpu_bound=False))
    assert under_load(LoadReading(0.1, 1.0, 2, 9.0, 2, cpu_bound=False))  # but a queueing CPU still counts


def test_probe_reads_around_a_measurement():
    clock = ScriptedClock(tick=0.5)
    probe = LoadProbe(cpu_clock=clock.cpu, wall_clock=clock.wall, load_average=lambda: 0.25, cores=4)
    value, reading = probe.watch(lambda: "done", HFModel(tiny_model(seed=0)))
    assert value == "done"
    assert reading.wall_seconds == pytest.approx(0.5) and reading.load_average == 0.25 and reading.cores == 4
    assert reading.cpu_bound and not under_load(reading)


def test_agreement_factor_is_symmetric():
    assert agrees(1.0, 1.5) and agrees(1.0, 1 / 1.5)
    assert not agrees(1.0, 1.51) and not agrees(1.0, 0.66)
    assert not agrees(0.047, 1.46) and not agrees(1.46, 0.047)


# -- spot check of a kept figure -----------------------------------------------------------------------
def test_kept_draft_step_of_1_46_s_from_a_busy_first_run_is_replaced(identity, capsys):
    """The issue's story: 1.46 s kept on disk, the real step takes milliseconds. Reading the kept figure
    spot-checks it, measures again in full and keeps the new figure; the budget drafts again."""
    write_kept(draft_key(identity), 1.46)
    pipe = keyed_pipeline(identity, quiet_probe())
    step = pipe.costs.draft_step_seconds()
    assert step < 1.46 / 1.5  # not 1.46: a tiny model's step takes milliseconds
    assert read_kept(draft_key(identity)) == step  # and it replaced the kept one
    assert "disagrees with a spot check" in capsys.readouterr().err
    # What that figure meant: on a profile where a draft pays, 1.46 s forbids drafting, the new one does not.
    profile = CostProfile({1: 0.1, 2: 0.1, 4: 0.11, 8: 0.15})
    assert GammaPolicy(profile, 1.46).next_budget().max_tokens == 0
    assert GammaPolicy(profile, step).next_budget().max_tokens > 1


def test_kept_target_curve_that_is_far_too_slow_is_replaced(identity, monkeypatch):
    """The spot check (real one-token passes of the tiny target, milliseconds) against a kept t(1) of 3.1 s."""
    monkeypatch.setattr(duospec.budget.kept, "measure_target_costs", _fast_target_curve)
    sizes = duospec.budget.kept.DEFAULT_TARGET_SIZES
    write_kept(target_key(identity), {str(n): 3.0 + 0.1 * n for n in sizes})
    pipe = keyed_pipeline(identity, quiet_probe(), with_draft=False)
    profile = pipe.costs.target_profile()
    assert profile.target_pass(1) < 3.0 / 1.5
    assert read_kept(target_key(identity)) == {str(n): s for n, s in profile.target_pass_seconds.items()}


def test_kept_figure_that_agrees_is_left_alone(identity, monkeypatch):
    """A spot check of exactly 10 ms per step (scripted clock) against a kept 12 ms: the file's bytes stay
    as they are and no full measurement runs."""
    path = write_kept(draft_key(identity), 0.012)
    before = path.read_bytes()
    clock = ScriptedClock(tick=0.010)
    pipe = keyed_pipeline(identity, LoadProbe(cpu_clock=clock.cpu, wall_clock=clock.wall, load_average=lambda: 0.0, cores=2))
    monkeypatch.setattr(duospec.budget.kept, "measure_draft_step", _no_full_measurement)
    assert pipe.costs.draft_step_seconds() == 0.012
    assert path.read_bytes() == before


def test_slower_spot_check_under_load_keeps_the_kept_figure(identity, monkeypatch):
    """Kept 1 ms, spot check 10 ms on a loaded machine: the machine is busy now, the kept figure is not
    wrong, and a full measurement now could not be kept anyway."""
    path = write_kept(draft_key(identity), 0.001)
    before = path.read_bytes()
    pipe = keyed_pipeline(identity, busy_probe(ScriptedClock(tick=0.010)))
    monkeypatch.setattr(duospec.budget.kept, "measure_draft_step", _no_full_measurement)
    assert pipe.costs.draft_step_seconds() == 0.001
    assert path.read_bytes() == before


# -- measurements under load ---------------------------------------------------------------------------
def test_figure_measured_under_load_serves_the_run_but_is_not_kept(identity, capsys, monkeypatch):
    monkeypatch.setattr(duospec.budget.kept, "measure_target_costs", _fast_target_curve)
    pipe = keyed_pipeline(identity, busy_probe())
    step = pipe.costs.draft_step_seconds()
    profile = pipe.costs.target_profile()
    assert step > 0 and profile.target_pass(1) > 0  # used for this run
    assert not kept_path(draft_key(identity)).exists()
    assert not kept_path(target_key(identity)).exists()
    assert "not kept on disk" in capsys.readouterr().err


def test_figure_measured_quietly_is_kept(identity):
    pipe = keyed_pipeline(identity, quiet_probe())
    step = pipe.costs.draft_step_seconds()
    assert read_kept(draft_key(identity)) == step


def test_under_load_replacement_of_a_wrong_kept_figure_is_not_kept(identity):
    """Kept 1.46 s, spot check in milliseconds (believed: load never makes a pass faster), but the full
    measurement then runs under load: it serves this run, the file keeps waiting for a quiet one."""
    path = write_kept(draft_key(identity), 1.46)
    before = path.read_bytes()
    pipe = keyed_pipeline(identity, busy_probe())
    assert pipe.costs.draft_step_seconds() < 1.0
    assert path.read_bytes() == before


# -- online correction ---------------------------------------------------------------------------------
def test_tracker_keeps_medians_of_sizes_with_enough_samples():
    tracker = CostTracker(window=32)
    for seconds in (0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 9.0):  # one outlier among 8
        tracker.target_pass(1, seconds)
    for _ in range(7):
        tracker.target_pass(4, 0.2)  # 7 samples: not enough
    tracker.target_pass(0, 1.0)  # ignored: no tokens
    assert tracker.target_medians() == {1: pytest.approx(0.1)}
    for _ in range(8):
        tracker.draft_steps(4, 0.2)  # 4 steps in 0.2 s: one sample of 0.05 s
    tracker.draft_steps(0, 0.3)  # a round without drafting
    assert tracker.draft_step_median() == pytest.approx(0.05)
    tracker.clear_draft()
    assert tracker.draft_step_median() is None


def test_target_curve_is_scaled_as_a_whole_by_the_median_ratio():
    """Observed sizes 1, 2 and 7 run 2x, 3x and 2x the kept curve (7 interpolated between 6 and 8):
    the whole curve, unobserved sizes included, is scaled by the median ratio 2, keeping its shape.
    Not a per-size replacement ({1: 0.2, 2: 0.3, 4: 0.12, ...}), whose kinks would bias gamma."""
    profile = CostProfile({1: 0.1, 2: 0.1, 4: 0.12, 6: 0.14, 8: 0.16, 16: 0.3})
    tracker = CostTracker()
    for _ in range(8):
        tracker.target_pass(1, 0.2)
        tracker.target_pass(2, 0.3)
        tracker.target_pass(7, 0.3)
    for _ in range(7):
        tracker.target_pass(4, 10.0)  # too few samples to count
    for _ in range(8):
        tracker.target_pass(40, 10.0)  # past the measured sizes: an extrapolation, not compared
    corrected = corrected_target_costs(profile, tracker)
    assert corrected == pytest.approx({1: 0.2, 2: 0.2, 4: 0.24, 6: 0.28, 8: 0.32, 16: 0.6})


def test_target_curve_within_the_factor_stands():
    profile = CostProfile({1: 0.1, 4: 0.12})
    tracker = CostTracker()
    for _ in range(8):
        tracker.target_pass(1, 0.14)  # 1.4x: within the factor
    assert corrected_target_costs(profile, tracker) is None
    assert corrected_target_costs(profile, CostTracker()) is None  # nothing observed


def test_draft_step_correction_needs_a_disagreement():
    tracker = CostTracker()
    for _ in range(8):
        tracker.draft_steps(1, 0.047)
    assert corrected_draft_step(1.46, tracker) == pytest.approx(0.047)
    assert corrected_draft_step(0.05, tracker) is None


def test_corrections_under_load_are_kept_only_when_faster_than_the_kept_figure():
    assert may_keep_correction(0.047, 1.46, loaded=True)  # load never makes a pass faster
    assert not may_keep_correction(1.46, 0.047, loaded=True)
    assert may_keep_correction(1.46, 0.047, loaded=False)
    assert not may_keep_correction(0.047, None, loaded=True)  # nothing on disk to be faster than
    assert may_keep_correction(0.047, None, loaded=False)


BUSY = LoadReading(cpu_seconds=0.5, wall_seconds=1.0, threads=2, load_average=0.0, cores=2)


def poisoning_replay(identity: str) -> tuple[Pipeline, Path, bytes]:
    """The issue's sequence: the disk holds the quiet curve (t(1) = 0.069 s); a busy request has scaled
    the curve in memory by 38.26 (rightly not kept); the next busy request tracks passes at 0.64 of
    that inflated figure, which is faster than memory but 24x the truth."""
    quiet = {n: 0.069 * (1 + 0.5 * (n - 1)) for n in duospec.budget.kept.DEFAULT_TARGET_SIZES}
    path = write_kept(target_key(identity), {str(n): s for n, s in quiet.items()})
    pipe = keyed_pipeline(identity, quiet_probe(), with_draft=False)
    pipe.costs.target_costs = {n: 38.26 * s for n, s in quiet.items()}  # in memory only
    for _ in range(8):
        pipe.costs.tracker.target_pass(1, 0.64 * 38.26 * 0.069)
    return pipe, path, path.read_bytes()


def test_a_busy_machine_cannot_poison_the_kept_curve(identity, capsys):
    pipe, path, before = poisoning_replay(identity)
    pipe.costs.reconcile(BUSY)
    assert pipe.costs.target_profile().target_pass(1) == pytest.approx(0.64 * 38.26 * 0.069)  # this process adapts
    assert path.read_bytes() == before  # the disk keeps the quiet figure
    assert "not kept on disk" in capsys.readouterr().err


def test_control_judging_against_the_figure_in_memory_poisons_the_disk(identity, monkeypatch):
    """The old rule (a busy correction is kept when faster than the figure in memory) fails the replay."""
    import duospec.budget.book

    pipe, path, before = poisoning_replay(identity)
    in_memory = pipe.costs.target_costs[1]
    monkeypatch.setattr(duospec.budget.book, "may_keep_correction", lambda new, kept, loaded: not loaded or new < in_memory)
    pipe.costs.reconcile(BUSY)
    assert path.read_bytes() != before
    assert read_kept(target_key(identity))["1"] > 20 * 0.069


def test_a_busy_draft_step_correction_is_judged_against_the_disk(identity):
    path = write_kept(draft_key(identity), 0.04)
    before = path.read_bytes()
    pipe = keyed_pipeline(identity, quiet_probe())
    pipe.costs.draft_step = 1.5  # inflated in memory by an earlier busy request, never kept
    for _ in range(8):
        pipe.costs.tracker.draft_steps(1, 0.9)  # faster than memory, 22x the kept figure
    pipe.costs.reconcile(BUSY)
    assert pipe.costs.draft_step == pytest.approx(0.9) and path.read_bytes() == before


def test_one_generation_replaces_a_kept_1_46_s_draft_step(identity):
    """The issue's story, online: the pipeline runs with a kept 1.46 s draft step (here set as read from
    disk), the engines report steps of 0.047 s, and finishing the request corrects the figure in memory
    and on disk for the next request."""
    write_kept(draft_key(identity), 1.46)
    pipe = keyed_pipeline(identity, quiet_probe())
    pipe.costs.draft_step = 1.46  # as read from disk
    for _ in range(8):
        pipe.costs.tracker.draft_steps(2, 0.094)
    pipe.generate([3, 4, 5, 6], method="sd", gamma=2, max_new_tokens=4)  # fixed gamma: no measurement
    assert pipe.costs.draft_step_seconds() < 1.46 / 1.5
    assert read_kept(draft_key(identity)) == pipe.costs.draft_step_seconds()


def test_slower_correction_under_load_stays_in_memory(identity, capsys):
    path = write_kept(draft_key(identity), 0.01)
    before = path.read_bytes()
    pipe = keyed_pipeline(identity, quiet_probe())
    pipe.costs.draft_step = 0.01
    for _ in range(8):
        pipe.costs.tracker.draft_steps(1, 0.05)
    pipe.costs.reconcile(LoadReading(cpu_seconds=0.5, wall_seconds=1.0, threads=2, load_average=0.0, cores=2))
    assert pipe.costs.draft_step_seconds() == pytest.approx(0.05)  # this process adapts from the next request on
    assert path.read_bytes() == before  # but a figure slowed by load is never kept
    assert "not kept on disk" in capsys.readouterr().err


def test_agreeing_tracked_times_leave_the_kept_figures_alone(identity):
    draft_path = write_kept(draft_key(identity), 0.05)
    costs = {n: 0.1 + 0.01 * n for n in duospec.budget.kept.DEFAULT_TARGET_SIZES}
    target_path = write_kept(target_key(identity), {str(n): s for n, s in costs.items()})
    before = draft_path.read_bytes(), target_path.read_bytes()
    pipe = keyed_pipeline(identity, quiet_probe())
    pipe.costs.draft_step, pipe.costs.target_costs = 0.05, dict(costs)
    for _ in range(8):
        pipe.costs.tracker.draft_steps(1, 0.06)
        pipe.costs.tracker.target_pass(1, 0.12)
    pipe.costs.reconcile()
    assert pipe.costs.draft_step == 0.05 and pipe.costs.target_costs == costs
    assert (draft_path.read_bytes(), target_path.read_bytes()) == before


def test_target_correction_is_kept_and_never_changes_a_running_request(identity):
    """A request's policy holds the profile it started with; a correction replaces the pipeline's figures
    (for the next request) without touching it, so a seeded request stays deterministic."""
    costs = {n: 0.1 + 0.01 * n for n in duospec.budget.kept.DEFAULT_TARGET_SIZES}
    write_kept(target_key(identity), {str(n): s for n, s in costs.items()})
    pipe = keyed_pipeline(identity, quiet_probe(), with_draft=False)
    pipe.costs.target_costs = dict(costs)
    running = pipe.costs.target_profile()
    for _ in range(8):
        pipe.costs.tracker.target_pass(1, 0.33)  # 3x the kept 0.11
    pipe.costs.reconcile()
    assert running.target_pass_seconds == costs
    assert pipe.costs.target_profile().target_pass(1) == pytest.approx(0.33)
    assert read_kept(target_key(identity)) == pytest.approx({str(n): 3 * s for n, s in costs.items()})
