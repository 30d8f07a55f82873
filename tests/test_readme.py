"""The README's two commands are what CI runs, and its Python example runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _start_here_commands() -> list[str]:
    section = README.split("## Start here", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_starts_with_two_commands():
    commands = _start_here_commands()
    assert len(commands) == 2, commands
    install, test = commands
    assert "pip install" in install and "deformconv " in install
    assert re.search(r"&& pytest( -n \d+)?$", test.strip()), test


def test_ci_runs_the_readmes_install_and_test_commands():
    install, test = _start_here_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    pip_step = re.search(r'pip install -e "\.\[[a-z,]+\]"', install).group(0)
    assert pip_step in ci
    assert test.strip() in ci


def test_readme_python_example_runs():
    block = README.split("## Ten lines", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert tuple(namespace["y"].shape) == (1, 6, 9, 9)


def _tables(text: str) -> dict[str, list[str]]:
    """Markdown tables by header row, each as its list of rows."""
    tables: dict[str, list[str]] = {}
    rows: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            rows.append(line.strip())
        elif rows:
            tables[rows[0]] = rows
            rows = []
    return tables


def _as_in_docs(row: str) -> str:
    return row.replace("](docs/", "](").replace("](CHANGELOG.md)", "](changelog.md)")


def test_readme_tables_are_copies_of_the_docs():
    docs = {}
    for page in sorted((ROOT / "docs").glob("*.md")):
        docs.update(_tables(page.read_text()))
    readme = _tables(README)
    assert len(readme) >= 4  # layout, backends, results, documentation
    for header, rows in readme.items():
        assert header in docs, f"README table without a source in docs/: {header}"
        assert [_as_in_docs(r) for r in rows] == docs[header], header
