"""First and second Preview latency of the Slicer effect's engine process, measured the effect's way.

    python Testing/Benchmarks/bench_preview.py                        # LiteMedSAM, MNI152 slices 85:95
    python Testing/Benchmarks/bench_preview.py --slices 60:120 --scorer ViT-B-32:openai

It starts the engine's child process exactly as the effect does (`jobs.EngineWorker`, here with
this interpreter in place of PythonSlicer), hands it the volume through a temporary .npy
file, reads its JSON progress lines with non-blocking reads, and times each Preview from the
click (volume written, request sent) to the mask file being there. The first Preview pays
for the process start, the imports and the model loading; the second reuses the loaded
models. The default scorer is the weight-free largest-candidate one (no CLIP weights here):
with CLIP add its load to the first Preview and its scoring to both.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ENGINE_PARENT = Path(__file__).resolve().parents[2] / "SaLIPSegment"
sys.path.insert(0, str(ENGINE_PARENT))

from SaLIPSegmentLib import jobs  # noqa: E402
from SaLIPSegmentLib.worker import LARGEST_CANDIDATE_SCORER  # noqa: E402


def mni152() -> np.ndarray:
    import SimpleITK as sitk

    from SaLIPSegmentLib.sample_data import mni152_t1_path

    return sitk.GetArrayFromImage(sitk.ReadImage(str(mni152_t1_path())))


def preview(engine: jobs.EngineWorker, volume: np.ndarray, settings: dict) -> dict:
    folder = tempfile.mkdtemp(prefix="salip-bench-")
    clicked = time.perf_counter()
    np.save(os.path.join(folder, "volume.npy"), volume)
    request = {"type": "segment", "volume": os.path.join(folder, "volume.npy"), "spacing": [1.0, 1.0, 1.0],
               "settings": settings}
    job = engine.submit(request, os.path.join(folder, "result"))
    first_progress = None
    while not job.finished:
        engine.poll(job)
        if first_progress is None and job.total:
            first_progress = time.perf_counter() - clicked
        time.sleep(0.01)
    seconds = time.perf_counter() - clicked
    if job.error is not None:
        raise SystemExit(f"Preview failed: {job.error.message}\n{job.error.details}")
    summary = job.result["summary"]
    jobs.remove_folder(folder)
    return {"seconds": seconds, "first_progress": first_progress, "load": job.result["load_seconds"],
            "engine": summary["seconds"], "slices": summary["slices_in_range"], "voxels": summary["voxels"],
            "cascade": summary["slices_full_cascade"], "runtime": summary["encoder_runtime"],
            "model_loads": job.result["model_loads"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sam", default="litemedsam")
    parser.add_argument("--scorer", default=LARGEST_CANDIDATE_SCORER)
    parser.add_argument("--slices", default="85:95")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--previews", type=int, default=2)
    args = parser.parse_args()

    volume = mni152()
    engine = jobs.EngineWorker(lambda: jobs.worker_command(sys.executable),
                               lambda: jobs.worker_environment(dict(os.environ), str(ENGINE_PARENT)))
    settings = {"prompt": "brain", "sam": args.sam, "clip": args.scorer, "device": args.device, "axis": "0",
                "slices": args.slices}
    print(f"MNI152 T1 {volume.shape}, slices {args.slices}, {args.sam} + {args.scorer}, device {args.device}, "
          f"{os.cpu_count()} CPUs")
    try:
        for number in range(1, args.previews + 1):
            figures = preview(engine, volume, settings)
            print(f"Preview {number}: {figures['seconds']:.1f} s from click to mask "
                  f"(first progress line after {figures['first_progress']:.1f} s; models loaded in "
                  f"{figures['load']:.1f} s; engine {figures['engine']:.1f} s for {figures['slices']} slices, "
                  f"{figures['cascade']} of them full cascades, encoder on {figures['runtime']}; "
                  f"model loads so far {figures['model_loads']}; {figures['voxels']} voxels)")
    finally:
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
