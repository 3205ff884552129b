"""``sfr bench`` on the tiny config: both runs render the same frames and every figure is reported."""

import json
import math

import pytest

from conftest import MAX_LEVELS, MAX_OFF_BY_ONE_SHARE
from sfr_cli.bench import format_report, run_benchmark
from sfr_cli.config import CONFIG_DIR, load_config

STAGES = {"mapping_keypoints", "dense_motion", "decoder", "transfer"}
# The lowest PSNR two renders differing only in float rounding can have by conftest.assert_frames_close's
# rule (0.5 % of values off by 1 level): 10 log10(255^2 / 0.005) = 71.1 dB.
ROUNDING_PSNR_DB = 10 * math.log10(255.0 ** 2 / (MAX_OFF_BY_ONE_SHARE * MAX_LEVELS ** 2))


@pytest.mark.slow  # a long end-to-end run (processes started and killed): `make test`, not test-fast
def test_bench_reports_both_runs_on_the_same_frames():
    report = run_benchmark(load_config(CONFIG_DIR / "tiny.yaml"), device="cpu", frames=3, batch_size=2)
    json.dumps(report)  # JSON-ready
    plain, sfr = report["runs"]
    # SadTalker's loop at its default batch size: 2 rows, frames 0-1 and 2 (repeated to fill the row)
    assert plain["name"] == "plain" and plain["batch_size"] == 2 and plain["precision"] == "fp32"
    assert sfr["name"] == "sfr" and sfr["batch_size"] == 2
    for run in (plain, sfr):
        assert run["frames"] == 3 and run["frames_per_second"] == pytest.approx(3 / run["seconds"])
        assert run["peak_rss_mib"] > 100, "torch alone holds more than 100 MiB: the figure is not in MiB"
        assert set(run["stage_ms_per_frame"]) == STAGES and all(v >= 0 for v in run["stage_ms_per_frame"].values())
        assert run["stage_ms_per_frame"]["decoder"] > 0
    # the plain loop is SadTalker's arithmetic; sfr's rewrites keep it to float rounding
    assert sfr["psnr_db_vs_plain"] >= ROUNDING_PSNR_DB
    speedup = sfr["frames_per_second"] / plain["frames_per_second"]
    assert sfr["speedup_vs_plain"] == pytest.approx(speedup)
    text = format_report(report)
    assert "frames/s" in text and f"speed-up over the plain loop: {speedup:.2f}x" in text
    assert f"{plain['frames_per_second']:.3f}" in text and f"{sfr['frames_per_second']:.3f}" in text


@pytest.mark.heavy
def test_bench_reduced_precision_reports_psnr_against_fp32():
    report = run_benchmark(load_config(CONFIG_DIR / "tiny.yaml"), device="cpu", frames=2, batch_size=2,
                           precision="bf16", plain=False)
    (run,) = report["runs"]
    assert run["precision"] == "bf16" and 20 < run["psnr_db_vs_fp32"] < float("inf")
