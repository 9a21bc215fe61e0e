"""Benchmark the cascade: the paper's faithful configuration against our defaults, in one run.

    python Testing/Benchmarks/bench_cascade.py                      # LiteMedSAM, 40 MNI152 slices
    python Testing/Benchmarks/bench_cascade.py --profile sam-vit_b --slices 100 --faithful-slices 1
    python Testing/Benchmarks/bench_cascade.py --input scan.nii.gz --reference mask.nii.gz --json out.json

Variants, on the same volume and models:
  faithful-torch  as the original SaLIP code ran: crop layers 1 (extra encodings per slice), a
            fresh encoding for the refine step, the full cascade on every slice, no slice
            skipped, the image encoder and mask decoder in torch;
  faithful  the same configuration on our CPU runtime (ONNX Runtime, models.cpu_runtime);
  defaults  this project's defaults: one encoding per slice, uniform slices skipped, the
            full cascade on key slices and neighbours' boxes on the rest (--mode propagate),
            on our CPU runtime;
  every-slice, defaults-torch  (not run unless named) the defaults with the full cascade on
            every slice, what propagation's Dice is judged against over the whole range; the
            defaults in torch, to show what the runtime gains.
Two ratios: faithful-torch / defaults is the paper's configuration as it ran against ours;
faithful / defaults is what our configuration alone saves, both on the same runtime. (Off a
CPU, or without onnxruntime installed, every variant runs in torch.)
Per variant: seconds per volume and per slice, seconds per stage (encode, propose, score,
refine), peak resident memory of the process that ran it (and of the GPU, on CUDA), Dice
against the reference when there is one, and the two ratios. --device picks where the models
run, as the product does by default (CUDA, then MPS, then the CPU); the GPU target is
`--profile sam-vit_b --slices 150 --variants defaults` there.

The faithful configuration costs 15 to 35 s per slice with LiteMedSAM and minutes with SAM,
so by default it is timed on 4 slices spread over the range (--faithful-slices; 0 times every
slice) and its figures are scaled to the whole range: it treats every slice alike and
independently, so the sample's mean is the volume's. Our defaults always run the whole range,
since key slices and propagation make their cost depend on the volume. "Dice*" compares both
on the faithful sample's slices: a quick look, not a verdict, since the full cascade's Dice
jumps between neighbouring slices (0.02 to 0.81 on make bench's range); --faithful-slices 0
compares over the whole range.

Models: the `litemedsam` profile uses LiteMedSAM's real weights; `sam-vit_b` (and vit_l,
vit_h) builds segment_anything's real architecture with random weights when the official
checkpoint is absent: the cost of a forward pass does not depend on the weight values (their
IoU and stability thresholds are then lifted, so that candidates survive as with real weights).
Retrieval uses the oracle (Dice with the reference, real ranking) where there is a reference,
else (or when --clip names one) an open_clip architecture with random weights: its cost is
real, its ranking is not, so propagation may fall back more or less often than with real
weights. Any volume `salip segment` reads works; slices are the middle ones along the
acquisition axis.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import resource
import signal
import sys
from pathlib import Path

import numpy as np

STAGES = ("encode", "propose", "score", "refine")
# A variant named with this suffix ("defaults-torch") keeps the image encoder and mask decoder in
# torch on a CPU instead of ONNX Runtime, to show what the runtime gains.
TORCH_SUFFIX = "-torch"


def _load_inputs(args):
    """(path, volume, reference or None, axis, slice range): the middle slices along the acquisition axis."""
    from SaLIPSegmentLib.io import read_image
    from SaLIPSegmentLib.sample_data import mni152_brain_mask, mni152_t1_path
    from SaLIPSegmentLib.volume import acquisition_axis

    path = Path(args.input) if args.input else mni152_t1_path()
    image = read_image(path)  # any format `salip segment` reads: NRRD, NIfTI, MHA, DICOM folder, 2D
    volume = image.array
    if args.reference:
        reference = read_image(args.reference).array > 0
    elif not args.input:
        reference = mni152_brain_mask(volume)
    else:
        reference = None
    axis = acquisition_axis(image.spacing_kji, volume.shape)
    count = volume.shape[axis]
    start = max(0, count // 2 - args.slices // 2)
    return path, volume, reference, axis, (start, min(count, start + args.slices))


def _segmenter(profile: str, device):
    from SaLIPSegmentLib.models import create_segmenter, get_segmenter_spec, weights

    name = profile.replace("sam-", "")
    spec = get_segmenter_spec(name)
    if weights.find_local(spec.weights) is not None or name == "litemedsam":
        return create_segmenter(name, device, download=False), spec, "real weights"
    from segment_anything import sam_model_registry

    from SaLIPSegmentLib.models.sam import SamSegmenter

    return SamSegmenter(sam_model_registry[name](checkpoint=None), device, name), spec, "random weights"


def _scorer(clip: str, device):
    if clip in ("oracle", "oracle-noisy"):
        from SaLIPSegmentLib.models import create_scorer

        return create_scorer(clip), clip
    import open_clip

    from SaLIPSegmentLib.models.clip import ClipScorer

    model, _, preprocess = open_clip.create_model_and_transforms(clip, pretrained=None)
    return ClipScorer(model, preprocess, open_clip.get_tokenizer(clip), device, clip), "random weights"


def _variant_settings(variant: str, spec, random_weights: bool):
    from SaLIPSegmentLib.models import ProposalSettings

    values = dict(spec.proposal_defaults)
    if random_weights:
        # Random weights predict arbitrary IoU and stability, so SAM's thresholds would drop every
        # candidate and skip the work that real weights cause (scoring, refining, propagating).
        values.update(pred_iou_thresh=float("-inf"), stability_score_thresh=float("-inf"))
    if variant == "faithful":
        values["crop_n_layers"] = 1
        return ProposalSettings.from_dict(values), {
            "mode": "every-slice", "reencode_for_refine": True, "skip_empty_slices": False}
    if variant == "every-slice":
        return ProposalSettings.from_dict(values), {"mode": "every-slice"}
    return ProposalSettings.from_dict(values), {"mode": "propagate"}


def faithful_sample(slice_range, count: int) -> list:
    """`count` slices, each in the middle of an equal share of the range (all when count covers it).

    Not at the range's ends: the defaults run the full cascade there (key slices), and a sample
    of key slices would compare the full cascade with itself rather than propagation with it.
    """
    start, stop = slice_range
    if count <= 0 or count >= stop - start:
        return list(range(start, stop))
    return sorted({start + int((k + 0.5) * (stop - start) / count) for k in range(count)})


def run_variant(args, variant: str) -> dict:
    """One variant, measured in the process that calls it.

    The faithful configuration treats every slice alike and independently (no skipping, no
    propagation), so it may run on a sample of the range and be scaled to the whole range:
    that keeps a whole-volume comparison within minutes when the faithful one takes hours.
    """
    import torch

    from SaLIPSegmentLib.imaging import dice
    from SaLIPSegmentLib.models.device import resolve_device
    from SaLIPSegmentLib.prompts import resolve_prompt
    from SaLIPSegmentLib.settings import VolumeSettings
    from SaLIPSegmentLib.volume import segment_volume

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    # Each variant runs in its own process: the same seed gives random-weight models the same
    # weights in all of them, so their candidates, fallbacks and Dice compare.
    torch.manual_seed(0)
    path, volume, reference, axis, slice_range = _load_inputs(args)
    segmenter, spec, sam_weights = _segmenter(args.profile, device)
    scorer, clip_weights = _scorer(args.clip, device)
    base_variant = variant.removesuffix(TORCH_SUFFIX)
    proposal, options = _variant_settings(base_variant, spec, random_weights=sam_weights == "random weights")
    prompt = resolve_prompt(args.prompt)
    count = slice_range[1] - slice_range[0]
    sample = faithful_sample(slice_range, args.faithful_slices)
    sampled = base_variant == "faithful" and len(sample) < count
    runs = [((k, k + 1), k) for k in sample] if sampled else [(slice_range, None)]
    # The faithful sample stands for the whole range: its set-up choices are the whole range's.
    segmenter.expect_encodings(count)
    if sampled:
        # The runtime's one-off exports (models.cpu_runtime, about 4 s) happen here, untimed: inside
        # the sample they would be scaled up with it (tenfold for 4 slices of 40).
        shape = np.delete(volume.shape, axis)
        segmenter.set_image(np.zeros((*shape, 3), dtype=np.uint8))
        segmenter.refine([(0, 0, int(shape[1]) - 1, int(shape[0]) - 1)])
    results = [segment_volume(volume, segmenter, scorer, prompt.sentences,
                              VolumeSettings(top_k=prompt.top_k, axis=axis, slice_range=part, proposal=proposal,
                                             **options), reference=reference)
               for part, _ in runs]
    measured = sum(r.seconds for r in results)
    timed_slices = sum(len(r.slices) for r in results)
    seconds = measured * count / timed_slices  # the whole range; equal to `measured` when nothing was sampled
    stages = {stage: round(sum(s.seconds.get(stage, 0.0) for r in results for s in r.slices)
                             * count / timed_slices, 3) for stage in STAGES}
    row = {
        "variant": variant, "device": str(device), "input": str(path), "axis": axis, "slices": count,
        "profile": args.profile,
        "sam_weights": sam_weights, "clip": args.clip, "clip_weights": clip_weights,
        "seconds_per_volume": round(seconds, 3), "seconds_per_slice": round(seconds / count, 3),
        "seconds_per_stage": stages, "slices_timed": timed_slices, "seconds_measured": round(measured, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_gpu_mb": round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None,
        "crop_n_layers": proposal.crop_n_layers, "encoder_runtime": segmenter.encoder_runtime,
        "decoder_runtime": segmenter.decoder_runtime, **options,
        "slices_full_cascade": sum(r.summary()["slices_full_cascade"] for r in results),
        "slices_propagated": sum(r.summary()["slices_propagated"] for r in results),
    }
    if reference is not None:
        mask = np.moveaxis(np.logical_or.reduce([r.mask for r in results]), axis, 0)
        truth = np.moveaxis(reference, axis, 0)
        timed = [k for part, _ in runs for k in range(*part)]
        row["dice_volume"] = round(dice(mask[timed], truth[timed]), 4)
        row["dice_mean_per_slice"] = round(float(np.mean([dice(mask[k], truth[k]) for k in timed])), 4)
        # The same slices as the faithful sample, so the two Dice figures compare like with like.
        row["dice_on_faithful_sample"] = round(dice(mask[sample], truth[sample]), 4)
    return row


def _child(args, variant, queue):
    if variant.endswith(TORCH_SUFFIX):
        from SaLIPSegmentLib.models.cpu_runtime import RUNTIME_VARIABLE

        os.environ[RUNTIME_VARIABLE] = "torch"
    try:
        queue.put(run_variant(args, variant))
    except BaseException as error:  # reported by the parent
        queue.put({"variant": variant, "error": repr(error)})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", help="volume file (default: nilearn's MNI152 T1)")
    parser.add_argument("--reference", help="reference mask for Dice and the oracle scorer")
    parser.add_argument("--slices", type=int, default=40, help="middle slices to process (default 40)")
    parser.add_argument("--faithful-slices", type=int, default=4, metavar="K",
                        help="time the faithful configuration on K slices spread over the range and scale "
                             "its figures to the whole range (default 4; 0: every slice)")
    parser.add_argument("--profile", default="litemedsam", help="litemedsam, sam-vit_b, sam-vit_l, sam-vit_h")
    parser.add_argument("--clip", default="auto",
                        help="oracle, oracle-noisy (CLIP-like: 22 + 8 x Dice + noise), or an open_clip "
                             "architecture (ViT-B-32); auto (default) = the oracle where there is a reference "
                             "(the sample, or --reference), else ViT-B-32")
    parser.add_argument("--prompt", default="brain")
    parser.add_argument("--threads", type=int, default=0, help="torch's CPU threads (default: torch's own choice)")
    parser.add_argument("--device", default="auto",
                        help="auto (default: CUDA, then MPS, then the CPU, as the product picks), cpu, cuda, cuda:N")
    parser.add_argument("--variants", default="faithful-torch,faithful,defaults",
                        help="comma-separated: faithful, defaults, every-slice, and any with -torch (encoder "
                             "and decoder in torch rather than ONNX Runtime on a CPU)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.clip == "auto":
        args.clip = "oracle" if args.reference or not args.input else "ViT-B-32"
    elif args.clip in ("oracle", "oracle-noisy") and args.input and not args.reference:
        parser.error(f"the {args.clip} scorer needs --reference for a volume other than the sample")
    print(f"retrieval: {args.clip}" + (" (random weights: the cost is real, the ranking is not)"
                                       if not args.clip.startswith("oracle") else ""), file=sys.stderr)

    context = multiprocessing.get_context("spawn")  # each variant's peak memory is its own
    # A stopped benchmark must not leave a variant computing in the background.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows = []
    for variant in args.variants.split(","):
        queue = context.Queue()
        child = context.Process(target=_child, args=(args, variant, queue), daemon=True)
        child.start()
        try:
            rows.append(queue.get())
            child.join()
        finally:
            if child.is_alive():
                child.terminate()
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)

    # Dice is over the slices each variant ran; "Dice*" over the faithful variant's sample only.
    print(f"\n{'variant':<15}{'timed':>9}{'s/volume':>10}{'s/slice':>9}" + "".join(f"{s:>9}" for s in STAGES)
          + f"{'peak MB':>9}{'Dice':>8}{'Dice*':>8}")
    for row in rows:
        if "error" in row:
            print(f"{row['variant']:<15} failed: {row['error']}")
            continue
        stages = "".join(f"{row['seconds_per_stage'][s]:>9.2f}" for s in STAGES)
        timed_of = f"{row['slices_timed']}/{row['slices']}"
        print(f"{row['variant']:<15}{timed_of:>9}{row['seconds_per_volume']:>10.2f}{row['seconds_per_slice']:>9.2f}"
              f"{stages}{row['peak_rss_mb']:>9.0f}{row.get('dice_volume', float('nan')):>8.3f}"
              f"{row.get('dice_on_faithful_sample', float('nan')):>8.3f}"
              + (f"  GPU peak {row['peak_gpu_mb']:.0f} MB" if row.get("peak_gpu_mb") is not None else ""))
    if any(row.get("slices_timed", 0) < row.get("slices", 0) for row in rows):
        print("(a variant timed on fewer slices than the range is scaled to the whole range"
              + ("; its time is representative, its Dice is not: the full cascade's Dice jumps between "
                 "neighbouring slices, so judge quality over the whole range with --faithful-slices 0)"
                 if any("dice_volume" in row for row in rows) else ")"))
    timed = {row["variant"]: row for row in rows if "error" not in row}
    summary = {"rows": rows}
    if "defaults" in timed:
        print()
        for faithful, meaning in (("faithful-torch", "the paper's configuration as its code ran, in torch"),
                                  ("faithful", "the same configuration on our runtime: what our defaults save")):
            if faithful in timed:
                ratio = timed[faithful]["seconds_per_volume"] / max(timed["defaults"]["seconds_per_volume"], 1e-9)
                summary[f"speedup_{faithful.replace('-', '_')}_over_defaults"] = round(ratio, 2)
                print(f"{faithful + ' / defaults:':<28}{ratio:6.2f}x per volume ({meaning})")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2) + "\n")
    return 1 if any("error" in row for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
