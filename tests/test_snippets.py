"""Every shell and Python block of the README and of docs/ runs, as written, on tiny settings.

A block runs in a fresh folder holding a copy of examples/ (a bash block with `set -e`, a
Python block as a script). An HTML comment on the line before a block may adjust it, with
directives separated by ";":

- `skip: REASON` (alone): not run, the reason reported (the set-up commands, two machines);
- `args ARGS`: ARGS appended to every `leantrain` call of the block (`--epochs 1`);
- `sub OLD => NEW`: text replaced before the block runs (a budget of 420 s made 25 s);
- `cd DIR`: run from DIR; `path DIR`: DIR on the Python path (Python blocks).

Blocks without a language (sample outputs) are not code. The count of blocks found, run and
skipped is printed in the test output (`-s`).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]  # results/ too
BLOCK = re.compile(r"(?ms)^(?:<!-- snippet: (?P<marker>[^\n]*?) -->\n)?```(?P<lang>bash|python)\n"
                   r"(?P<code>.*?)^```")
TIMEOUT_S = 300


@dataclass
class Snippet:
    page: str
    line: int
    lang: str
    code: str
    marker: str

    @property
    def name(self) -> str:
        return f"{self.page}:{self.line}"

    def directives(self) -> list[tuple[str, str]]:
        if self.marker.startswith("skip:"):  # the reason is all the rest, ";" included
            return [("skip", self.marker[5:].strip())]
        found = []
        for part in filter(None, (p.strip() for p in self.marker.split(";"))):
            word, _, rest = part.partition(" ")
            found.append((word.rstrip(":"), rest.strip()))
        return found


def snippets() -> list[Snippet]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            line = text[:match.start("lang")].count("\n") + 1
            found.append(Snippet(str(page.relative_to(ROOT)), line, match["lang"],
                                 match["code"], match["marker"] or ""))
    return found


ALL = snippets()


def test_the_pages_hold_the_blocks_this_test_runs(capsys):
    skipped = [s for s in ALL if any(d == "skip" for d, _ in s.directives())]
    with capsys.disabled():
        print(f"\nsnippets: {len(ALL)} code blocks in {len(PAGES)} pages; "
              f"{len(ALL) - len(skipped)} run, {len(skipped)} skipped: " +
              "; ".join(f"{s.name} ({dict(s.directives())['skip']})" for s in skipped))
    assert len(ALL) >= 15
    for s in skipped:
        assert dict(s.directives())["skip"], f"{s.name}: a skip needs its reason"


def _prepare(snippet: Snippet, folder: Path) -> tuple[str, Path, dict[str, str]]:
    code, cwd, extra_args = snippet.code, folder, ""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")])))
    for word, rest in snippet.directives():
        if word == "sub":
            old, _, new = rest.partition(" => ")
            assert old in code, f"{snippet.name}: sub {old!r} does not occur in the block"
            code = code.replace(old, new)
        elif word == "args":
            extra_args = rest
        elif word == "cd":
            cwd = folder / rest
        elif word == "path":
            env["PYTHONPATH"] = os.pathsep.join([str(folder / rest), env["PYTHONPATH"]])
        else:
            raise AssertionError(f"{snippet.name}: unknown directive {word!r}")
    if snippet.lang == "bash":
        leantrain = shutil.which("leantrain") or f"{sys.executable} -m leantrain"
        code = (f"set -euo pipefail\nleantrain() {{ {leantrain} \"$@\" {extra_args}; }}\n"
                f"export -f leantrain\n{code}")
    return code, cwd, env


@pytest.mark.slow
@pytest.mark.parametrize("snippet", ALL, ids=[s.name for s in ALL])
def test_the_block_runs_as_written(snippet, tmp_path):
    reason = dict(snippet.directives()).get("skip")
    if reason:
        pytest.skip(reason)
    shutil.copytree(ROOT / "examples", tmp_path / "examples",
                    ignore=shutil.ignore_patterns("runs", "__pycache__"))
    code, cwd, env = _prepare(snippet, tmp_path)
    command = ["bash", "-c", code] if snippet.lang == "bash" else [sys.executable, "-c", code]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert done.returncode == 0, (f"{snippet.name} exited {done.returncode}:\n"
                                  f"{done.stdout[-1500:]}\n{done.stderr[-3000:]}")
