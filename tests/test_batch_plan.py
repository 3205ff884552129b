"""`sfr batch` plans each row once: the plan's checked jobs (inputs resolved, crop box found, weights checked,
frame count) are what the render and the worker processes take, not checked again."""

import pickle
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sfr_cli import batch as batching
from sfr_cli import batch_plan, jobs
from sfr_cli import manifest as manifests
from sfr_cli.cli import sfr
from sfr_cli.stages import paste as paste_stage

from conftest import read_png_frames


def paste_manifest(tmp_path, golden, rows=2):
    manifest = tmp_path / "rows.csv"
    lines = ["coeffs,source,source_coeffs,preprocess,paste_into,frames_dir"]
    for row in range(rows):
        lines.append(f"{golden / 'coeffs.mat'},{golden / 'crop.png'},{golden / 'source_coeffs.mat'},full,"
                     f"{golden / 'original.png'},out{row}")
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


@pytest.mark.heavy
def test_each_row_is_checked_and_its_crop_box_searched_once(tmp_path, reference_dir, tiny_checkpoints, monkeypatch):
    golden = reference_dir / "golden-paste"
    searches, plans = [], []
    locate, plan = paste_stage.locate_crop, jobs._prepare_job
    monkeypatch.setattr(paste_stage, "locate_crop", lambda *a: searches.append(1) or locate(*a))
    monkeypatch.setattr(jobs, "_prepare_job", lambda *a: plans.append(1) or plan(*a))
    result = CliRunner().invoke(sfr, ["batch", str(paste_manifest(tmp_path, golden)), "--config", "tiny",
                                      "--checkpoint-dir", str(tiny_checkpoints), "--device", "cpu", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (len(searches), len(plans)) == (2, 2)  # one of each per row (the render took the plan's jobs)
    for row in range(2):
        assert read_png_frames(tmp_path / f"out{row}").shape == (3, 1024, 640, 3)


@pytest.mark.heavy
def test_a_planned_task_pickles_without_pixels_and_renders_as_planned(tmp_path, reference_dir, tiny_checkpoints):
    """What a worker process receives: the planned job, no source pixels, no claims; it renders the frames
    `sfr render` writes."""
    from sfr_cli import Renderer

    golden = reference_dir / "golden-paste"
    template = jobs.RenderJob.make(coeffs=Path("."), source=Path("."), config="tiny", checkpoint_dir=tiny_checkpoints,
                                   device="cpu")
    rows = manifests.read_manifest(paste_manifest(tmp_path, golden, rows=1))
    plan = batch_plan.plan_rows(rows, batch_plan.BatchDefaults(template))
    (task,) = plan.tasks
    assert task.prepared is not None and task.prepared.image is None and not task.prepared.claims
    assert task.prepared.stages[-1].box == (150, 120, 450, 426)  # found by the plan
    sent = pickle.loads(pickle.dumps(task))
    renderer = Renderer(**batching.renderer_settings(template))
    report = renderer.render_job(sent.planned)
    assert report.frames == 3
    expected = np.stack(list(renderer.frames(golden / "coeffs.mat", golden / "crop.png", preprocess="full",
                                             source_coeffs=golden / "source_coeffs.mat",
                                             paste_into=golden / "original.png")))
    np.testing.assert_array_equal(read_png_frames(tmp_path / "out0"), expected)
