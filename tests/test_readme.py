"""The README's Python examples run: every ```python block of README.md is
executed, in order, in one shared namespace (later blocks use names from
earlier ones), with the repository root as the working directory.

A block that cannot run in the test suite (e.g. it talks to a server that
is not running) is left out only when the line just above its opening
fence says so, with a reason:

    <!-- readme-test: skip (needs a running server) -->

The test names every block it leaves out, and fails if fewer than
MIN_BLOCKS blocks ran, so it cannot pass by finding nothing.
"""

from __future__ import annotations

import re
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
README = REPO_ROOT / "README.md"
MIN_BLOCKS = 3

FENCE = re.compile(r"^(?P<indent>[ ]{0,3})(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`\n]*)$")
SKIP = re.compile(r"^<!--\s*readme-test:\s*skip\b\s*(?P<reason>.*?)\s*-->$")


@dataclass
class Block:
    number: int       # 1-based, counting every ```python block of the file
    line: int         # line of the opening fence (1-based)
    source: str
    skip_reason: str | None = None


def python_blocks(text: str) -> list[Block]:
    """Every fenced block whose info string starts with the word ``python``,
    in file order (CommonMark fences: ``` or ~~~, closed by a fence of the
    same character at least as long)."""
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        fence, info = match.group("fence"), match.group("info").strip()
        start = i
        body = []
        i += 1
        while i < len(lines):
            close = FENCE.match(lines[i])
            if close and close.group("fence")[0] == fence[0] and len(close.group("fence")) >= len(fence) \
                    and not close.group("info").strip():
                break
            body.append(lines[i])
            i += 1
        i += 1  # past the closing fence
        if (info.split() or [""])[0].lower() != "python":
            continue
        previous = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        skip = SKIP.match(previous)
        reason = None
        if skip:
            reason = skip.group("reason").strip("() ") or "no reason given"
        blocks.append(Block(len(blocks) + 1, start + 1, "\n".join(body) + "\n", reason))
    return blocks


def test_python_blocks_are_collected():
    text = "a\n```python\nx = 1\n```\n<!-- readme-test: skip (server) -->\n```python\ny\n```\n```bash\nz\n```\n"
    blocks = python_blocks(text)
    assert [(b.number, b.line, b.source, b.skip_reason) for b in blocks] == [
        (1, 2, "x = 1\n", None), (2, 6, "y\n", "server")]


def test_readme_python_blocks_run(monkeypatch, capsys):
    blocks = python_blocks(README.read_text(encoding="utf-8"))
    to_run = [b for b in blocks if b.skip_reason is None]
    skipped = [b for b in blocks if b.skip_reason is not None]
    assert len(to_run) >= MIN_BLOCKS, (
        f"README.md: only {len(to_run)} runnable ```python blocks found (of {len(blocks)}); "
        f"expected at least {MIN_BLOCKS}")
    monkeypatch.chdir(REPO_ROOT)
    namespace: dict = {"__name__": "__readme__"}
    for block in to_run:
        failure = None
        try:
            code = compile(block.source, f"README.md, python block {block.number} (line {block.line})", "exec")
            exec(code, namespace)  # noqa: S102 - the README's own examples
        except Exception:  # noqa: BLE001 - report any failure with the block that raised it
            failure = traceback.format_exc()
        if failure is not None:
            pytest.fail(f"README.md python block {block.number} (line {block.line}) failed:\n"
                        f"{block.source}\n{failure}", pytrace=False)
    with capsys.disabled():
        for block in skipped:
            print(f"\nREADME.md python block {block.number} (line {block.line}) not run: {block.skip_reason}",
                  file=sys.stderr)
