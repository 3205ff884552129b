"""`python -m sfr_cli.sadtalker [sfr options] path/to/SadTalker/inference.py [inference.py flags]`: runs the
`sfr` program as `sfr sadtalker ...`, so errors become exit codes where they do for every sfr command."""

import runpy
import sys

if __name__ == "__main__":
    sys.argv = ["sfr", "sadtalker", *sys.argv[1:]]
    runpy.run_module("sfr_cli.cli", run_name="__main__", alter_sys=True)
