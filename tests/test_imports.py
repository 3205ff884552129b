"""STYLE.md's import directions, checked with `ast`, and `sfr --help` without torch."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sfr_cli"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}

# Which sfr_cli modules each module may import (STYLE.md's table); nets/* may import each other only.
ALLOWED_INTERNAL = {
    "sfr_cli": set(),
    "sfr_cli.errors": set(),
    "sfr_cli.modes": {"errors"},
    "sfr_cli.outputs": {"errors"},
    "sfr_cli.config": {"errors", "modes"},
    "sfr_cli.checkpoints": {"nets", "config", "errors", "modes", "outputs"},
    "sfr_cli.coeffs": {"errors", "modes"},
    "sfr_cli.engine": {"nets", "checkpoints", "config", "errors"},
    "sfr_cli.media": {"errors", "outputs"},
    "sfr_cli.progress": set(),
}
FORBIDDEN_EXTERNAL = {
    "sfr_cli.errors": {"*"},
    "sfr_cli.modes": {"*"},
    "sfr_cli.outputs": {"*"},
    "sfr_cli.coeffs": {"torch"},
    "sfr_cli.media": {"torch", "rich"},
    "sfr_cli.engine": {"rich", "click"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path):
    """Absolute names of every module `path` imports (relative imports resolved), at any depth."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            if node.module is None:
                found.update(f"{prefix}.{alias.name}" for alias in node.names)
            else:
                found.add(prefix)
    return found


def internal_target(imported: str):
    """`sfr_cli.nets.mapping` -> `nets`; `sfr_cli.errors` -> `errors`; not sfr_cli -> None."""
    parts = imported.split(".")
    if parts[0] != "sfr_cli":
        return None
    return parts[1] if len(parts) > 1 else ""


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_import_directions(path):
    name = module_name(path)
    imports = imported_modules(path)
    internal = {t for t in (internal_target(i) for i in imports) if t is not None}
    external = {i.split(".")[0] for i in imports if internal_target(i) is None}

    assert "cli" not in internal, f"{name} imports sfr_cli.cli; nothing may"
    if name == "sfr_cli":
        assert imports == set(), f"sfr_cli/__init__.py must import nothing, imports {imports}"
    if name.startswith("sfr_cli.nets"):
        assert internal <= {"nets"}, f"{name} imports {internal - {'nets'}}; nets import only torch and each other"
        assert external - STDLIB <= {"torch"}, f"{name} imports {external - STDLIB - {'torch'}}"
    if name in ALLOWED_INTERNAL:
        extra = internal - ALLOWED_INTERNAL[name] - {name.rpartition(".")[2]}
        assert not extra, f"{name} imports sfr_cli.{sorted(extra)[0]}; STYLE.md allows {ALLOWED_INTERNAL[name]}"
    forbidden = FORBIDDEN_EXTERNAL.get(name, set())
    if "*" in forbidden:
        assert external <= STDLIB, f"{name} may import only the standard library, imports {external - STDLIB}"
    else:
        assert not external & forbidden, f"{name} imports {external & forbidden}"


def test_the_rules_see_relative_imports():
    imports = imported_modules(PACKAGE / "checkpoints.py")
    assert "sfr_cli.errors" in imports and "sfr_cli.nets.mapping" in imports


def test_cli_and_help_do_not_import_torch():
    code = ("import sys\n"
            "import sfr_cli.cli as cli\n"
            "assert 'torch' not in sys.modules, 'import sfr_cli.cli imported torch'\n"
            "for args in (['--help'], ['render', '--help'], ['checkpoints', '--help'], ['bench', '--help']):\n"
            "    try:\n"
            "        cli.sfr.main(args, prog_name='sfr')\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 0, (args, exc.code)\n"
            "    assert 'torch' not in sys.modules, f'sfr {args} imported torch'\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
