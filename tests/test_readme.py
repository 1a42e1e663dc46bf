"""The README's two commands are the ones CI runs, character for character."""

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def ci_commands() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [line for line in lines if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]


def test_ci_runs_exactly_the_readme_commands():
    readme = (REPO / "README.md").read_text()
    commands = ci_commands()
    assert len(commands) == 2, commands
    for command in commands:
        assert f"\n{command}\n" in readme, f"README lacks the CI command: {command}"


def test_readme_install_pins_the_cpu_torch():
    assert ci_commands()[0].startswith("pip install torch==2.13.0 && ")
