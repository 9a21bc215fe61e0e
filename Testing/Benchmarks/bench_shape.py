"""Masks in the target's shape (issue 18): each shape step against the product's defaults, whole volumes.

    python Testing/Benchmarks/bench_shape.py /work/evalvols/step3 --structures brain deep_grey ventricles \
        --clip oracle oracle-noisy --modes propagate every-slice

Each variant runs the product's path (segment_volume with VolumeSettings.shape) over the whole
volume, LiteMedSAM's real weights on the CPU. Encodings and proposals depend on neither the
scorer nor the shape steps, so they are made once per image and handed back from a cache
(CachedSegmenter); each run is charged the encoding and proposal seconds they took the first
time, so its seconds are what a run without the cache takes (less noise from the shared CPU).

Prints per case and variant: 3D Dice, HD95, slices painted without target, missed slices, the
mean per-slice Dice over slices with target, and seconds; then per volume and structure the
per-slice box bound (the reference's box prompted, plain and with context padding) over the
same slices, so the gap to it shows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import pickle
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from SaLIPSegmentLib.evaluation import measure_run
from SaLIPSegmentLib.imaging import dice, gray_to_rgb, mask_to_box, window_to_uint8
from SaLIPSegmentLib.io import read_image
from SaLIPSegmentLib.models import create_scorer, create_segmenter, resolve_device
from SaLIPSegmentLib.models.registry import get_segmenter_spec
from SaLIPSegmentLib.settings import ProposalSettings, ShapeSettings, VolumeSettings
from SaLIPSegmentLib.shape import context_border, iterate_refine, refine_with_context
from SaLIPSegmentLib.volume import choose_window, segment_volume

VARIANTS = {
    "default": ShapeSettings(),
    "a rounds3": ShapeSettings(refine_rounds=3),
    "b unite": ShapeSettings(unite_parts=True),
    "c holes": ShapeSettings(fill_holes=True),
    "d pad0.3": ShapeSettings(context_padding=0.3),
    "d pad0.65": ShapeSettings(context_padding=0.65),
    "b+c": ShapeSettings(unite_parts=True, fill_holes=True),
    "a+c": ShapeSettings(refine_rounds=3, fill_holes=True),
    "a+b+c": ShapeSettings(unite_parts=True, refine_rounds=3, fill_holes=True),
}


class CachedSegmenter:
    """A segmenter whose encodings and proposals are made once per image and handed back after.

    `charged` is the seconds those would have taken without the cache (the first time's,
    charged again on each hit); `spent` what the calls took here, so a run's honest time is
    its wall time - spent + charged.
    """

    def __init__(self, segmenter):
        self.inner = segmenter
        self.embeddings, self.encode_seconds = {}, {}
        self.proposals, self.propose_seconds = {}, {}
        self.key = None
        self.charged = self.spent = 0.0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def set_image(self, image_rgb):
        clock = time.perf_counter()
        self.key = hashlib.blake2b(np.ascontiguousarray(image_rgb).tobytes(), digest_size=16).hexdigest()
        if self.key in self.embeddings:
            self.inner.use_embedding(self.embeddings[self.key])
        else:
            started = time.perf_counter()
            self.inner.set_image(image_rgb)
            self.encode_seconds[self.key] = time.perf_counter() - started
            self.embeddings[self.key] = self.inner.embedding
        self.charged += self.encode_seconds[self.key]
        self.spent += time.perf_counter() - clock

    def use_embedding(self, embedding):
        self.key = next((k for k, v in self.embeddings.items() if v is embedding), None)
        self.inner.use_embedding(embedding)

    @property
    def embedding(self):
        return self.inner.embedding

    def propose(self, settings):
        clock = time.perf_counter()
        key = (self.key, repr(settings))
        if key not in self.proposals:
            started = time.perf_counter()
            self.proposals[key] = self.inner.propose(settings)
            self.propose_seconds[key] = time.perf_counter() - started
        self.charged += self.propose_seconds[key]
        self.spent += time.perf_counter() - clock
        return list(self.proposals[key])

    def refine(self, boxes):
        return self.inner.refine(boxes)

    def save(self, path: Path) -> None:
        """Keep the encodings and proposals (and their first seconds) for the next call of this script."""
        state = (self.embeddings, self.encode_seconds, self.proposals, self.propose_seconds)
        path.write_bytes(pickle.dumps(state))

    def load(self, path: Path) -> None:
        if path.is_file():
            self.embeddings, self.encode_seconds, self.proposals, self.propose_seconds = pickle.loads(
                path.read_bytes())


class CountingScorer:
    """The scorer, counting the crops it scores (CLIP's cost grows with them; the oracles' hardly)."""

    def __init__(self, scorer):
        self.inner, self.crops = scorer, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def score(self, image_rgb, candidates, sentences, reference=None):
        self.crops += len(candidates)
        return self.inner.score(image_rgb, candidates, sentences, reference=reference)


def run_variant(image, reference, spacing, segmenter, structure, clip, mode, proposal, shape) -> dict:
    settings = VolumeSettings(axis=0, mode=mode, proposal=proposal, shape=shape)
    segmenter.charged = segmenter.spent = 0.0
    started = time.perf_counter()
    scorer = CountingScorer(create_scorer(clip))
    result = segment_volume(image, segmenter, scorer, [structure], settings, reference=reference)
    seconds = time.perf_counter() - started - segmenter.spent + segmenter.charged
    figures = measure_run(result, reference, spacing)
    present = [o for o in figures.slices if o.reference_area]
    return {"dice_3d": figures.dice_volume, "hd95_mm": figures.hd95_mm,
            "painted_wo_target": figures.painted_without_target, "missed": figures.missed_slices,
            "slice_dice": float(np.mean([o.dice for o in present])) if present else float("nan"),
            "seconds": seconds, "scored_crops": scorer.crops}


def box_bounds(image, reference, segmenter, paddings=(0.3,), rounds=3) -> dict:
    """Mean Dice over slices with target of the reference's box prompted: plain, iterated, with context."""
    window = choose_window(image, None)
    found = {"box": [], "box+rounds": [], **{f"box pad{p}": [] for p in paddings}}
    for index in range(image.shape[0]):
        ref = reference[index]
        if not ref.any():
            continue
        rgb = gray_to_rgb(window_to_uint8(image[index], window))
        box = mask_to_box(ref)
        segmenter.set_image(rgb)
        first = segmenter.refine([box])
        found["box"].append(dice(first[0].mask, ref))
        again, _ = iterate_refine(segmenter.refine, first, rounds, 2)
        found["box+rounds"].append(dice(again[0].mask, ref))
        for padding in paddings:
            refine, restore = refine_with_context(segmenter, rgb, context_border(rgb.shape[:2], padding))
            found[f"box pad{padding}"].append(dice(refine([box])[0].mask, ref))
            restore()
    return {k: round(float(np.mean(v)), 3) for k, v in found.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--structures", nargs="+", default=["brain", "deep_grey", "ventricles"])
    parser.add_argument("--clip", nargs="+", default=["oracle", "oracle-noisy"])
    parser.add_argument("--modes", nargs="+", default=["propagate", "every-slice"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cache", type=Path, help="a file for the encodings and proposals, shared between calls")
    parser.add_argument("--no-bounds", action="store_true", help="skip the box bounds")
    parser.add_argument("--threads", type=int, help="torch threads (one is faster on a crowded CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    segmenter = CachedSegmenter(create_segmenter("litemedsam", resolve_device("cpu")))
    segmenter.expect_encodings(1000)  # ONNX Runtime from the first encoding, as in a whole-volume run
    if args.cache:
        segmenter.load(args.cache)
    proposal = ProposalSettings.from_dict(dict(get_segmenter_spec("litemedsam").proposal_defaults))
    loaded = read_image(args.folder / "t1.nii.gz")
    table = {}
    for structure in args.structures:
        reference = read_image(args.folder / f"{structure}.nii.gz").array > 0
        if not args.no_bounds:
            bounds = box_bounds(loaded.array, reference, segmenter)
            table[f"{structure}/bound"] = bounds
            print(f"{args.folder.name} {structure:<11} box bound per slice: {bounds}", flush=True)
            if args.cache:
                segmenter.save(args.cache)
        for clip in args.clip:
            for mode in args.modes:
                for name in args.variants:
                    row = run_variant(loaded.array, reference, loaded.spacing_kji, segmenter, structure, clip,
                                      mode, proposal, replace(VARIANTS[name]))
                    table[f"{structure}/{clip}/{mode}/{name}"] = row
                    print(f"{args.folder.name} {structure:<11} {clip:<13} {mode:<11} {name:<10} " + " ".join(
                        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
                    if args.json:
                        args.json.write_text(json.dumps(table, indent=1))
            if args.cache:
                segmenter.save(args.cache)


if __name__ == "__main__":
    main()
