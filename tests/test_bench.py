"""``sfr bench`` on the tiny config: both runs render the same frames and every figure is reported."""

import json

from sfr_cli.bench import format_report, run_benchmark
from sfr_cli.config import CONFIG_DIR, load_config

STAGES = {"mapping_keypoints", "dense_motion", "decoder", "transfer"}


def test_bench_reports_both_runs_on_the_same_frames():
    report = run_benchmark(load_config(CONFIG_DIR / "tiny.yaml"), device="cpu", frames=3, batch_size=2)
    json.dumps(report)  # JSON-ready
    plain, sfr = report["runs"]
    # SadTalker's loop at its default batch size: 2 rows, frames 0-1 and 2 (repeated to fill the row)
    assert plain["name"] == "plain" and plain["batch_size"] == 2 and plain["precision"] == "fp32"
    assert sfr["name"] == "sfr" and sfr["batch_size"] == 2
    for run in (plain, sfr):
        assert run["frames"] == 3 and run["frames_per_second"] > 0 and run["peak_rss_mib"] > 0
        assert set(run["stage_ms_per_frame"]) == STAGES and all(v >= 0 for v in run["stage_ms_per_frame"].values())
        assert run["stage_ms_per_frame"]["decoder"] > 0
    # the plain loop is SadTalker's arithmetic; sfr's rewrites keep it to float rounding
    assert sfr["psnr_db_vs_plain"] > 60
    assert sfr["speedup_vs_plain"] == sfr["frames_per_second"] / plain["frames_per_second"]
    text = format_report(report)
    assert "frames/s" in text and "speed-up" in text


def test_bench_reduced_precision_reports_psnr_against_fp32():
    report = run_benchmark(load_config(CONFIG_DIR / "tiny.yaml"), device="cpu", frames=2, batch_size=2,
                           precision="bf16", plain=False)
    (run,) = report["runs"]
    assert run["precision"] == "bf16" and 20 < run["psnr_db_vs_fp32"] < float("inf")
