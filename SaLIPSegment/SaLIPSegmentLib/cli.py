"""The `salip` command: segment a volume from a text prompt, list prompts, manage models."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import __version__
from .errors import Cancelled, InputError, SalipError

AXES = ("auto", "0", "1", "2")

EPILOG = """exit codes: 0 done, 1 internal error, 2 usage, 3 bad input, 4 model or weights,
5 output not writable or exists, 130 cancelled. See README.md."""


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    # catalog, not the registry: the registry imports torch, and `salip --help` must not wait for it.
    from .models.catalog import DEFAULT_SCORER, DEFAULT_SEGMENTER, PRECISIONS, PROFILES

    group = parser.add_argument_group("models")
    group.add_argument("--profile", choices=sorted(PROFILES),
                       help="model pair: " + "; ".join(f"{k} = {v[0]} + {v[1]}" for k, v in PROFILES.items())
                            + ". Without --profile or --sam: default where a GPU is, fast on a CPU "
                              "(--sam and --clip override it)")
    group.add_argument("--fast", dest="profile", action="store_const", const="fast",
                       help="short for --profile fast (LiteMedSAM + CLIP ViT-B/32: minutes on a CPU)")
    group.add_argument("--sam", help=f"segmenter: vit_b, vit_l, vit_h or litemedsam (default {DEFAULT_SEGMENTER})")
    group.add_argument("--sam-checkpoint", type=Path, help="use this SAM weights file instead of resolving one")
    group.add_argument("--clip",
                       help=f"CLIP as MODEL:TAG, MODEL:/path/to/checkpoint, biomedclip, oracle or oracle-noisy "
                            f"(default {DEFAULT_SCORER})")
    group.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    group.add_argument("--precision", choices=PRECISIONS, default="auto",
                       help="autocast precision of the models: auto (default) = fp16 on CUDA GPUs, "
                            "fp32 elsewhere; fp32 forces full precision everywhere")
    group.add_argument("--model-dir", type=Path,
                       help="folder with weights files for machines without internet (or SALIP_MODEL_DIR)")


def _add_proposal_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("proposal settings (defaults depend on --sam)")
    group.add_argument("--points-per-side", type=int, help="SAM point grid per side (SAM default 32)")
    group.add_argument("--pred-iou-thresh", type=float, help="minimum predicted IoU of a candidate")
    group.add_argument("--stability-thresh", type=float, help="minimum stability score of a candidate")
    group.add_argument("--crop-layers", type=int, help="extra crop layers, each costs encodings (paper: 1)")
    group.add_argument("--max-area", type=float, help="drop candidates above this fraction of the slice")
    group.add_argument("--min-region-area", type=int, help="remove islands and holes below this many pixels")
    group.add_argument("--adapt", action="store_true",
                       help="label-free test-time adaptation: pick the proposal thresholds per volume from a "
                            "small grid by predicted IoU, stability, neighbour agreement and CLIP score")


def _add_prompt_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-p", "--prompt", help="preset name (see `salip prompts`) or free text; a near miss of a "
                                               "preset name ('lugns') is refused with a suggestion")
    parser.add_argument("--preset", help="a preset by name; unlike -p, an unknown name is an error")
    parser.add_argument("--free-text", action="store_true",
                        help="take -p as free text even where it looks like a misspelt preset name")


def _add_segment_options(parser: argparse.ArgumentParser) -> None:
    """What to segment and how: shared by `segment` and `batch`."""
    from .settings import MODES, CleanupSettings, PropagationSettings

    _add_prompt_options(parser)
    parser.add_argument("--axis", default="auto", choices=AXES,
                        help="numpy axis to slice along: 0 (k), 1 (j), 2 (i), or auto = largest spacing")
    parser.add_argument("--window", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="intensity window (default: robust 0.5-99.5 percentiles)")
    parser.add_argument("--top-k", type=int, help="candidates kept per slice (default from the preset)")
    parser.add_argument("--mode", choices=MODES, default=MODES[0],
                        help="propagate (default): full cascade on key slices, neighbours' boxes elsewhere; "
                             "every-slice: the full cascade on every slice, as the paper")
    key_interval = PropagationSettings.key_interval
    parser.add_argument("--key-interval", type=int, default=key_interval,
                        help=f"with --mode propagate, key slices at both ends and at most N apart "
                             f"(default {key_interval})")
    key_distance = PropagationSettings.key_distance_mm
    parser.add_argument("--key-distance", type=float, default=key_distance, metavar="MM",
                        help=f"and at most MM millimetres apart along the axis, so thick slices get more key "
                             f"slices (default {key_distance:g}; 0: off)")
    _add_presence_option(parser)
    _add_shape_options(parser)
    fill_holes = CleanupSettings.fill_holes
    cleanup = parser.add_argument_group("3D clean-up")
    cleanup.add_argument("--keep-largest", action="store_true",
                        help="keep the top-k largest 3D components (top-k from the preset: two lungs; default off)")
    cleanup.add_argument("--fill-holes", action=argparse.BooleanOptionalAction, default=fill_holes,
                         help="fill holes enclosed in each slice's mask; --no-fill-holes for a target that is a "
                              f"ring round a lumen (default {'on' if fill_holes else 'off'})")
    cleanup.add_argument("--fill-flagged", action="store_true",
                        help="replace flagged slices by what their two neighbours agree on (default off)")


def _add_shape_options(parser: argparse.ArgumentParser) -> None:
    from .settings import ShapeSettings

    defaults = ShapeSettings()
    shape = parser.add_argument_group("mask shape (shape.py; figures in Testing/Benchmarks/RESULTS.md)")
    shape.add_argument("--unite-parts", action=argparse.BooleanOptionalAction, default=None,
                       help="add other candidates to the retrieved one while the scorer ranks the union higher, "
                            f"then refine with the union's box (default {'on' if defaults.unite_parts else 'off'})")
    shape.add_argument("--union-max-gap", type=float, metavar="F",
                       help="only parts within F x the union's equivalent diameter may join it "
                            f"(default {defaults.union_max_gap})")
    shape.add_argument("--refine-rounds", type=int, metavar="N",
                       help="prompt again with the refined mask's box, up to N more times, until the box holds "
                            f"(default {defaults.refine_rounds})")
    shape.add_argument("--fill-part-holes", action=argparse.BooleanOptionalAction, default=None,
                       help="fill holes inside each slice's closed outline as the run goes "
                            f"(default {'on' if defaults.fill_holes else 'off'})")
    shape.add_argument("--context-padding", type=float, metavar="F",
                       help="refine on the slice padded with F x its longest side of background on each side; "
                            f"one more encoding per slice (default {defaults.context_padding})")
    shape.add_argument("--zoom-factor", type=float, metavar="F",
                       help="refine a small box on a window F x as wide, enlarged to the model's input, where that "
                            f"enlarges it at least twice; one more encoding per such slice; 0: never "
                            f"(default {defaults.zoom_factor})")


def _add_presence_option(parser: argparse.ArgumentParser) -> None:
    from .settings import PresenceSettings

    parser.add_argument("--presence", action=argparse.BooleanOptionalAction, default=None,
                        help="remove the mask from slices where the target is judged absent: each painted "
                             "slice's mask is scored once more, and where the scores form two groups the slices "
                             "outside the target's one run lose their mask (--no-presence: paint every slice); "
                             f"default {'on' if PresenceSettings.enabled else 'off'}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="salip",
        description="Zero-shot organ segmentation from a text prompt (SaLIP: SAM proposes, CLIP retrieves, "
                    "SAM refines), slice by slice.",
        epilog=EPILOG,
    )
    parser.add_argument("--version", action="version", version=f"salip {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_segment_command(commands)
    _add_evaluate_commands(commands)
    _add_batch_command(commands)
    _add_tool_commands(commands)
    return parser


def _add_segment_command(commands) -> None:
    segment = commands.add_parser(
        "segment", help="segment a volume or 2D image and write a segmentation or labelmap", epilog=EPILOG,
        description="Read INPUT (NRRD, NIfTI, MHA, DICOM folder, 2D image), segment PROMPT on every slice, "
                    "write the result on the input's geometry in the format OUTPUT's name says.",
    )
    segment.add_argument("input", type=Path, help="volume file, DICOM series folder, or 2D image")
    # A str, not a Path: Path drops the trailing "/" that says "a folder".
    segment.add_argument("-o", "--output", required=True,
                         help="NAME.seg.nrrd (Slicer segmentation), NAME.nii.gz / .nii / .nrrd / .mha (uint8 "
                              "labelmap, 1 = target), or a folder (existing, or ending in /) for INPUT_PROMPT.seg.nrrd")
    segment.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")
    segment.add_argument("--slices", metavar="A:B", help="slice range along the axis, B excluded (default all)")
    segment.add_argument("--reference", type=Path, help="reference mask, required by --clip oracle and oracle-noisy")
    segment.add_argument("--report", type=Path, help="write per-slice scores and timings to this JSON file")
    segment.add_argument("--hints", type=Path, metavar="HINTS.json",
                         help="fixes for some slices (a box, points, or no target; schema in README): each hinted "
                              "slice is segmented from its hint and propagation re-runs around it")
    _add_segment_options(segment)
    segment.add_argument("-q", "--quiet", action="store_true", help="no progress bar or summary")
    _add_model_options(segment)
    _add_proposal_options(segment)
    segment.set_defaults(run=run_segment)


def _add_evaluate_commands(commands) -> None:
    evaluate = commands.add_parser(
        "evaluate", help="measure the cascade against a reference mask, stage by stage", epilog=EPILOG,
        description="Run the full cascade on every slice of INPUT and report Dice, mean per-slice Dice, "
                    "HD95 and, per stage, the proposal ceiling, the retrieved candidate, the refined mask and "
                    "the box upper bound. With --clip oracle, everything but retrieval is measured.",
    )
    evaluate.add_argument("input", type=Path)
    evaluate.add_argument("reference", type=Path, help="reference mask on the input's grid (non-zero = target)")
    _add_prompt_options(evaluate)
    evaluate.add_argument("--axis", default="auto", choices=AXES, help="0, 1, 2 or auto (largest spacing)")
    evaluate.add_argument("--slices", metavar="A:B", help="slice range along the axis, B excluded")
    evaluate.add_argument("--window", nargs=2, type=float, metavar=("LOW", "HIGH"))
    evaluate.add_argument("--top-k", type=int)
    evaluate.add_argument("--modes", default="propagate,every-slice",
                          help="comma-separated modes in which to run the product as `salip segment` does and "
                               "measure it (3D Dice, HD95, painted and missed slices, flag recall and precision); "
                               "'none' for the stage table only (default propagate,every-slice)")
    _add_presence_option(evaluate)
    _add_shape_options(evaluate)
    evaluate.add_argument("--no-stages", dest="stages", action="store_false",
                          help="skip the stage-by-stage table (its own full cascade on every slice)")
    evaluate.add_argument("--simulate-corrections", type=int, metavar="N", default=0,
                          help="after the automatic pass (propagate mode), a simulated user fixes N slices one at a "
                               "time with the reference's box (or 'no target'): the slice the QA ranks worst, and, "
                               "for a second curve, the slice worst by Dice; reports Dice and seconds per correction")
    evaluate.add_argument("--json", type=Path, help="write the figures and the per-slice table here")
    evaluate.add_argument("--overwrite", action="store_true", help="replace the --json file if it exists")
    evaluate.add_argument("-q", "--quiet", action="store_true")
    _add_model_options(evaluate)
    _add_proposal_options(evaluate)
    evaluate.set_defaults(run=run_evaluate)

    dataset = commands.add_parser(
        "evaluate-dataset", help="evaluate over many (image, reference) pairs; CSV and Markdown tables",
        epilog=EPILOG,
        description="PAIRS is a CSV with columns image,reference (paths relative to it) or a folder with "
                    "images/ and labels/ (nnU-Net's imagesTr/labelsTr too). A failing case is recorded and the "
                    "run goes on. Writes OUT.csv and OUT.md: one row per case, then the means.",
    )
    dataset.add_argument("pairs", type=Path)
    _add_prompt_options(dataset)
    dataset.add_argument("-o", "--output", type=Path, required=True, help="table path without suffix")
    dataset.add_argument("--axis", default="auto", choices=AXES)
    dataset.add_argument("--top-k", type=int)
    dataset.add_argument("--overwrite", action="store_true")
    dataset.add_argument("-q", "--quiet", action="store_true")
    _add_model_options(dataset)
    _add_proposal_options(dataset)
    dataset.set_defaults(run=run_evaluate_dataset)


def _add_batch_command(commands) -> None:
    batch = commands.add_parser(
        "batch", help="segment a whole dataset: resumable, in parallel, on this machine or a Ray cluster",
        epilog=EPILOG + " batch exits 3 when any case failed; the summary and the manifest say which.",
        description="Segment every volume in INPUTS (a folder of volume files and DICOM series folders, or a CSV "
                    "with an image column and an optional case column) into OUTPUT_DIR: CASE.seg.nrrd (or "
                    "CASE.nii.gz with --format nifti) and CASE.report.json. OUTPUT_DIR/salip-batch-manifest.json "
                    "records each case's input SHA256 and settings; a second run skips finished cases and "
                    "redoes those whose input or settings changed. A failing case is recorded and the run goes on.",
    )
    batch.add_argument("inputs", type=Path, help="folder of volumes / DICOM series folders, or a CSV list")
    batch.add_argument("output_dir", type=Path, help="folder for the outputs and the manifest (created if missing)")
    batch.add_argument("--format", choices=("seg.nrrd", "nifti"), default="seg.nrrd",
                       help="seg.nrrd (Slicer segmentation, default) or nifti (uint8 labelmap, label 1, for "
                            "nnU-Net-style datasets)")
    batch.add_argument("--workers", type=int,
                       help="parallel workers, each loading the models once (default: one per GPU, else 1)")
    batch.add_argument("--engine", choices=("local", "ray"), default="local",
                       help="local: processes on this machine; ray: actors on a Ray cluster")
    batch.add_argument("--address", help="with --engine ray: the cluster's address, e.g. 10.0.0.5:6379 "
                                         "(default: RAY_ADDRESS, else a new local instance)")
    batch.add_argument("--overwrite", action="store_true",
                       help="replace output files this batch did not write (or that were edited since)")
    _add_segment_options(batch)
    batch.add_argument("-q", "--quiet", action="store_true", help="no progress bar; the summary only")
    _add_model_options(batch)
    _add_proposal_options(batch)
    batch.set_defaults(run=run_batch, slices=None)


def _add_tool_commands(commands) -> None:
    """qa, prompts and models: no model runs."""
    qa = commands.add_parser("qa", help="draw a QA picture from a segment --report (or the correction curves "
                                        "from an evaluate --simulate-corrections --json file)")
    qa.add_argument("report", type=Path, help="the JSON written by salip segment --report or salip evaluate --json")
    qa.add_argument("-o", "--output", type=Path, required=True, help="PNG to write")
    qa.add_argument("--overwrite", action="store_true")
    qa.set_defaults(run=run_qa)

    prompts = commands.add_parser("prompts", help="list prompt presets, or show one")
    prompts.add_argument("name", nargs="?", help="show this preset's sentences")
    prompts.set_defaults(run=run_prompts)

    models = commands.add_parser("models", help="list, download or verify model weights")
    models_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    listing = models_commands.add_parser("list", help="known models, whether present, and where")
    listing.add_argument("--model-dir", type=Path)
    listing.set_defaults(run=run_models_list)
    download = models_commands.add_parser("download", help="download weights into the cache")
    download.add_argument("name", help="a SAM name (vit_b, ...) or CLIP MODEL:TAG")
    download.add_argument("--model-dir", type=Path)
    download.set_defaults(run=run_models_download)
    verify = models_commands.add_parser("verify", help="check the SHA256 of weights on this machine")
    verify.add_argument("name", nargs="?", help="one model (default: all present)")
    verify.add_argument("--model-dir", type=Path)
    verify.set_defaults(run=run_models_verify)


# -- segment -------------------------------------------------------------------------


class _ProgressBar:
    """A tqdm bar on stderr driven by progress(done, total) callbacks; silent with --quiet.

    `after`: the bar of the phase before this one, closed when this one starts.
    """

    def __init__(self, quiet: bool, description: str, after: Optional[_ProgressBar] = None):
        self.quiet, self.description, self.bar, self.after = quiet, description, None, after

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            if self.after is not None:
                self.after.close()
            self.bar = tqdm(total=total, initial=done, unit="slice", desc=self.description, file=sys.stderr)
        self.bar.total = total  # a correction's count can grow past its plan (corrections._Redo)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _say(quiet: bool):
    return (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))


def _say_past(bars: List[_ProgressBar], say):
    """`say`, which closes the open bars first: a line written under an open tqdm bar lands on its line."""
    def said(*text) -> None:
        for bar in bars:
            bar.close()
        say(*text)
    return said


def _check_prompt_and_profile(args) -> str:
    """What every model command checks first: a misspelt preset, then the model pair for this machine.

    Returns the line to say about the profile chosen for this machine ("" when the user chose).
    """
    from .arguments import check_prompt_spelling, choose_profile

    check_prompt_spelling(args.prompt, args.free_text)
    return choose_profile(args) or ""


def _checked_and_announced(args) -> None:
    """_check_prompt_and_profile, saying the profile's line at once (batch and evaluate check little more)."""
    note = _check_prompt_and_profile(args)
    if note:
        _say(args.quiet)(note)


def run_segment(args) -> int:
    from .arguments import check_reference, check_slicing
    from .io import ascii_segment_name, check_writable, read_image, write_json
    from .models import resolve_device
    from .models.catalog import ORACLES
    from .outputs import default_output_name, resolve_output, write_output
    from .pipeline import load_models, precision_note, segment_image, settings_from_args

    say = _say(args.quiet)
    profile_note = _check_prompt_and_profile(args)
    settings = settings_from_args(args)
    prompt = settings.prompt
    target = resolve_output(args.output, default_output_name(args.input, prompt.name), args.overwrite)
    if args.report is not None:
        check_writable(args.report, overwrite=args.overwrite)
    hints = _read_hints(args.hints)
    image = read_image(args.input)
    check_slicing(settings.axis, settings.slices, image)
    needed_by = f"--clip {settings.clip}" if settings.clip in ORACLES else ""
    reference = check_reference(args.reference, image, needed_by=needed_by)
    reference = None if reference is None else reference.array
    if profile_note:
        say(profile_note)
    say(f"Prompt: {prompt.display_name} ({'preset' if prompt.is_preset else 'free text'}, top-k {settings.top_k})")

    device = resolve_device(settings.device)
    loading = time.perf_counter()
    segmenter, scorer = load_models(settings.sam, settings.clip, device, settings.sam_checkpoint,
                                    settings.model_dir, progress=not args.quiet, precision=settings.precision)
    load_seconds = time.perf_counter() - loading
    say(f"Models: {settings.sam} + {settings.clip} on {device}{precision_note(device, settings.precision)} "
        f"(loaded in {load_seconds:.1f} s)")

    progress = _ProgressBar(args.quiet, "segmenting")
    hint_progress = _ProgressBar(args.quiet, "applying hints", after=progress)
    try:
        mask, report = segment_image(image, settings, segmenter, scorer, reference=reference,
                                     progress=progress, say=_say_past([progress, hint_progress], say), hints=hints,
                                     hint_progress=hint_progress)
    except KeyboardInterrupt:
        raise Cancelled("Cancelled; nothing was written.") from None
    finally:
        progress.close()
        hint_progress.close()

    if target.kind == "segmentation" and ascii_segment_name(prompt.display_name) != prompt.display_name:
        say(f"NRRD headers hold ASCII only: the segment is named '{ascii_segment_name(prompt.display_name)}'.")
    output = write_output(target, mask, image, prompt.display_name, prompt.color)
    if args.report is not None:
        # Absolute, so that `salip qa` finds them from any folder.
        write_json(args.report, {"input": str(args.input.resolve()), "output": str(output.resolve()),
                                 "output_kind": target.kind, "device": str(device),
                                 "model_load_seconds": round(load_seconds, 3), **report})
    for notice in report["summary"]["notices"] + report["summary"]["warnings"]:
        say(notice)
    say(_final_line(output, target.kind, prompt.display_name, int(mask.sum()), report, args.report))
    return 0


def _read_hints(path: Optional[Path]):
    """The --hints file's JSON (checked against the run later, before any model runs), or None."""
    if path is None:
        return None
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"Hints file {path} does not exist.") from None
    except (OSError, ValueError) as error:
        raise InputError(f"Hints file {path} is not readable JSON: {error}") from None


def _final_line(output, kind, name, voxels, report, report_path) -> str:
    """What was written, how much, which slices to look at, and where the details are."""
    summary = report["summary"]
    flagged = [row["index"] for row in report["slices"] if row.get("flags")]
    shown = ", ".join(str(i) for i in flagged[:8]) + (", ..." if len(flagged) > 8 else "")
    what = "labelmap" if kind == "labelmap" else "segmentation"
    verdict = summary.get("verdict") or f"{len(flagged)} slices flagged"  # reports written before the verdict
    looks = f"{verdict} ({shown})" if flagged else verdict
    details = f"report: {report_path}" if report_path is not None else "no report (--report FILE writes one)"
    return (f"Wrote {output} ({what}): '{name}', {voxels} voxels on {summary['slices_with_mask']} of "
            f"{summary['slices_in_range']} slices in {summary['seconds']:.1f} s; {looks}; {details}.")


def run_batch(args) -> int:
    from .batch import cancelled_error
    from .batch import run_batch as run
    from .io import find_volumes
    from .pipeline import settings_from_args

    _checked_and_announced(args)
    settings = settings_from_args(args)
    if args.workers is not None and args.workers < 1:
        raise InputError("--workers must be at least 1.")
    if args.address and args.engine != "ray":
        raise InputError("--address needs --engine ray.")
    # An output folder inside the input folder is not a DICOM series to segment.
    cases = [(case, path) for case, path in find_volumes(args.inputs) if path != args.output_dir.resolve()]
    if not cases:
        raise InputError(f"No volumes found in {args.inputs}.")
    summary = run(cases, args.output_dir, settings, output_format=args.format, engine=args.engine,
                  workers=args.workers, address=args.address, overwrite=args.overwrite,
                  say=(lambda *a: None) if args.quiet else (lambda text: print(text, file=sys.stderr)),
                  show_progress=not args.quiet)
    print(summary.table())
    if summary.cancelled:
        raise cancelled_error(summary)
    return 3 if summary.failed else 0


def run_evaluate(args) -> int:
    import numpy as np

    from .arguments import check_reference, check_slicing
    from .io import check_writable, read_image, write_json
    from .models import resolve_device
    from .pipeline import apply_profile, evaluation_settings, load_models, prompt_from_args, proposal_variants
    from .volume import as_volume

    _checked_and_announced(args)
    apply_profile(args)
    prompt = prompt_from_args(args)
    top_k = args.top_k if args.top_k is not None else prompt.top_k
    modes = _evaluation_modes(args.modes)
    if args.simulate_corrections < 0:
        raise InputError("--simulate-corrections takes a number of corrections, 0 or more.")
    if args.json is not None:
        check_writable(args.json, overwrite=args.overwrite)
    image = read_image(args.input)
    volume = as_volume(image.array)
    reference = check_reference(args.reference, image).array > 0
    axis, slice_range = check_slicing(args.axis, args.slices, image)
    device = resolve_device(args.device)
    segmenter, scorer = load_models(args.sam, args.clip, device, args.sam_checkpoint, args.model_dir,
                                    progress=not args.quiet, precision=args.precision)
    settings = dataclasses.replace(evaluation_settings(args, top_k), axis=axis, slice_range=slice_range)
    settings = settings.for_thickness(image.spacing_kji[axis])
    variants = proposal_variants(volume, reference, segmenter, scorer, prompt.sentences, settings)
    with_reference = int(np.moveaxis(reference, axis, 0)[slice(*slice_range)].any(axis=(1, 2)).sum())
    print(f"{prompt.display_name}: {with_reference} slices with reference tissue, {args.sam} + {args.clip}")
    figures = {"input": str(args.input), "reference": str(args.reference), "prompt": prompt.to_dict(),
               "sam": args.sam, "clip": args.clip, "top_k": top_k, "axis": axis, "slice_range": list(slice_range)}
    if args.stages:
        figures.update(_evaluate_stages(args, volume, reference, image, segmenter, scorer, prompt, variants))
    if modes:
        figures["modes"] = _evaluate_product(args, volume, reference, image, segmenter, scorer, prompt,
                                             variants[-1][1], modes)
    if args.simulate_corrections:
        figures["corrections"] = _simulate_corrections(args, volume, reference, segmenter, scorer, prompt,
                                                       variants[-1][1])
    if args.json is not None:
        write_json(args.json, figures)
    return 0


def _evaluation_modes(text: str) -> List[str]:
    from .settings import MODES

    modes = [] if text.strip() == "none" else [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise InputError(f"--modes takes {', '.join(MODES)} or none, not {', '.join(unknown)}.")
    return modes


def _show(value) -> str:
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return str(value) if isinstance(value, int) else f"{value:.3f}"


def _evaluate_stages(args, volume, reference, image, segmenter, scorer, prompt, variants) -> dict:
    """The stage-by-stage table (every slice, full cascade) per proposal variant; its JSON fields."""
    from .evaluation import evaluate_volume

    results = []
    for name, run in variants:
        bar = _ProgressBar(args.quiet, f"evaluating ({name})")
        try:
            results.append((name, evaluate_volume(volume, reference, segmenter, scorer, prompt.sentences, run,
                                                  spacing=image.spacing_kji, progress=bar)))
        finally:
            bar.close()
    print("Stages (the full cascade on every slice):")
    print(f"  {'':<28}" + "".join(f"{name:>10}" for name, _ in results))
    for label, key in (("Dice (volume)", "dice_volume"), ("Dice (mean per slice)", "dice_mean_per_slice"),
                       ("HD95 (mm)", "hd95_mm"), ("proposal ceiling", "ceiling_mean"),
                       ("retrieved candidate", "retrieved_mean"), ("refined (final)", "dice_mean_per_slice"),
                       ("box upper bound", "box_bound_mean"), ("false-positive slices", "false_positive_slices"),
                       ("seconds", "seconds")):
        print(f"  {label:<28}" + "".join(f"{_show(float(getattr(r, key))):>10}" for _, r in results))
    return {**results[0][1].to_dict(),
            "variants": {name: {"proposal": dataclasses.asdict(run.proposal), **r.to_dict()}
                         for (name, run), (_, r) in zip(variants, results)}}


def _evaluate_product(args, volume, reference, image, segmenter, scorer, prompt, run, modes) -> dict:
    """The product's table, one column per mode (what `salip segment` would write); its JSON field."""
    from .evaluation import evaluate_modes

    bar = _ProgressBar(args.quiet, "segmenting (" + ", ".join(modes) + ")")
    try:
        results = evaluate_modes(volume, reference, segmenter, scorer, prompt.sentences, run, modes,
                                 spacing=image.spacing_kji, progress=bar)
    finally:
        bar.close()
    print("The product (as `salip segment` runs it):")
    print(f"  {'':<28}" + "".join(f"{r.mode:>13}" for r in results))
    for label, key in (("Dice (volume)", "dice_volume"), ("HD95 (mm)", "hd95_mm"),
                       ("painted without target", "painted_without_target"), ("missed slices", "missed_slices"),
                       ("slices with Dice < 0.5", "poor_slices"), ("flagged slices", "flagged_slices"),
                       ("flag recall", "flag_recall"), ("flag precision", "flag_precision"), ("seconds", "seconds")):
        print(f"  {label:<28}" + "".join(f"{_show(getattr(r, key)):>13}" for r in results))
    return {r.mode: r.to_dict() for r in results}


def _simulate_corrections(args, volume, reference, segmenter, scorer, prompt, run) -> dict:
    """The two correction curves (simulation.py), printed as a table; their JSON field."""
    from .simulation import simulate_corrections

    bar = _ProgressBar(args.quiet, "segmenting")
    try:
        found = simulate_corrections(volume, reference, segmenter, scorer, prompt.sentences,
                                     dataclasses.replace(run, mode="propagate"), args.simulate_corrections,
                                     progress=bar, say=_say_past([bar], _say(args.quiet)))
    finally:
        bar.close()
    print(f"Simulated corrections (reference box or 'no target' on one slice each; box bound "
          f"{found.box_bound_dice_volume:.3f}, embeddings kept: {found.embedding_mib:.0f} MiB):")
    print(f"  {'':<10}" + "".join(f"{name + ': slice':>18}{'Dice':>8}{'s':>9}" for name in found.curves))
    for step in range(max(len(c) for c in found.curves.values())):
        cells = []
        for curve in found.curves.values():
            row = curve[step] if step < len(curve) else None
            cells.append(f"{'':>18}{'':>8}{'':>9}" if row is None else  # an automatic pass can take 1000 s and more
                         f"{'auto' if row.slice is None else row.slice:>18}{row.dice_volume:>8.3f}{row.seconds:>9.2f}")
        print(f"  {'#' + str(step):<10}" + "".join(cells))
    return found.to_dict()


TABLE_COLUMNS = ("case", "status", "slices_with_reference", "dice_volume", "dice_mean_per_slice", "hd95_mm",
                 "ceiling_mean", "retrieved_mean", "box_bound_mean", "false_positive_slices", "seconds")


def run_evaluate_dataset(args) -> int:
    import csv
    import io as text_io
    import math

    from .arguments import grid_difference
    from .evaluation import evaluate_volume
    from .io import check_writable, find_pairs, read_image, write_atomically
    from .models import resolve_device
    from .pipeline import apply_profile, axis_for, evaluation_settings, load_models, prompt_from_args, proposal_variants

    _checked_and_announced(args)
    apply_profile(args)
    prompt = prompt_from_args(args)
    top_k = args.top_k if args.top_k is not None else prompt.top_k
    csv_path = check_writable(args.output.with_suffix(".csv"), overwrite=args.overwrite)
    md_path = check_writable(args.output.with_suffix(".md"), overwrite=args.overwrite)
    pairs = find_pairs(args.pairs)
    if not pairs:
        raise InputError(f"No (image, reference) pairs found in {args.pairs}.")
    device = resolve_device(args.device)
    segmenter, scorer = load_models(args.sam, args.clip, device, args.sam_checkpoint, args.model_dir,
                                    progress=not args.quiet, precision=args.precision)
    settings = evaluation_settings(args, top_k)
    rows = []
    for number, (case, image_path, reference_path) in enumerate(pairs, start=1):
        try:
            image = read_image(image_path)
            reference_image = read_image(reference_path)
            difference = grid_difference(reference_image, image)
            if difference is not None:
                raise InputError(f"the reference is not on the image's grid: {difference}")
            reference = reference_image.array > 0
            axis = axis_for(args.axis, image)
            case_settings = dataclasses.replace(settings, axis=axis).for_thickness(image.spacing_kji[axis])
            _, run = proposal_variants(image.array, reference, segmenter, scorer, prompt.sentences, case_settings)[-1]
            result = evaluate_volume(image.array, reference, segmenter, scorer, prompt.sentences, run,
                                     spacing=image.spacing_kji)
            row = {"case": case, "status": "ok", **{k: v for k, v in result.to_dict().items() if k in TABLE_COLUMNS}}
        except SalipError as error:
            row = {"case": case, "status": f"failed: {error}"}
        rows.append(row)
        if not args.quiet:
            print(f"[{number}/{len(pairs)}] {case}: {row['status']}", file=sys.stderr)
    done = [r for r in rows if r["status"] == "ok"]

    def mean(column):
        values = [r[column] for r in done if r.get(column) is not None and math.isfinite(r[column])]
        return sum(values) / len(values) if values else None

    rows.append({"case": "mean", "status": f"{len(done)} of {len(rows)} ok",
                 **{c: mean(c) for c in TABLE_COLUMNS[2:]}})

    def fmt(value):
        return "" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    buffer = text_io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=TABLE_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({c: fmt(r.get(c)) for c in TABLE_COLUMNS} for r in rows)
    csv_text = buffer.getvalue()
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c)).replace("|", "/") for c in TABLE_COLUMNS) + " |" for r in rows]
    write_atomically(csv_path, lambda tmp: tmp.write_text(csv_text, encoding="utf-8"))
    write_atomically(md_path, lambda tmp: tmp.write_text("\n".join(lines) + "\n", encoding="utf-8"))
    print(f"{len(done)} of {len(pairs)} cases evaluated; tables: {csv_path}, {md_path}")
    return 0 if done else 3


def run_qa(args) -> int:
    from .io import check_writable
    from .qa import render_qa

    if not args.report.is_file():
        raise InputError(f"Report {args.report} does not exist.")
    output = check_writable(args.output, overwrite=args.overwrite)
    print(render_qa(args.report, output))
    return 0


# -- prompts and models ----------------------------------------------------------------


def run_prompts(args) -> int:
    from .prompts import get_preset, load_presets

    if args.name:
        preset = get_preset(args.name)
        print(f"{preset.display_name} ({preset.name}); top-k {preset.top_k}; modalities "
              f"{', '.join(preset.modalities) or '-'}; aliases {', '.join(preset.aliases) or '-'}")
        for sentence in preset.sentences:
            print(f"  - {sentence}")
        return 0
    presets = load_presets()
    width = max(len(name) for name in presets)
    for name, preset in presets.items():
        print(f"{name:<{width}}  top-k {preset.top_k}  {', '.join(preset.modalities):<12} {preset.display_name}")
    print("\nAny other text is a free-text prompt, e.g. -p 'spleen'; text that looks like a misspelt preset name "
          "is refused with a suggestion (--free-text takes it as typed).")
    return 0


def run_models_list(args) -> int:
    from .models.catalog import PLUGINS_ENV

    if os.environ.get(PLUGINS_ENV):  # plugins register models through the registry, which needs torch
        from .models.registry import list_models
    else:
        from .models.catalog import list_models
    rows = list_models(args.model_dir)
    print(f"{'name':<18}{'role':<6}{'size':<8}{'present':<9}path / source")
    for row in rows:
        where = row.path or row.source
        print(f"{row.name:<18}{row.role:<6}{row.size:<8}{'yes' if row.present else 'no':<9}{where}")
    return 0


def run_models_download(args) -> int:
    from .models import weights
    from .models.registry import weights_for

    spec = weights_for(args.name)
    path = weights.resolve(spec, None, args.model_dir, download=True, progress=True)
    print(f"{args.name}: {path} (SHA256 verified)")
    return 0


def run_models_verify(args) -> int:
    from .errors import ChecksumError
    from .models import weights
    from .models.registry import LISTED_CLIP, SEGMENTERS, weights_for

    names = [args.name] if args.name else list(SEGMENTERS) + list(LISTED_CLIP)
    bad = 0
    for name in names:
        spec = weights_for(name)
        path = weights.find_local(spec, args.model_dir)
        if path is None:
            print(f"{name}: not present")
            continue
        try:
            weights.verify(path, spec)
            print(f"{name}: ok  {path}")
        except ChecksumError as error:
            bad += 1
            print(f"{name}: CORRUPT  {error}")
    if bad:
        raise ChecksumError(f"{bad} weights file(s) failed verification.")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except SalipError as error:
        print(f"salip: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print("salip: cancelled", file=sys.stderr)
        return Cancelled.exit_code
    except BrokenPipeError:  # `salip prompts | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
