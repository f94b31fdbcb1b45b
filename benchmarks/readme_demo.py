"""Run `make demo` and put its output at the top of README.md (between the demo markers), so
the first screen a reader sees is a real run. Rerun whenever the demo's output changes.

    .venv/bin/python benchmarks/readme_demo.py
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from graphprune.io import write_text_atomic  # noqa: E402

START, END = "<!-- demo:start", "<!-- demo:end -->"


def demo_output() -> str:
    run = subprocess.run(
        ["make", "--no-print-directory", "demo"], cwd=ROOT, capture_output=True, text=True
    )
    if run.returncode:
        raise SystemExit(f"make demo failed:\n{run.stdout}\n{run.stderr}")
    lines = []
    for line in run.stdout.splitlines():
        if re.match(r"^\S*bin/graphprune ", line):  # a command make echoed: show it as typed
            line = "$ " + re.sub(r"^\S*bin/", "", line)
        if lines or line.startswith("$ "):  # setup make may run first is not the demo
            lines.append(line.rstrip())
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text(encoding="utf-8")
    head, _, rest = text.partition(START)
    marker_line, _, rest = rest.partition("\n")
    _, _, tail = rest.partition(END)
    block = f"{START}{marker_line}\n```text\n{demo_output()}\n```\n{END}"
    write_text_atomic(readme, head + block + tail)
    print(f"updated the demo block of {readme}")


if __name__ == "__main__":
    main()
