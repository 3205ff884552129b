"""scripts/colab.sh and colab/sfr.ipynb: the notebook's cells are the script's steps (read independently of
scripts/make_colab_notebook.py, and that script writes exactly the committed notebook), and the script's
steps run for real with CI's overrides: the CPU, tiny random weights served from 127.0.0.1, sfr installed
from a git clone into a fresh environment that reuses this one's torch. Nothing reaches beyond 127.0.0.1."""

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from weights_server import WeightsServer

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "colab.sh"
NOTEBOOK = REPO / "colab" / "sfr.ipynb"


def script_steps():
    """{step name: its lines} of scripts/colab.sh (`# === NAME: ... ===` starts a step)."""
    steps, name = {}, None
    for line in SCRIPT.read_text().splitlines():
        match = re.match(r"# === (\w+): .* ===$", line)
        if match:
            name = match.group(1)
            steps[name] = []
        elif name:
            steps[name].append(line)
    return {name: "\n".join(lines).strip() for name, lines in steps.items()}


def notebook_code_cells():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    return ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]


def test_the_notebooks_cells_are_the_scripts_steps():
    steps = script_steps()
    assert list(steps) == ["settings", "install", "sadtalker", "weights", "render", "show"]
    cells = notebook_code_cells()
    assert len(cells) == len(steps)
    for (name, body), cell in zip(steps.items(), cells):
        if name == "settings":  # a Python cell setting the same names to the same defaults, in order
            script = re.findall(r'^export (\w+)="\$\{\1:-(.*?)\}"', body, flags=re.M)
            dictionary = ast.literal_eval(re.search(r"SETTINGS = (\{.*?\n\})", cell, flags=re.S).group(1))
            assert list(dictionary.items()) == script
            assert "os.environ[name] = os.path.expandvars(value)" in cell
        elif name == "show":
            assert 'os.environ["SFR_OUT"]' in cell and "*.mp4" in cell and "SFR_OUT" in body
        else:
            assert cell == "%%bash\nset -euo pipefail\n" + body, f"the {name} cell is not the script's {name} step"


def test_the_committed_notebook_is_what_the_generator_writes():
    spec = importlib.util.spec_from_file_location("make_colab_notebook", REPO / "scripts" / "make_colab_notebook.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert NOTEBOOK.read_text() == module.notebook_text(SCRIPT.read_text()), \
        "colab/sfr.ipynb is stale: run python scripts/make_colab_notebook.py"


def sfr_git_repo(folder: Path) -> Path:
    """A git repository of sfr's tracked-looking files (what `git clone` of sfr gives a Colab user)."""
    for part in ("sfr_cli", "configs", "demo", "setup.py", "setup.cfg", "pyproject.toml", "README.md"):
        if (REPO / part).is_dir():
            shutil.copytree(REPO / part, folder / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / part, folder / part)
    git = ["git", "-c", "user.name=sfr tests", "-c", "user.email=tests@localhost", "-c", "init.defaultBranch=main"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "sfr"]):
        subprocess.run(git + args, cwd=folder, check=True, capture_output=True)
    return folder


def python_reusing_this_environment(folder: Path) -> Path:
    """A venv (no pip of its own) whose path ends with this environment's site-packages: pip, torch and the
    rest are found there, so `pip install` resolves nothing from the network; sfr itself goes into the venv."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    site = subprocess.run([str(folder / "bin" / "python"), "-c",
                           "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    ours = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    Path(site, "zz-reuse-packages.pth").write_text("".join(f"{path}\n" for path in ours))
    return folder / "bin"


@pytest.mark.slow
def test_the_colab_script_runs_on_the_cpu_with_tiny_weights(tmp_path, served_tiny_weights):
    if shutil.which("git") is None:
        pytest.skip("needs git (the script clones sfr)")
    pytest.importorskip("setuptools", reason="installing sfr without network needs setuptools here")
    repo = sfr_git_repo(tmp_path / "sfr-repo")
    bin_dir = python_reusing_this_environment(tmp_path / "venv")
    work = tmp_path / "content"
    work.mkdir()
    coeffs = tmp_path / "coeffs.npy"
    np.save(coeffs, np.load(REPO / "demo" / "coeffs.npy")[:3])
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    with WeightsServer(served_tiny_weights) as server:
        env.update(PATH=f"{bin_dir}{os.pathsep}{env.get('PATH', '')}", SFR_REPO=repo.as_uri(), SFR_WORK=str(work),
                   SFR_DEVICE="cpu", SFR_PRECISION="fp32", SFR_CONFIG="tiny", SFR_ENHANCER="gfpgan-tiny",
                   SFR_DOWNLOAD_URL=server.url, SFR_COEFFS=str(coeffs),
                   SFR_PIP_FLAGS="--no-build-isolation --no-index")
        result = subprocess.run(["bash", str(SCRIPT)], cwd=tmp_path, env=env, capture_output=True, text=True,
                                timeout=600)
        fetched = {name for name, _ in server.requests}
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    video = work / "sfr-out" / "sfr-demo.mp4"
    assert result.stdout.strip().splitlines()[-1] == str(video)
    assert "sfr, version" in result.stdout
    assert (work / "sfr" / ".git").is_dir()  # cloned from SFR_REPO
    assert fetched == {"SadTalker_V0.0.2_256.safetensors", "mapping_00229-model.pth.tar",
                       "mapping_00109-model.pth.tar", "GFPGANv1.4.pth", "detection_Resnet50_Final.pth",
                       "parsing_parsenet.pth"}
    assert sorted(p.name for p in (work / "SadTalker" / "gfpgan" / "weights").iterdir()) == sorted(
        ["GFPGANv1.4.pth", "detection_Resnet50_Final.pth", "parsing_parsenet.pth"])
    import imageio_ffmpeg

    frames, _ = imageio_ffmpeg.count_frames_and_secs(str(video))
    assert frames == 3
