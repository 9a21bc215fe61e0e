"""Soak run: many slices through the volume runner with small models; memory must stay flat.

    python Testing/Benchmarks/soak.py                 # 1,000 slices, full cascade on each
    python Testing/Benchmarks/soak.py --slices 200 --volumes 5

Runs `--volumes` volumes of `--slices` slices (64 x 64 disks of changing size and noise)
through segment_volume with the test-sized real architectures (SAM and CLIP with random
weights) and prints the resident memory (now and peak) after the first window of slices
and at the end, plus Python's traced allocations. A leak of even a few KB per slice shows
as a rising "now" column over a thousand slices.
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # Testing/, for tiny_models

from SaLIPSegmentLib.models import create_scorer  # noqa: E402
from SaLIPSegmentLib.models.base import ProposalSettings  # noqa: E402
from SaLIPSegmentLib.models.sam import SamSegmenter  # noqa: E402
from SaLIPSegmentLib.settings import VolumeSettings
from SaLIPSegmentLib.volume import segment_volume  # noqa: E402

import tiny_models  # noqa: E402


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_volume(slices: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:64, :64]
    radii = 8 + (np.arange(slices) % 17)
    volume = np.stack([np.where((yy - 32) ** 2 + (xx - 30) ** 2 <= r * r, 200.0, 20.0) for r in radii])
    return (volume + rng.normal(0, 5, volume.shape)).astype(np.float32)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=1000, help="slices per volume")
    parser.add_argument("--volumes", type=int, default=1)
    parser.add_argument("--window", type=int, default=100, help="slices before the first memory reading")
    parser.add_argument("--trace", action="store_true", help="also trace Python allocations (slower)")
    args = parser.parse_args()

    torch.manual_seed(0)
    segmenter = SamSegmenter(tiny_models.build_tiny_sam(), torch.device("cpu"), name=tiny_models.TINY_SAM)
    with tempfile.TemporaryDirectory() as folder:
        import open_clip

        checkpoint = Path(folder) / "tiny_clip.pt"
        torch.save(open_clip.create_model(tiny_models.TINY_CLIP, pretrained=None).state_dict(), checkpoint)
        scorer = create_scorer(f"{tiny_models.TINY_CLIP}:{checkpoint}", torch.device("cpu"))
    proposal = ProposalSettings.from_dict(tiny_models.TINY_SAM_PROPOSALS)

    readings = []
    done = 0

    def progress(finished: int, total: int) -> None:
        nonlocal done
        if finished and (done + finished) % args.window == 0:
            gc.collect()
            heap = tracemalloc.get_traced_memory()[0] / 2**20 if args.trace else float("nan")
            readings.append((done + finished, rss_mb(), peak_mb(), heap))
            print(f"  {done + finished:>6} slices  RSS {readings[-1][1]:8.1f} MB  peak {readings[-1][2]:8.1f} MB  "
                  f"python heap {readings[-1][3]:7.2f} MB", flush=True)

    if args.trace:
        tracemalloc.start()
    started = time.perf_counter()
    for number in range(args.volumes):
        volume = make_volume(args.slices, seed=number)
        result = segment_volume(volume, segmenter, scorer, ["a bright disk"],
                                VolumeSettings(proposal=proposal, mode="every-slice"), progress=progress)
        assert result.mask.shape == volume.shape
        done += args.slices
        del volume, result  # as a batch does: one volume's result alive at a time
    seconds = time.perf_counter() - started
    first, last = readings[0], readings[-1]
    print(f"{done} slices in {seconds:.0f} s ({seconds / done * 1000:.0f} ms per slice)")
    print(f"after {first[0]:>5} slices: RSS {first[1]:.1f} MB, peak {first[2]:.1f} MB, python heap {first[3]:.2f} MB")
    print(f"after {last[0]:>5} slices: RSS {last[1]:.1f} MB, peak {last[2]:.1f} MB, python heap {last[3]:.2f} MB")
    print(f"growth: RSS {last[1] - first[1]:+.1f} MB, peak {last[2] - first[2]:+.1f} MB, "
          f"python heap {last[3] - first[3]:+.2f} MB over {last[0] - first[0]} slices")
    return 0


if __name__ == "__main__":
    sys.exit(main())
