"""Judge the per-slice QA flags (quality.py) against per-slice Dice, on runs `salip segment` wrote.

    python Testing/Benchmarks/calibrate_flags.py run ROOT --keep RUNS [--cases step1/skull/brain ...] [--slices A:B]
    python Testing/Benchmarks/calibrate_flags.py judge ROOT --keep RUNS [--rule NAME=VALUE ...] [--sweep NAME=V1,V2]

ROOT is a folder of volume folders (make_eval_volumes.py). A case is a reference's path under it
without `.nii.gz` ("step1/cerebellum", "step3/lesion/lesion"); its image is the t1.nii.gz beside it.

`run` segments each case and scorer with `salip segment` (the product's path and defaults,
LiteMedSAM's real weights, the CPU) and keeps its report and .seg.nrrd in RUNS/CASE~SCORER/.
`judge` needs no model: it rebuilds each kept run's per-slice records from its report, flags them
again with quality.flag_records as the product does (edge and tail flags, the run's slice
thickness, presence's floor) under the default QualityRules or the rules given, and prints how
well the flags find the slices with Dice < 0.5 (evaluation.POOR_SLICE_DICE, painted and missed
slices included) in the written mask: per run, per structure, pooled, and per reason (its flags on
poor and on good slices, and the slices only it flags). Under the defaults it first checks that
it reproduces the flags each report holds. Each judging ends with how many runs meet issue 18's
flag target (FLAG_TARGET). `--sweep` repeats the pooled figures per value of one rule.
The mask signals (fragments, solidity, neighbours) are the report's: the product measures them on the
model's masks, before the clean-up that makes the written mask (holes filled), so `fragment_share`,
which changes how they are measured, cannot be judged here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from SaLIPSegmentLib.evaluation import POOR_SLICE_DICE
from SaLIPSegmentLib.imaging import dice
from SaLIPSegmentLib.io import read_image
from SaLIPSegmentLib.presence import candidate_floor
from SaLIPSegmentLib.quality import CUT_TAIL_FLAG, EDGE_FLAG, REASONS, QualityRules, flag_records
from SaLIPSegmentLib.volume import SliceRecord

# The reference's name -> (prompt, whether it is free text rather than a preset).
PROMPTS = {"brain": ("brain", False), "cerebellum": ("cerebellum", True), "thalamus": ("thalamus", True),
           "lesion": ("brain tumour", True), "ventricles": ("lateral ventricles", True),
           "deep_grey": ("deep grey matter", True)}
DEFAULT_CASES = ("step1/skull/brain", "step1/cerebellum", "step1/thalamus", "step3/lesion/lesion",
                 "step3/skull/brain", "step3/cerebellum", "step3/thalamus", "step1/brain")
SCORERS = ("oracle", "oracle-noisy")
FLAG_TARGET = (0.7, 0.5)  # issue 18: the flags find at least 70% of a run's poor slices at 50% precision
SEPARATOR = "~"


def run_folder(keep: Path, case: str, scorer: str) -> Path:
    return keep / f"{case.replace('/', '_')}{SEPARATOR}{scorer}"


def segment_case(root: Path, case: str, scorer: str, folder: Path, slices: Optional[str] = None) -> None:
    """`salip segment` on the case's image with the product's defaults (over `slices`, A:B, where
    given); its output kept in `folder`."""
    reference = root / f"{case}.nii.gz"
    prompt, free_text = PROMPTS[reference.name.split(".")[0]]
    folder.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "SaLIPSegmentLib.cli", "segment", str(reference.parent / "t1.nii.gz"),
               "-p", prompt, "--sam", "litemedsam", "--clip", scorer, "--reference", str(reference),
               "--report", str(folder / "report.json"), "-o", str(folder / "seg.seg.nrrd"), "-q", "--overwrite"]
    command += (["--free-text"] if free_text else []) + (["--slices", slices] if slices else [])
    subprocess.run(command, check=True)
    (folder / "case.json").write_text(json.dumps({"case": case, "scorer": scorer}))


def run_all(args) -> None:
    for case in args.cases:
        for scorer in args.clip:
            folder = run_folder(args.keep, case, scorer)
            if not (folder / "case.json").is_file():
                print(f"segmenting {case} with {scorer}", flush=True)
                segment_case(args.root, case, scorer, folder, args.slices)


# -- judging kept runs without models ----------------------------------------------------------


@dataclasses.dataclass
class KeptRun:
    """A run as flag_records sees it (records in slice order, their mask signals the report's), and
    which slices of the written mask are poor."""

    name: str
    structure: str
    records: List[SliceRecord]
    poor: np.ndarray
    thickness_mm: float
    reported_flags: List[List[str]]
    outcome: str
    """The written mask's 3D Dice over the range and its slices painted without the target."""


def load_run(root: Path, folder: Path) -> KeptRun:
    kept = json.loads((folder / "case.json").read_text())
    report = json.loads((folder / "report.json").read_text())
    reference = read_image(root / f"{kept['case']}.nii.gz")
    axis, (start, stop) = report["axis"], report["slice_range"]
    mask = np.moveaxis(read_image(folder / "seg.seg.nrrd").array > 0, axis, 0)[start:stop]
    truth = np.moveaxis(reference.array > 0, axis, 0)[start:stop]
    names = {f.name for f in dataclasses.fields(SliceRecord)}
    rows = sorted(report["slices"], key=lambda row: row["index"])
    records = [SliceRecord(**{k: v for k, v in row.items() if k in names}) for row in rows]
    poor = np.array([dice(m, t) < POOR_SLICE_DICE for m, t in zip(mask, truth)])
    painted = sum(1 for m, t in zip(mask, truth) if m.any() and not t.any())
    return KeptRun(folder.name, Path(kept["case"]).name, records, poor, float(reference.spacing_kji[axis]),
                   [list(r.flags) for r in records], f"3D Dice {dice(mask, truth):.3f}  painted {painted}")


def reflag(run: KeptRun, rules: QualityRules) -> np.ndarray:
    """Which slices the product's flag_records flags under `rules` (the records keep the flags). Presence's
    floor is the runner's for a scorer that reads no text, as the oracles do: the candidates' median."""
    flag_records(run.records, None, rules, run.thickness_mm, candidate_floor(run.records))
    return np.array([bool(r.flags) for r in run.records])


def reason_kind(flag: str) -> str:
    """The signal a flag's reason names (REASONS' keys), or the flag itself for the fixed ones."""
    if flag == EDGE_FLAG:
        return "edge"
    if flag == CUT_TAIL_FLAG:
        return "tail"
    for name, template in REASONS.items():
        if flag.startswith(template.split("{")[0].split("(")[0].rstrip()):
            return name
    return flag


def recall_precision(poor: np.ndarray, hit: np.ndarray) -> Tuple[float, float]:
    found = int(np.sum(hit & poor))
    return (found / poor.sum() if poor.any() else float("nan"), found / hit.sum() if hit.any() else float("nan"))


def figures(poor: np.ndarray, hit: np.ndarray) -> str:
    recall, precision = recall_precision(poor, hit)
    return f"poor {int(poor.sum()):>4}  flagged {int(hit.sum()):>4}  recall {recall:.2f}  precision {precision:.2f}"


def target_met(runs: Sequence[KeptRun], hits: Dict[str, np.ndarray]) -> str:
    """How many runs with poor slices meet FLAG_TARGET (a run with none has no recall to meet)."""
    judged = [recall_precision(run.poor, hits[run.name]) for run in runs if run.poor.any()]
    met = sum(1 for recall, precision in judged if recall >= FLAG_TARGET[0] and precision >= FLAG_TARGET[1])
    least = f"recall >= {FLAG_TARGET[0]:.2f}, precision >= {FLAG_TARGET[1]:.2f}"
    return f"target met ({least}): {met} of {len(judged)} runs"


def reason_table(runs: Sequence[KeptRun]) -> None:
    """Per reason: its flags on poor and on good slices, and the slices flagged for it alone."""
    on_poor, on_good, alone_poor, alone_good = Counter(), Counter(), Counter(), Counter()
    for run in runs:
        for record, poor in zip(run.records, run.poor):
            kinds = {reason_kind(flag) for flag in record.flags}
            for kind in kinds:
                (on_poor if poor else on_good)[kind] += 1
            if len(kinds) == 1:
                (alone_poor if poor else alone_good)[next(iter(kinds))] += 1
    print(f"  {'reason':<16} {'poor':>5} {'good':>5}   alone: {'poor':>4} {'good':>4}")
    for kind in sorted(set(on_poor) | set(on_good)):
        alone = f"{alone_poor[kind]:>4} {alone_good[kind]:>4}"
        print(f"  {kind:<16} {on_poor[kind]:>5} {on_good[kind]:>5}          {alone}")


def judge(runs: Sequence[KeptRun], rules: QualityRules, title: str, detail: bool = True) -> None:
    hits = {run.name: reflag(run, rules) for run in runs}
    print(f"\n{title}")
    if detail:
        for run in runs:
            print(f"  {run.name:<36} {figures(run.poor, hits[run.name])}   ({run.outcome})")
        for structure in sorted({run.structure for run in runs}):
            group = [run for run in runs if run.structure == structure]
            print(f"  {'all ' + structure:<36} {pooled(group, hits)}")
    print(f"  {'all runs':<36} {pooled(runs, hits)}")
    print(f"  {target_met(runs, hits)}")
    if detail:
        reason_table(runs)


def pooled(runs: Sequence[KeptRun], hits: Dict[str, np.ndarray]) -> str:
    return figures(np.concatenate([run.poor for run in runs]), np.concatenate([hits[run.name] for run in runs]))


def check_reproduced(runs: Sequence[KeptRun]) -> None:
    """Under the default rules, the flags must be the report's: else the judging is not the product's."""
    for run in runs:
        reflag(run, QualityRules())
        differ = sum(sorted(r.flags) != sorted(f) for r, f in zip(run.records, run.reported_flags))
        if differ:
            print(f"  warning: {run.name}: {differ} slices flagged unlike its report (an older product?)")


def parse_value(name: str, text: str):
    if name == "fragment_share":
        raise SystemExit("fragment_share changes how the mask signals are measured; the judge keeps the report's")
    kind = type(getattr(QualityRules(), name))
    return text.lower() in ("1", "true", "yes", "on") if kind is bool else kind(float(text))


def parse_rules(pairs: Optional[Sequence[str]]) -> Dict[str, object]:
    rules = {}
    for pair in pairs or []:
        name, _, value = pair.partition("=")
        rules[name] = parse_value(name, value)
    return rules


def judge_all(args) -> None:
    folders = sorted(f for f in args.keep.iterdir() if (f / "case.json").is_file())
    runs = [load_run(args.root, folder) for folder in folders]
    if not runs:
        raise SystemExit(f"no kept runs in {args.keep}: `run` first")
    check_reproduced(runs)
    overrides = parse_rules(args.rule)
    judge(runs, QualityRules(**overrides), f"rules: defaults{' with ' + str(overrides) if overrides else ''}")
    if args.sweep:
        name, _, values = args.sweep.partition("=")
        for value in values.split(","):
            rules = QualityRules(**{**overrides, name: parse_value(name, value)})
            judge(runs, rules, f"{name} = {value}", detail=args.detail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("run", "judge"))
    parser.add_argument("root", type=Path, help="a folder of volume folders (make_eval_volumes.py)")
    parser.add_argument("--keep", type=Path, required=True, help="the folder of kept runs")
    parser.add_argument("--cases", nargs="+", default=list(DEFAULT_CASES))
    parser.add_argument("--clip", nargs="+", default=list(SCORERS))
    parser.add_argument("--slices", help="A:B, the slices `run` segments (default: the whole volume)")
    parser.add_argument("--rule", nargs="+", help="QualityRules fields to judge with: NAME=VALUE")
    parser.add_argument("--sweep", help="NAME=V1,V2,...: the figures per value of one rule")
    parser.add_argument("--detail", action="store_true", help="per-run figures for each swept value too")
    args = parser.parse_args()
    args.keep.mkdir(parents=True, exist_ok=True)
    if args.command == "run":
        run_all(args)
    else:
        judge_all(args)


if __name__ == "__main__":
    main()
