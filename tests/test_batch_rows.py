"""Issue 17, point 11 for `sfr batch`: nothing to render is an error, CSV and JSONL treat unknown columns
alike, a dry run says what it would do and why rows fail, a long manifest shows progress and probes one
WAV once, and every message names its row as "row N"."""

import json

import numpy as np
import pytest

from sfr_cli import manifest as manifests
from sfr_cli import media

from conftest import DEMO_COEFFS, SOURCE, run_batch, tiny
from test_media import write_wav


@pytest.fixture
def folder(tmp_path):
    np.save(tmp_path / "a.npy", np.load(DEMO_COEFFS)[:2])
    np.save(tmp_path / "b.npy", np.load(DEMO_COEFFS)[2:4])
    (tmp_path / "face.png").write_bytes(SOURCE.read_bytes())
    return tmp_path


def test_a_glob_matching_nothing_is_a_usage_error_naming_it(folder):
    result = run_batch("--coeffs", str(folder / "results" / "*.mat"), "--source", folder / "face.png",
                       "--output-dir", folder / "out")
    assert result.exit_code == 2
    assert f"--coeffs '{folder / 'results' / '*.mat'}' matches no file" in result.stderr
    assert not (folder / "out").exists()


@pytest.mark.parametrize("name, text", [("m.csv", ""), ("m.csv", "coeffs,source\n"), ("m.csv", "coeffs,source\n\n\n"),
                                        ("m.jsonl", ""), ("m.jsonl", "\n\n")])
def test_an_empty_manifest_is_a_usage_error_whatever_its_type(folder, name, text):
    manifest = folder / name
    manifest.write_text(text)
    result = run_batch(manifest)
    assert result.exit_code == 2, result.output
    assert str(manifest) in result.stderr and ("no rows" in result.stderr or "empty manifest" in result.stderr)
    assert not (folder / "m.report.jsonl").exists()


def test_an_unknown_key_fails_a_jsonl_manifest_as_an_unknown_column_fails_a_csv(folder):
    jsonl = folder / "m.jsonl"
    jsonl.write_text("".join(json.dumps({"coeffs": "a.npy", "source": "face.png", "ouptut": f"o{i}.mp4"}) + "\n"
                             for i in range(7)))
    csv = folder / "m.csv"
    csv.write_text("coeffs,source,ouptut\na.npy,face.png,o.mp4\n")
    for manifest in (jsonl, csv):
        result = run_batch(manifest)
        assert result.exit_code == 2, result.output
        assert "ouptut" in result.stderr and "output" in result.stderr
    assert "row 1, 2, 3, 4, 5, ...)" in run_batch(jsonl).stderr
    assert not list(folder.glob("*.mp4")) and not list(folder.glob("*.report.jsonl"))


def test_glob_form_errors_say_row_n_as_manifests_do(folder, tiny_checkpoints):
    (folder / "bad.npy").write_bytes(b"not numpy")
    result = run_batch("--coeffs", str(folder / "*.npy"), "--source", folder / "face.png", "--output-dir",
                       folder / "out", "--dry-run", "--json", *tiny(tiny_checkpoints))
    rows = json.loads(result.stdout)["rows"]
    assert [row["status"] for row in rows] == ["todo", "todo", "failed"]  # a, b, bad: sorted
    assert rows[2]["error"].startswith("row 3: ") and "clip" not in rows[2]["error"]


def test_dry_run_says_how_many_rows_it_would_render_and_why_rows_fail(folder, tiny_checkpoints):
    (folder / "done.mp4").write_bytes(b"finished earlier")
    manifest = folder / "m.csv"
    manifest.write_text("coeffs,source,output\n"
                        "a.npy,face.png,done.mp4\n"
                        "a.npy,face.png,o/a.mp4\n"
                        "b.npy,face.png,o/b.mp4\n"
                        "missing.npy,face.png,o/c.mp4\n")
    result = run_batch(manifest, "--dry-run", *tiny(tiny_checkpoints))
    assert result.exit_code == 1
    assert "dry run: 2 to do, 1 skipped, 1 failed of 4 rows; nothing rendered" in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and errors[0].startswith("Error: row 4: ") and "missing.npy" in errors[0]
    assert not (folder / "o").exists()


@pytest.mark.heavy
def test_a_long_dry_run_probes_one_wav_once_and_shows_progress(folder, tiny_checkpoints, monkeypatch):
    write_wav(folder / "speech.wav", 0.5)
    rows = 40
    manifest = folder / "m.csv"
    manifest.write_text("coeffs,source,audio,output\n" + "".join(f"a.npy,face.png,speech.wav,o/{i}.mp4\n"
                                                                 for i in range(rows)))
    probes = []
    real = media.ffmpeg._probe_audio
    monkeypatch.setattr(media.ffmpeg, "_probe_audio", lambda *args: probes.append(args) or real(*args))
    monkeypatch.setattr(media.ffmpeg, "_probes", type(media.ffmpeg._probes)())
    from sfr_cli import cli

    monkeypatch.setattr(cli._CheckProgress, "EVERY_SECONDS", 0.0)  # a line per row: the form, not the pace
    result = run_batch(manifest, "--dry-run", *tiny(tiny_checkpoints))
    assert result.exit_code == 0, result.output
    assert f"dry run: {rows} to do, 0 skipped, 0 failed of {rows} rows" in result.stdout
    assert len(probes) == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("checking rows: ")]
    assert lines[-1] == f"checking rows: {rows} of {rows}" and len(lines) >= rows

    (folder / "speech.wav").write_bytes((folder / "speech.wav").read_bytes()[:-100])  # changed: probed again
    assert media.probe_audio(folder / "speech.wav").codec == "pcm_s16le" and len(probes) == 2
    assert media.probe_audio(folder / "speech.wav").path == folder / "speech.wav" and len(probes) == 2


def test_quiet_or_json_dry_runs_show_no_progress(folder, tiny_checkpoints, monkeypatch):
    from sfr_cli import cli

    monkeypatch.setattr(cli._CheckProgress, "EVERY_SECONDS", 0.0)
    manifest = folder / "m.csv"
    manifest.write_text("coeffs,source,output\na.npy,face.png,o/a.mp4\n")
    for flag in ("--quiet", "--json"):
        assert "checking rows" not in run_batch(manifest, "--dry-run", flag, *tiny(tiny_checkpoints)).stderr


def test_read_manifest_names_the_pattern_in_the_api_too(tmp_path):
    with pytest.raises(manifests.ManifestError, match="matches no file"):
        manifests.rows_from_globs([str(tmp_path / "*.mat")], "face.png")
    assert [row.values["coeffs"] for row in manifests.rows_from_globs(["plain.npy"], "f.png")] == ["plain.npy"]
