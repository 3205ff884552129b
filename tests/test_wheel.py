"""A wheel of sfr works from any folder: built from a copy of the source tree, installed into a fresh
environment that reuses this one's packages (torch is never resolved or downloaded), and run from a
folder outside the repo, with no PYTHONPATH: `sfr --version`, `sfr checkpoints random`, `sfr render`.

The built-in configs must come from inside the installed package (setup.py ships `configs/` there)."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCE_PARTS = ("sfr_cli", "configs", "setup.py", "setup.cfg", "pyproject.toml", "README.md")


def run(args, cwd, env=None):
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args}: exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result


def build_wheel(tmp_path: Path) -> Path:
    """`pip wheel` of a copy of the source tree (an in-tree build would leave build/ in the repo);
    no build isolation, so nothing is downloaded: setuptools comes from this environment."""
    pytest.importorskip("setuptools", reason="building the wheel without network needs setuptools here")
    source = tmp_path / "source"
    source.mkdir()
    for part in SOURCE_PARTS:
        if (REPO / part).is_dir():
            shutil.copytree(REPO / part, source / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / part, source / part)
    dist = tmp_path / "dist"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", dist, source], cwd=tmp_path)
    (wheel,) = dist.glob("sfr-*.whl")
    return wheel


def environment_with(wheel: Path, tmp_path: Path) -> Path:
    """A fresh venv holding only the wheel (installed with --no-deps); this environment's site-packages is
    appended to its path by a .pth file, so torch and the rest are reused, never installed. That folder's
    own .pth files (this checkout's editable install) are not run: sfr_cli comes from the wheel."""
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp_path)
                .stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "zz-reuse-packages.pth").write_text("".join(f"{path}\n" for path in sorted(ours)))
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel],
        cwd=tmp_path)
    return venv


@pytest.mark.slow  # about 10-20 s on the shared 2-core machine
def test_wheel_installs_and_renders_from_any_folder(tmp_path):
    wheel = build_wheel(tmp_path)
    names = zipfile.ZipFile(wheel).namelist()
    for config in (REPO / "configs").glob("*.yaml"):
        assert f"sfr_cli/configs/{config.name}" in names, f"{config.name} is not in the wheel"
    venv = environment_with(wheel, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    sfr = venv / "bin" / "sfr"

    from sfr_cli import __version__

    assert run([sfr, "--version"], elsewhere, env).stdout.strip() == f"sfr, version {__version__}"
    where = run([venv / "bin" / "python", "-c", "import sfr_cli.config as c; print(c.CONFIG_DIR)"],
                elsewhere, env).stdout.strip()
    assert Path(where).is_relative_to(venv), f"configs read from {where}, not from the installed package"

    run([sfr, "checkpoints", "random", "ck", "--config", "tiny"], elsewhere, env)
    np.save(elsewhere / "coeffs.npy", np.load(REPO / "demo" / "coeffs.npy")[:3])
    shutil.copy2(REPO / "demo" / "source.png", elsewhere / "face.png")
    result = run([sfr, "render", "--config", "tiny", "--coeffs", "coeffs.npy", "--source", "face.png",
                  "--checkpoint-dir", "ck", "--frames-dir", "frames", "--quiet"], elsewhere, env)
    assert result.stdout.strip() == "frames"
    assert sorted(p.name for p in (elsewhere / "frames").iterdir()) == ["000000.png", "000001.png", "000002.png"]
