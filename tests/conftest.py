import os
import sys
from pathlib import Path

import pytest

# Test helpers (tiny_models.py) live beside the tests and are imported by name.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _measured_costs_stay_in_a_temporary_directory(tmp_path_factory: pytest.TempPathFactory):
    """The budget caches measured costs on disk; tests must neither read a user's figures nor leave
    theirs (keyed by temporary model paths) in the user's cache."""
    import duospec.budget.kept

    directory = tmp_path_factory.mktemp("profiles")
    original = duospec.budget.kept.profiles_dir
    duospec.budget.kept.profiles_dir = lambda: directory
    yield
    duospec.budget.kept.profiles_dir = original


@pytest.fixture(autouse=True, scope="session")
def _no_draft_process_survives_the_suite():
    """Every test that starts a Duo draft process must stop it; a survivor fails the run here."""
    yield
    import multiprocessing

    survivors = [child for child in multiprocessing.active_children() if child.name == "duospec-draft"]
    for child in survivors:
        child.kill()
    assert not survivors, f"{len(survivors)} draft process(es) outlived their tests"


def _resident_mb() -> float:
    """This process's resident memory now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return 0.0


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """DUOSPEC_TEST_MEMORY_LOG=FILE: one line per test: resident MB of the pytest process after it, the
    process's peak so far, and the largest finished child's peak, to find what holds memory in a run."""
    yield
    path = os.environ.get("DUOSPEC_TEST_MEMORY_LOG")
    if path:
        import resource

        peak_self = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        peak_children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest waited-for child
        with open(path, "a") as handle:
            handle.write(f"{_resident_mb():.0f}\t{peak_self:.0f}\t{peak_children:.0f}\t{item.nodeid}\n")
