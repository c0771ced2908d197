"""MkDocs hook: where the figures come from, built from `benchmarks/` at every docs build, so
each figure's script, machine and date come from the files themselves (never typed twice).

- The Benchmarks page's table: for each script, its docstring's first paragraph, and each of
  its committed results with the machine the file records and the date git last committed it.
- Every other page that cites a script (`benchmarks/NAME.py`) ends with the same rows for the
  scripts it cites, so a figure's machine and date are on the page that shows it.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- benchmarks-table -->"


def _machine(data) -> str:
    found = (data.get("machine") or data.get("device")) if isinstance(data, dict) else None
    if isinstance(found, dict):
        found = found.get("cpu") or found.get("gpu") or found.get("device")
    return str(found) if found else "machine not recorded in the file"


def _committed(path: Path) -> str:
    done = subprocess.run(["git", "log", "-1", "--format=%cs", "--", str(path)], cwd=ROOT,
                          capture_output=True, text=True)
    return done.stdout.strip() or "not committed"


CITED = re.compile(r"benchmarks/(\w+)\.py")


def table(only: set[str] | None = None, up: str = "") -> str:
    """The rows; `up` leads the links back to the docs root from a page in a subfolder."""
    rows = ["| script | what it measures | results (machine, date committed) |",
            "| --- | --- | --- |"]
    for script in sorted((ROOT / "benchmarks").glob("*.py")):
        if only is not None and script.stem not in only:
            continue
        doc = ast.get_docstring(ast.parse(script.read_text())) or ""
        what = " ".join(doc.split("\n\n")[0].split())
        results = []
        for path in sorted((ROOT / "benchmarks" / "results").glob(f"{script.stem}.*")):
            if path.suffix == ".json":
                label = _machine(json.loads(path.read_text()))
            elif path.suffix == ".png":
                label = "chart"
            else:
                continue
            results.append(f"[`{path.name}`]({up}results/{path.name}) ({label}, "
                           f"{_committed(path)})")
        rows.append(f"| `benchmarks/{script.name}` | {what} | "
                    f"{'<br>'.join(results) or 'see results/gpu_h100/'} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, **_) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, table())
    up = "../" * page.file.src_uri.count("/")
    cited = {name for name in CITED.findall(markdown)
             if (ROOT / "benchmarks" / f"{name}.py").exists()}
    if not cited:
        return markdown
    return (f"{markdown.rstrip()}\n\n## Where these figures come from\n\n"
            f"{table(cited, up)}\n\nAll of them: [Benchmarks]({up}benchmarks.md).\n")
