"""What the project says about itself holds: the README's claims (expression-scale limit, how torch is
installed), setup.cfg's Python against what the code and tests use, and tests that hold on any machine."""

import ast
import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def python_floor():
    """setup.cfg's python_requires lower bound as (major, minor)."""
    config = configparser.ConfigParser()
    config.read(REPO / "setup.cfg")
    match = re.fullmatch(r">=\s*(\d+)\.(\d+)", config["options"]["python_requires"].strip())
    assert match, config["options"]["python_requires"]
    return int(match.group(1)), int(match.group(2))


def test_python_requires_is_what_the_tests_and_the_pinned_torch_need():
    """tests/test_imports.py uses sys.stdlib_module_names (Python 3.10); the Makefile pins torch 2.13.0,
    whose wheels need 3.10. setup.cfg must not promise less."""
    floor = python_floor()
    assert floor >= (3, 10), f"setup.cfg says Python >= {floor}; the tests and torch 2.13.0 need 3.10"
    assert "sys.stdlib_module_names" in (REPO / "tests" / "test_imports.py").read_text()
    assert "torch==2.13.0" in (REPO / "Makefile").read_text()
    from importlib import metadata

    if metadata.version("torch").split("+")[0] == "2.13.0":  # the pinned torch: its own floor
        required = re.search(r">=\s*(\d+)\.(\d+)", metadata.metadata("torch")["Requires-Python"] or "")
        assert required and floor >= (int(required.group(1)), int(required.group(2)))


def test_readme_states_the_expression_scale_limit_the_cli_enforces():
    from sfr_cli.cli import sfr
    from sfr_cli.coeffs import MAX_ABS_EXPRESSION_SCALE

    row = next(line for line in README.splitlines() if line.startswith("| `--expression-scale"))
    assert "any finite number" not in row
    assert f"{MAX_ABS_EXPRESSION_SCALE:g}" in row
    for value, exit_code in ((str(MAX_ABS_EXPRESSION_SCALE * 1.001), 2), ("nan", 2)):
        result = CliRunner().invoke(sfr, ["render", "--coeffs", "x.npy", "--source", "f.png",
                                          "--expression-scale", value])
        assert result.exit_code == exit_code and "expression-scale" in result.output


def make_dry_run(*variables):
    if shutil.which("make") is None:
        pytest.skip("needs make")
    result = subprocess.run(["make", "-n", "-B", "-C", str(REPO), "install", *variables], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [line for line in result.stdout.splitlines() if "pip install" in line]


def test_make_install_takes_the_cpu_wheel_index_only_when_asked():
    torch_line, package_line = make_dry_run()
    assert "'torch==2.13.0'" in torch_line and "-c constraints.txt" in torch_line
    assert "index-url" not in torch_line + package_line  # the configured index, as before
    torch_line, package_line = make_dry_run(f"TORCH_INDEX={CPU_INDEX}")
    assert f"--index-url {CPU_INDEX} 'torch==2.13.0'" in torch_line
    assert "index-url" not in package_line  # sfr's own packages still come from the configured index
    assert f"make install TORCH_INDEX={CPU_INDEX}" in README
    assert "the CPU\nbuild, pinned" not in README and "the CPU build, pinned" not in README


def wall_clock_asserts(tree):
    """`assert` statements comparing an elapsed time (time.monotonic()/perf_counter()/time() minus
    something) with `<`/`<=`: a limit one machine meets and a slower one does not."""
    clocks = {"monotonic", "perf_counter", "time"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert) and isinstance(node.test, ast.Compare):
            left = node.test.left
            if (isinstance(left, ast.BinOp) and isinstance(left.op, ast.Sub) and isinstance(left.left, ast.Call)
                    and getattr(left.left.func, "attr", None) in clocks
                    and any(isinstance(op, (ast.Lt, ast.LtE)) for op in node.test.ops)):
                yield node.lineno


@pytest.mark.parametrize("path", sorted((REPO / "tests").glob("*.py")), ids=lambda p: p.name)
def test_tests_hold_on_any_machine(path):
    """No absolute path of one machine (the reference folder comes from the `reference_dir` fixture) and
    no wall-clock limit (speed is measured by `sfr bench`, not asserted)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    machine_paths = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Constant)
                     and isinstance(node.value, str) and re.match(r"/(work|home|Users|tmp)/", node.value)]
    assert not machine_paths, f"{path.name}: absolute paths of one machine on lines {machine_paths}"
    limits = list(wall_clock_asserts(tree))
    assert not limits, f"{path.name}: wall-clock limits on lines {limits}"


def test_the_wall_clock_check_sees_a_limit():
    code = "started = time.monotonic()\nrun()\nassert time.monotonic() - started < 5\n"
    assert list(wall_clock_asserts(ast.parse(code))) == [3]
