"""Every ```python block in README.md and docs/*.md runs as written.

Blocks may use top-level ``await`` (as in an async REPL): they are then run on an
anyio event loop.
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import anyio
import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCKS = [
    pytest.param(block, id=f"{page.name}:{n}")
    for page in PAGES
    for n, block in enumerate(re.findall(r"```python\n(.*?)```", page.read_text(), re.S))
]


@pytest.mark.parametrize("code", BLOCKS)
def test_doc_example_runs(code: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # examples may write files (traces, pictures)
    compiled = compile(code, "<doc>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    namespace = {"__name__": "__doc_example__"}
    if compiled.co_flags & inspect.CO_COROUTINE:
        async def main() -> None:
            await eval(compiled, namespace)

        anyio.run(main)
    else:
        exec(compiled, namespace)
