"""STYLE.md's import directions, checked with `ast` for every module of sfr_cli, and `sfr --help` without torch.

RULES is STYLE.md's table as data: for each module, the sfr_cli modules and the third-party packages it may
import (the standard library is always allowed, except where the rule says "nothing"). A module that has
no line in RULES fails the test, so a new module cannot slip by: its line says what the house lets it know.
"""

import ast
import subprocess
import sys
from pathlib import Path
from typing import FrozenSet, NamedTuple, Optional

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sfr_cli"
STDLIB = frozenset(sys.stdlib_module_names) | {"__future__"}
ANY = None  # no limit (cli.py only: it is the one place that knows the user)


class Rule(NamedTuple):
    internal: Optional[FrozenSet[str]]  # sfr_cli modules by first name under sfr_cli ("nets", "errors", ...)
    external: Optional[FrozenSet[str]]  # third-party top-level packages; the standard library always passes
    stdlib: bool = True  # False: not even the standard library


def rule(internal=(), external=(), stdlib=True) -> Rule:
    return Rule(frozenset(internal) if internal is not ANY else ANY,
                frozenset(external) if external is not ANY else ANY, stdlib)


# The modules the glue may compose ("the modules above" in STYLE.md): everything but the entry points.
LIBRARY = {"errors", "modes", "config", "outputs", "nets", "imaging", "checkpoints", "coeffs", "engine", "media",
           "progress", "stages"}

# One line per module (a `.*` line covers a subpackage). Keep it to what STYLE.md's table allows.
RULES = {
    "sfr_cli": rule({"renderer"}),  # __version__, and the Renderer lazily (module __getattr__): no torch at import
    "sfr_cli.errors": rule(),
    "sfr_cli.modes": rule({"errors"}),
    "sfr_cli.outputs": rule({"errors", "processes"}),  # one lock per output, temporaries beside it, no-replace commits
    "sfr_cli.processes": rule(),  # /proc: a process's state, parent and start time (outputs' locks, the watchdog)
    "sfr_cli.config": rule({"errors", "modes"}, {"yaml"}),
    "sfr_cli.nets": rule({"nets"}, {"torch"}),
    # numpy: the enhancer nets' seeded test weights (PCG64 streams, as the reference scripts draw them)
    "sfr_cli.nets.*": rule({"nets"}, {"torch", "numpy"}),
    # image operations beside nets/: OpenCV's resizes, warps and LMeDS, the seamless clone, the crop-box search
    "sfr_cli.imaging": rule(),
    "sfr_cli.imaging.*": rule({"imaging"}, {"torch"}),
    # the face detector's random weights that find faces (`sfr checkpoints random --enhancer`, the tests)
    "sfr_cli.detector_weights": rule({"nets", "imaging"}, {"torch", "numpy"}),
    "sfr_cli.checkpoints": rule({"nets", "config", "errors", "modes", "outputs"}, {"torch", "safetensors"}),
    # an image operation beside nets/: RealESRGANer's tiles and their exact reuse (Lanczos-4 from imaging.resize)
    "sfr_cli.tiling": rule({"nets", "imaging"}, {"torch"}),
    "sfr_cli.coeffs": rule({"errors", "modes"}, {"numpy", "scipy"}),
    "sfr_cli.engine": rule({"nets", "checkpoints", "config", "errors", "modes"}, {"torch", "numpy"}),
    "sfr_cli.media": rule({"media"}),  # the package's public surface, from its own modules
    # PIL reads any source image format; scipy.ndimage resizes as SadTalker's skimage path does
    "sfr_cli.media.source": rule({"errors", "media"}, {"numpy", "PIL", "scipy", "imageio_ffmpeg"}),
    "sfr_cli.media.ffmpeg": rule({"errors"}, {"imageio_ffmpeg"}),
    "sfr_cli.media.sinks": rule({"errors", "outputs", "media"}, {"numpy", "imageio"}),
    # one clip's sinks fed by a writer thread (what the pipeline's frames go into)
    "sfr_cli.media.writer": rule({"errors", "media"}, {"numpy"}),
    # paste-back as a render stage: box and output size decided before the model loads; math in imaging/
    "sfr_cli.stages": rule(),  # the stage registry: imports its stage modules by name, lazily
    # a stage module may declare its option rows (its OPTIONS, read by `options.table()`)
    # engine: the one out-of-memory back-off (`attempt`, `halve_after_oom`), shared with the engine
    # tiling: the background enhancer's tiles (an image operation beside nets/)
    "sfr_cli.stages.*": rule({"stages", "media", "errors", "modes", "nets", "imaging", "checkpoints", "options",
                              "engine", "detector_weights", "tiling"},
                             {"numpy", "torch", "click"}),
    "sfr_cli.progress": rule((), {"rich"}),
    "sfr_cli.jobs": rule(LIBRARY, {"numpy"}),  # one job's checks before any model loads
    "sfr_cli.enhance_jobs": rule(LIBRARY | {"jobs"}),  # `sfr enhance`'s job and its checks (jobs' shared ones)
    # models in one home: the cache, engine building, stage models, source images and states
    "sfr_cli.models": rule(LIBRARY, {"numpy"}),
    # the one pipeline: frame source (engine, decoded frames) -> stages -> sinks
    "sfr_cli.streaming": rule(LIBRARY | {"jobs", "models"}, {"numpy", "torch"}),
    "sfr_cli.bench": rule(LIBRARY | {"jobs", "streaming"}, {"numpy", "torch"}),  # `sfr bench`: the engine vs a plain loop
    "sfr_cli.cli": rule(ANY, ANY),
    # `sfr checkpoints download`: release URLs, resumable transfers, the loading check before a file is kept
    # SadTalker's inference.py with sfr's AnimateFromCoeff (the Renderer under SadTalker's interface), and
    # `python -m sfr_cli.sadtalker`, which runs the sfr program (runpy; it imports no sfr module)
    "sfr_cli.sadtalker": rule({"errors", "renderer", "coeffs", "options", "progress", "engine", "stages"},
                              {"numpy"}),
    "sfr_cli.sadtalker.__main__": rule(),
    "sfr_cli.download": rule({"__init__", "errors", "outputs", "checkpoints", "config", "stages"}, {"torch"}),  # __version__: its User-Agent
    # The public Python API and `sfr batch`: glue over the library, like jobs and streaming.
    # the one option table (its Click types; the stages' rows, read from the stage registry)
    # (and, when a value arrives, the checks that live with their data: coeffs' degrees and scale, media's fps)
    "sfr_cli.options": rule({"errors", "modes", "coeffs", "media", "stages"}, {"click"}),
    "sfr_cli.renderer": rule(LIBRARY | {"jobs", "models", "streaming", "options"}, {"numpy"}),
    # `sfr batch` in three rooms: the rows as written (manifest), the plan and its clash index (batch_plan),
    # the run on a backend and the report (batch)
    "sfr_cli.manifest": rule({"errors", "options"}),
    "sfr_cli.batch_plan": rule(LIBRARY | {"jobs", "options", "manifest"}, {"click"}),
    "sfr_cli.batch": rule(LIBRARY | {"jobs", "options", "renderer", "batch_plan"}),
    # The one dispatcher of the process backends (longest first, retry once, the failed row); the watchdog
    # that ends what a killed driver started (stdlib only: it runs as a small process of its own).
    "sfr_cli.dispatch": rule({"batch_plan", "jobs", "outputs"}),
    "sfr_cli.watchdog": rule({"processes"}),
    "sfr_cli.workers": rule({"batch", "batch_plan", "dispatch", "renderer"}, {"torch"}),  # a backend: worker processes
    "sfr_cli.cluster": rule({"batch", "batch_plan", "dispatch", "watchdog", "jobs", "renderer", "errors", "workers",
                             "options"},
                            {"ray", "torch"}),  # Ray actors
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(source: str, name: str, is_package: bool = False):
    """Absolute names of every module the code of module ``name`` imports, at any depth (imports inside
    functions count), relative imports resolved; ``from pkg import mod`` names ``pkg.mod``."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module
            for alias in node.names:
                candidate = f"{prefix}.{alias.name}"
                found.add(candidate if candidate.startswith("sfr_cli.") and is_module(candidate) else prefix)
    return found


def imports_of(path: Path):
    return imported_modules(path.read_text(encoding="utf-8"), module_name(path), path.name == "__init__.py")


def internal_target(imported: str):
    """`sfr_cli.nets.mapping` -> `nets`; `sfr_cli.errors` -> `errors`; `sfr_cli` itself -> `__init__`;
    not sfr_cli -> None."""
    parts = imported.split(".")
    if parts[0] != "sfr_cli":
        return None
    return parts[1] if len(parts) > 1 else "__init__"


def split_imports(path: Path):
    """(sfr_cli modules by first name, third-party top-level packages, standard-library modules)."""
    imports = imports_of(path)
    internal = {t for t in (internal_target(i) for i in imports) if t is not None}
    top = {i.split(".")[0] for i in imports if internal_target(i) is None}
    return internal, top - STDLIB, top & STDLIB


def rule_key(name: str) -> Optional[str]:
    if name in RULES:
        return name
    parent = name.rpartition(".")[0]
    return f"{parent}.*" if f"{parent}.*" in RULES else None


def set_literal(names) -> str:
    return "{" + ", ".join(f'"{n}"' for n in sorted(names)) + "}" if names else "()"


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_rule():
    missing = []
    for path in MODULES:
        name = module_name(path)
        if rule_key(name) is None:
            internal, external, _ = split_imports(path)
            line = f'"{name}": rule({set_literal(internal - {name.split(".")[1]})}, {set_literal(external)}),'
            missing.append(f"{name} has no line in RULES (tests/test_imports.py). Add one saying what STYLE.md's "
                           f"table lets it import; what it imports today would read:\n    {line}")
    assert not missing, "\n".join(missing)


def test_every_rule_names_a_module():
    names = {module_name(p) for p in MODULES}
    stale = [key for key in RULES
             if not (key in names or (key.endswith(".*") and any(n.startswith(key[:-1]) for n in names)))]
    assert not stale, f"RULES in tests/test_imports.py names modules that no longer exist: remove {stale}"


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_import_directions(path):
    name = module_name(path)
    key = rule_key(name)
    if key is None:
        pytest.skip("no rule: test_every_module_has_a_rule says which line to add")
    allowed = RULES[key]
    internal, external, stdlib = split_imports(path)
    own = name.split(".")[1] if "." in name else "__init__"

    assert "cli" not in internal or name == "sfr_cli.cli", f"{name} imports sfr_cli.cli; nothing may"
    if not allowed.stdlib:
        assert not (internal or external or stdlib), f"{name} must import nothing, imports {internal | external | stdlib}"
    if allowed.internal is not ANY:
        extra = internal - allowed.internal - {own}
        assert not extra, (f"{name} imports sfr_cli.{sorted(extra)}; its rule allows {sorted(allowed.internal)} "
                           f"(STYLE.md's table; change the rule only if the table says so)")
    if allowed.external is not ANY:
        extra = external - allowed.external
        assert not extra, f"{name} imports {sorted(extra)}; its rule allows {sorted(allowed.external)} and the stdlib"


def test_the_rules_see_relative_absolute_and_nested_imports():
    imports = imports_of(PACKAGE / "checkpoints.py")
    assert "sfr_cli.errors" in imports and "sfr_cli.nets.mapping" in imports
    code = ("from sfr_cli import errors\n"
            "from . import config\n"
            "from .nets.geometry import transform_keypoints\n"
            "def later():\n"
            "    import rich.console\n")
    assert imported_modules(code, "sfr_cli.engine") == {"sfr_cli.errors", "sfr_cli.config", "sfr_cli.nets.geometry",
                                                         "rich.console"}
    assert imported_modules("from .. import errors\n", "sfr_cli.nets.blocks") == {"sfr_cli.errors"}


def test_a_module_breaking_its_rule_is_caught(tmp_path):
    """The checker itself: media importing torch, engine importing rich, errors importing numpy all fail."""
    for name, code in (("sfr_cli.media", "import torch\n"), ("sfr_cli.engine", "from rich.console import Console\n"),
                       ("sfr_cli.errors", "import numpy\n"), ("sfr_cli.coeffs", "from .engine import Engine\n")):
        imports = imported_modules(code, name)
        internal = {t for t in (internal_target(i) for i in imports) if t is not None}
        external = {i.split(".")[0] for i in imports if internal_target(i) is None} - STDLIB
        allowed = RULES[name]
        assert (internal - allowed.internal) or (external - allowed.external), name


def run_fresh_python(code: str) -> None:
    """Run `code` in a new interpreter (nothing imported yet) and fail with its stderr if it fails."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.heavy
def test_renderer_is_importable_from_the_package_without_importing_torch_early():
    code = ("import sys\n"
            "import sfr_cli\n"
            "assert 'torch' not in sys.modules\n"
            "from sfr_cli import Renderer\n"
            "assert Renderer.__module__ == 'sfr_cli.renderer'\n")
    run_fresh_python(code)


def test_cli_and_help_do_not_import_torch():
    code = ("import sys\n"
            "import sfr_cli.cli as cli\n"
            "assert 'torch' not in sys.modules, 'import sfr_cli.cli imported torch'\n"
            "for args in (['--help'], ['render', '--help'], ['batch', '--help'], ['checkpoints', '--help'],\n"
            "             ['bench', '--help']):\n"
            "    try:\n"
            "        cli.sfr.main(args, prog_name='sfr')\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 0, (args, exc.code)\n"
            "    assert 'torch' not in sys.modules, f'sfr {args} imported torch'\n")
    run_fresh_python(code)
