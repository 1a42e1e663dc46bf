import sys
from pathlib import Path

import pytest

# Test helpers (tiny_models.py) live beside the tests and are imported by name.
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True, scope="session")
def _measured_costs_stay_in_a_temporary_directory(tmp_path_factory: pytest.TempPathFactory):
    """The budget caches measured costs on disk; tests must neither read a user's figures nor leave
    theirs (keyed by temporary model paths) in the user's cache."""
    import duospec.budget

    directory = tmp_path_factory.mktemp("profiles")
    original = duospec.budget.profiles_dir
    duospec.budget.profiles_dir = lambda: directory
    yield
    duospec.budget.profiles_dir = original


@pytest.fixture(autouse=True, scope="session")
def _no_draft_process_survives_the_suite():
    """Every test that starts a Duo draft process must stop it; a survivor fails the run here."""
    yield
    import multiprocessing

    survivors = [child for child in multiprocessing.active_children() if child.name == "duospec-draft"]
    for child in survivors:
        child.kill()
    assert not survivors, f"{len(survivors)} draft process(es) outlived their tests"
