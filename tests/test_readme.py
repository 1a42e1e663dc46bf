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


def _python_block(section: str) -> str:
    readme = (REPO / "README.md").read_text()
    start = readme.index(section)
    block_start = readme.index("```python\n", start) + len("```python\n")
    return readme[block_start : readme.index("```", block_start)]


def test_the_python_api_example_prints_what_it_means(monkeypatch, capsys):
    """The README's API example, run on a tiny pipeline in place of the embedded pair: each print
    is a readable line, the stream ends its line before the next print."""
    import re

    import duospec
    from tiny_models import tiny_model, tiny_pipeline

    monkeypatch.setattr(duospec, "load", lambda *args, **kwargs: tiny_pipeline(tiny_model(0), chat=True))
    exec(compile(_python_block("## The Python API"), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    rate_line = next(i for i, line in enumerate(lines) if "tokens per pass" in line)
    assert re.fullmatch(r"[\d.]+ tok/s, [\d.]+ tokens per pass, \d+ drafted, \d+ accepted", lines[rate_line])
    assert re.fullmatch(r"acceptance: (None|[\d.]+)", lines[-1])
    assert not lines[-2].endswith("acceptance:")  # the stream's text ended its own line
