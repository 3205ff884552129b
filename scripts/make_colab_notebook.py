"""Write colab/sfr.ipynb from scripts/colab.sh: one notebook cell per step of the script, so the two never
drift apart (tests/test_colab.py checks that the committed notebook is what this writes).

The script's steps start with `# === NAME: what it does ===`. The `settings` step becomes a Python cell (a
dict of the same names and defaults, set into the environment, so every later cell sees them); `show`
becomes a Python cell that plays the newest video; every other step is a `%%bash` cell holding the step's
lines as they are in the script.

    python scripts/make_colab_notebook.py [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import List, Tuple

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "colab.sh"
NOTEBOOK = REPO / "colab" / "sfr.ipynb"
STEP = re.compile(r"^# === (\w+): (.*) ===$")
SETTING = re.compile(r'^export (\w+)="\$\{\1:-(.*)\}"(?:\s+#\s*(.*))?$')
BASH_PREAMBLE = "%%bash\nset -euo pipefail\n"
SHOW_CELL = """import glob, os
from IPython.display import Video

newest = max(glob.glob(os.path.join(os.environ["SFR_OUT"], "*.mp4")), key=os.path.getmtime)
print(newest)
Video(newest, embed=True, width=512)"""
INTRO_EXTRA = ("Runtime > Change runtime type > **T4 GPU** first. To keep finished videos across a disconnect, "
               "mount Drive (`from google.colab import drive; drive.mount('/content/drive')`) and point "
               "`SFR_OUT` at a Drive folder.")


def read_steps(script_text: str) -> Tuple[List[str], List[Tuple[str, str, List[str]]]]:
    """(the header's comment lines, [(name, what it does, its lines)]) of scripts/colab.sh."""
    lines = script_text.splitlines()
    header = [line[2:] if line.startswith("# ") else line[1:] for line in lines[1:] if line.startswith("#")
              and not STEP.match(line)]
    header = header[:header.index("") if "" in header else len(header)]
    steps: List[Tuple[str, str, List[str]]] = []
    for line in lines:
        match = STEP.match(line)
        if match:
            steps.append((match.group(1), match.group(2), []))
        elif steps:
            steps[-1][2].append(line)
    return header, [(name, what, _trimmed(body)) for name, what, body in steps]


def _trimmed(body: List[str]) -> List[str]:
    while body and not body[-1].strip():
        body = body[:-1]
    return body


def read_settings(body: List[str]) -> List[Tuple[str, str, str]]:
    """[(NAME, default, comment)] of the settings step's `export NAME="${NAME:-default}"  # comment` lines."""
    settings = []
    for line in body:
        match = SETTING.match(line)
        if not match:
            raise ValueError(f"settings line is not `export NAME=\"${{NAME:-default}}\"  # comment`: {line}")
        settings.append((match.group(1), match.group(2), match.group(3) or ""))
    return settings


def settings_cell(settings: List[Tuple[str, str, str]]) -> str:
    width = max(len(json.dumps(default)) + len(name) for name, default, _ in settings) + 8
    rows = [f'    "{name}": {json.dumps(default)},'.ljust(width) + (f"  # {comment}" if comment else "")
            for name, default, comment in settings]
    return ("import os\n\nSETTINGS = {  # scripts/colab.sh's settings: edit the values, then run the cells below\n"
            + "\n".join(row.rstrip() for row in rows)
            + "\n}\nfor name, value in SETTINGS.items():  # in order: later values may use earlier ones ($SFR_WORK)\n"
              "    os.environ[name] = os.path.expandvars(value)")


def _cell(kind: str, source: str) -> dict:
    cell = {"cell_type": kind, "metadata": {}, "source": source.splitlines(keepends=True)}
    if kind == "code":
        cell.update(execution_count=None, outputs=[])
    return cell


def build_notebook(script_text: str) -> dict:
    header, steps = read_steps(script_text)
    cells = [_cell("markdown", "# sfr on Colab\n\n" + " ".join(header) + "\n\n" + INTRO_EXTRA)]
    for name, what, body in steps:
        cells.append(_cell("markdown", f"## {name}\n\n{what}."))
        if name == "settings":
            cells.append(_cell("code", settings_cell(read_settings(body))))
        elif name == "show":
            cells.append(_cell("code", SHOW_CELL))
        else:
            cells.append(_cell("code", BASH_PREAMBLE + "\n".join(body)))
    return {"cells": cells, "metadata": {"accelerator": "GPU", "colab": {"gpuType": "T4", "provenance": []},
                                         "kernelspec": {"display_name": "Python 3", "name": "python3"},
                                         "language_info": {"name": "python"}},
            "nbformat": 4, "nbformat_minor": 0}


def notebook_text(script_text: str) -> str:
    return json.dumps(build_notebook(script_text), indent=1, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="Exit 1 if colab/sfr.ipynb differs from what would be written.")
    args = parser.parse_args(argv)
    text = notebook_text(SCRIPT.read_text(encoding="utf-8"))
    if args.check:
        same = NOTEBOOK.is_file() and NOTEBOOK.read_text(encoding="utf-8") == text
        print(f"{NOTEBOOK}: {'up to date' if same else 'differs from scripts/colab.sh; run scripts/make_colab_notebook.py'}")
        return 0 if same else 1
    NOTEBOOK.parent.mkdir(parents=True, exist_ok=True)
    NOTEBOOK.write_text(text, encoding="utf-8")
    print(NOTEBOOK)
    return 0


if __name__ == "__main__":
    sys.exit(main())
