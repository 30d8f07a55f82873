"""Every ```python block of the documentation pages runs.

The blocks of one page run in order in one namespace, as a reader would paste them into
one session. A block preceded by ``<!-- requires: NAME -->`` runs only where ``NAME`` is
available: ``cuda`` (a CUDA device) or an importable module. ``<!-- skip: why -->`` skips
a block (kept for what needs long training).
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"

_BLOCK = re.compile(
    r"(?:<!--\s*(?P<directive>requires|skip):\s*(?P<arg>[^>]*?)\s*-->\s*\n)?"
    r"^```python\n(?P<code>.*?)^```\s*$",
    flags=re.M | re.S,
)

# Blocks known not to run on their own: (page, block index) -> reason. Strict, so a fixed
# block fails here until its entry is removed.
EXPECTED_FAILURES: dict[tuple[str, int], str] = {
    ("cpu.md", 0): "fragment: uses x, offset and weight without defining them",
}


@dataclass(frozen=True)
class Block:
    page: str
    index: int
    line: int
    code: str
    directive: str | None
    arg: str | None


def _blocks(path: Path) -> list[Block]:
    text = path.read_text()
    return [
        Block(
            page=path.name,
            index=i,
            line=text.count("\n", 0, m.start("code")) + 1,
            code=m.group("code"),
            directive=m.group("directive"),
            arg=m.group("arg"),
        )
        for i, m in enumerate(_BLOCK.finditer(text))
    ]


PAGES = {p.name: _blocks(p) for p in sorted(DOCS.glob("*.md"))}
BLOCKS = [b for blocks in PAGES.values() for b in blocks]


def _unavailable(block: Block) -> str | None:
    if block.directive == "skip":
        return block.arg or "skipped"
    if block.directive == "requires":
        if block.arg == "cuda":
            return None if torch.cuda.is_available() else "needs a CUDA device"
        if importlib.util.find_spec(block.arg or "") is None:
            return f"needs {block.arg}"
    return None


class _Session:
    """The namespace of one page and how many of its blocks have run in it."""

    def __init__(self) -> None:
        self.namespace: dict[str, Any] = {"__name__": "__docs__"}
        self.done = 0


_SESSIONS: dict[str, _Session] = {}


def _run(block: Block) -> None:
    code = compile("\n" * (block.line - 1) + block.code, str(DOCS / block.page), "exec")
    exec(code, _SESSIONS[block.page].namespace)  # noqa: S102


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(
            b,
            marks=[pytest.mark.xfail(strict=True, reason=EXPECTED_FAILURES[(b.page, b.index)])]
            if (b.page, b.index) in EXPECTED_FAILURES
            else [],
        )
        for b in BLOCKS
    ],
    ids=[f"{b.page}:{b.line}" for b in BLOCKS],
)
def test_docs_code_block_runs(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    reason = _unavailable(block)
    if reason:
        pytest.skip(reason)
    monkeypatch.chdir(tmp_path)  # blocks may write files
    session = _SESSIONS.setdefault(block.page, _Session())
    # Run the page's earlier blocks first when this one is selected alone (pytest -k).
    for earlier in PAGES[block.page][session.done : block.index]:
        if not _unavailable(earlier):
            _run(earlier)
    session.done = block.index + 1
    _run(block)


def test_every_page_is_in_the_site_navigation():
    nav = (ROOT / "mkdocs.yml").read_text().split("\nnav:", 1)[1]
    listed = set(re.findall(r":\s*([\w./-]+\.md)\s*$", nav, flags=re.M))
    missing = {p.name for p in DOCS.glob("*.md")} - listed
    assert not missing, f"docs pages missing from mkdocs.yml's nav: {sorted(missing)}"
