"""The speed benchmark runs end to end (LiteMedSAM's real weights, the real MNI152 template) and
reports what the speed targets are judged by. It checks what is reported, not how fast."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARK = Path(__file__).resolve().parent / "Benchmarks" / "bench_cascade.py"
STAGES = {"encode", "propose", "score", "refine"}


def test_the_benchmark_compares_the_faithful_configuration_with_the_defaults(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, str(BENCHMARK), "--slices", "2", "--faithful-slices", "1",
                          "--variants", "faithful,defaults", "--device", "cpu", "--json", str(out)],
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads(out.read_text())
    faithful, defaults = summary["rows"]
    # The paper's configuration: crop layers 1, a fresh encoding for the refine step, every slice.
    assert (faithful["variant"], faithful["crop_n_layers"], faithful["mode"]) == ("faithful", 1, "every-slice")
    assert faithful["reencode_for_refine"] and not faithful["skip_empty_slices"]
    # Timed on one slice of the two and scaled to both.
    assert (faithful["slices_timed"], faithful["slices"]) == (1, 2)
    assert faithful["seconds_per_volume"] == pytest.approx(2 * faithful["seconds_measured"], rel=1e-3)
    assert (defaults["variant"], defaults["crop_n_layers"], defaults["mode"]) == ("defaults", 0, "propagate")
    assert (defaults["slices_timed"], defaults["slices"]) == (2, 2)
    for row in (faithful, defaults):
        assert row["device"] == "cpu" and row["peak_gpu_mb"] is None and row["peak_rss_mb"] > 0
        assert set(row["seconds_per_stage"]) == STAGES and row["seconds_per_volume"] > 0
        assert row["decoder_runtime"] == "onnxruntime" and 0 <= row["dice_volume"] <= 1
        assert row["sam_weights"] == "real weights" and row["clip"] == "oracle"
    ratio = faithful["seconds_per_volume"] / defaults["seconds_per_volume"]
    assert summary["speedup_faithful_over_defaults"] == pytest.approx(ratio, rel=1e-2)
    printed = next(line for line in run.stdout.splitlines() if line.startswith("faithful / defaults:"))
    assert f"{ratio:.2f}x per volume" in printed
