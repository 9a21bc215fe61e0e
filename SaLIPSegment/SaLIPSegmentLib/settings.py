"""What decides a volume's mask, besides the prompt and the models: one place, no torch.

`VolumeSettings` is one run over one volume (segment_volume, evaluate_volume and
adapt_settings take it); the command line and the Slicer effect each build it in one
place. Importing this module needs neither torch nor Slicer, so the effect and the
argument parser read the same defaults as the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Optional, Tuple

from .errors import InputError

MODES = ("propagate", "every-slice")

# The models work at 1024 px at most (SAM's input; LiteMedSAM's is 256), so a larger slice
# gains nothing but memory: each candidate mask would be kept at full size.
MAX_SLICE_SIDE = 1024


@dataclass
class ProposalSettings:
    """Knobs of the "segment everything" step, with documented defaults.

    The point-grid knobs are segment_anything's own (SamAutomaticMaskGenerator),
    with its defaults except `crop_n_layers`: the paper ran 1 (five extra image
    encodings per slice), we default to 0 and keep 1 available. The box-grid
    knobs serve box-only models (LiteMedSAM), which ignore point prompts.
    """

    points_per_side: int = 32
    """Point grid is points_per_side x points_per_side over the image (SAM)."""
    points_per_batch: int = 64
    """Prompts decoded together; larger is faster until memory runs out."""
    pred_iou_thresh: float = 0.88
    """Drop masks whose self-predicted IoU is below this."""
    stability_score_thresh: float = 0.95
    """Drop masks that change much when the logit threshold moves by the offset."""
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    """Box IoU above which the lower-scored of two candidates is a duplicate."""
    crop_n_layers: int = 0
    """Also run on 2**i x 2**i overlapping crops for i in 1..n (each costs an encoding)."""
    crop_overlap_ratio: float = 512 / 1500
    crop_n_points_downscale_factor: int = 2
    min_region_area: int = 0
    """Remove islands and fill holes smaller than this many pixels (0: off)."""
    max_area_fraction: float = 0.8
    """Drop candidates covering more than this fraction of the image (background, body outline)."""
    box_scales: Tuple[float, ...] = (0.125, 0.25, 0.5)
    """Box-grid side lengths as fractions of the longest image side (box-only models)."""
    box_stride_fraction: float = 0.5
    """Box-grid stride as a fraction of the box side (0.5: half-overlapping boxes)."""
    region: Optional[Tuple[int, int, int, int]] = None
    """Propose only from prompts in this box (x0, y0, x1, y1, pixels of the image proposed on): grid
    points inside it, grid boxes overlapping it by half the smaller of the two. None: the whole image.
    The runner sets it per slice where it knows where the target is (a correction's cascades,
    PropagationSettings.correction_region_margin); decoding the prompts is most of a cascade's time."""

    @classmethod
    def from_dict(cls, values: dict) -> ProposalSettings:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"Unknown proposal settings: {', '.join(sorted(unknown))}")
        return cls(**values)


@dataclass
class PropagationSettings:
    """Key-slice propagation: the full cascade on a few slices, a box prompt on the rest.

    Each slice next to a segmented one is prompted with its neighbour's boxes, grown by a
    margin, on its own embedding (one encoding, one decoder pass). The result is kept when
    SAM's predicted IoU and, for CLIP, the retrieval score hold up against the chain's
    anchor (the last slice the full cascade segmented); otherwise the slice gets the full
    cascade and anchors what follows. Propagation stops where the full cascade finds
    nothing either: the organ has ended.

    Between two key slices a chain runs from each, over the same embeddings, and each slice
    keeps the result the scorer ranks higher, as the full cascade's retrieval would: a key
    slice whose best candidate was a poor part no longer decides every slice up to the next
    one. A slice gets the full cascade where both chains are refused, and where one chain is refused
    but its refused result ranks above the other chain's (that chain carries something else, say from
    a key slice without the target): the slice then splits the stretch in two.
    """

    key_interval: int = 12
    """Key slices (full cascade) are the first and last slice with tissue and evenly between,
    at most this many slices apart (volume.key_positions); an organ spanning at least this many
    slices always has a key slice of its own. 16 (issue 17) left a 1 mm thalamus with one key slice,
    and a CLIP-like score's noise on it decided the whole structure. 12 binds on slices up to 2 mm
    thick; thicker ones follow key_distance_mm. Figures: Testing/Benchmarks/RESULTS.md, issue 18,
    2026-12-03 (third)."""
    key_distance_mm: Optional[float] = 24.0
    """Where the slice thickness is known, key slices are also at most this many millimetres apart
    (interval_for): 16 slices of 6.5 mm are 104 mm, more than a tumour, and on 3 mm slices a
    cerebellum had one key slice. Slices up to 2 mm thick keep key_interval. None or 0: slices only.
    Why 24: Testing/Benchmarks/RESULTS.md, issue 18 (thick slices)."""
    box_margin: float = 0.1
    """Grow the neighbour's box by this fraction of its width and height on each side. 0.05 kept a
    chain on a head with skull on the brain (from a looser box LiteMedSAM's masks spread past it, and
    each box grows on the last) but lost on the cerebellum, a 6 mm lesion and deep grey; so did a
    per-slice choice of the two by predicted IoU in chains from a user's fix (RESULTS.md, issue 19,
    2026-12-02 and 2026-12-03)."""
    hint_box_margin: float = 0.1
    """A user's box (a hint) prompts the model grown by this fraction on each side, and its mask is
    then kept inside the user's box: LiteMedSAM segments worse from a tight box than from a looser
    one, and nothing of the target lies outside the box the user drew (figures: RESULTS.md,
    issue 19, boxes). 0: the box as drawn."""
    hint_zoom_factor: float = 2.5
    """A user's box is refined zoomed in on (ShapeSettings.zoom_factor) with this factor: where a
    window this many times its grown side enlarges it at least twice, LiteMedSAM outlines a small
    target much better (figures: RESULTS.md, issue 19, sixth measurement). 0: never."""
    max_iou_drop: float = 0.1
    """Keep a propagated mask whose predicted IoU is at most this much below its anchor's."""
    max_score_drop: float = 2.0
    """Keep a propagated mask whose CLIP score is at most this many points below its anchor's."""
    min_area_ratio: float = 0.2
    """A propagated mask smaller than this fraction of its source's goes to the full cascade."""
    neighbour_weight: float = 4.0
    """Where a chain is refused and the slice gets the full cascade, retrieval ranks each candidate by its
    score plus this many points x its Dice with the neighbour's mask (cascade.retrieve): the target
    continues from slice to slice, and a CLIP-like score's noise let a fragment elsewhere outrank it.
    In CLIP's points (100 x cosine); the exact oracle's 0-100 scale barely feels it. Key slices have no
    neighbour and rank by score alone. 0: score alone everywhere. Why 4: RESULTS.md, issue 18,
    2026-12-03 (neighbour-consistent retrieval)."""
    correction_region_margin: Optional[float] = 0.25
    """In a correction (corrections.py), a slice where a chain descending from the user's box or clicks
    is refused, or where it meets a contested chain, gets the full cascade with proposals only around
    that chain's boxes, grown by this fraction of their width and height on each side
    (ProposalSettings.region): the fix says where the target is, and the proposals were most of the
    slowest corrections' time (figures: RESULTS.md, issue 19). None: the whole slice, as in the
    automatic pass."""
    correction_envelope_margin: Optional[float] = 0.1
    """In a correction, the chains between a fix and the boundary across from it prompt inside the union
    of the two ends' mask boxes, grown by this fraction of its width and height on each side. Each slice's
    box is its neighbour's mask's box grown by box_margin, so where the model's mask reaches past the
    target the boxes walk further off slice by slice (a head with skull: mask boxes 1.55 x 1.83 the
    reference's ten slices from a fix); the fix and the boundary say how far the target reaches in
    between. None: no bound, as in the automatic pass, where both ends came from retrieval (figures:
    RESULTS.md, issue 19, 2026-12-03, second)."""

    def interval_for(self, thickness_mm: Optional[float]) -> int:
        """The key interval in slices for slices `thickness_mm` apart (None: unknown, key_interval)."""
        if not self.key_distance_mm or not thickness_mm or thickness_mm <= 0:
            return self.key_interval
        return max(1, min(self.key_interval, int(self.key_distance_mm / thickness_mm + 1e-6)))


@dataclass
class PresenceSettings:
    """Whether the target is on a slice, decided after the run from what real CLIP gives too (presence.py).

    Each painted slice's final mask is scored once more with the run's scorer (one call per
    slice, so propagated slices get a score too; with CLIP, as the margin of the prompt's
    sentences over negative ones: background and the other presets). The scores, in slice order
    and smoothed by a running median, are split into a low and a high group (Otsu); the target's
    run is the contiguous run of slices with the most score above that level. The slices outside
    it lose their mask only when the scores show two groups: the run's median at least
    min_separation pooled spreads above the others', and (for a plain score) the others at the
    volume's floor, the median score of the full cascades' candidates (what is not the target),
    rather than part of the way up to the run. A volume whose every slice holds the target (the
    brain), poorly segmented slices included, keeps every slice; so does every slice inside the
    run, whatever its score. The rule is relative: CLIP never scores 0, and its scale differs per
    model and prompt. Slices judged absent get no mask, and the report says why. On by default:
    on every volume measured it removed the slices painted without target or changed nothing.
    """

    enabled: bool = True
    smooth_slices: int = 3
    """The run is found on the median of this many slices around each (1: each slice's own score)."""
    min_separation: float = 1.5
    """The run's median score must sit this many pooled robust spreads above the others' median."""
    max_height_outside: float = 0.2
    """With a plain score, the slices outside the run must sit at most this fraction of the way from the
    floor (the volume's median candidate score: what is not the target) up to the run's median. 0.2:
    with the noisy oracle, 0.15 let a second head's thalamus and the cerebellum keep 30-42 slices
    painted without target; 0.25 cut 28 present slices of deep grey, 0.3 38 of the brain (RESULTS.md)."""
    min_scored_slices: int = 6
    """With fewer painted slices there is no second group to judge by: every slice is kept."""
    negatives: bool = True
    """With a scorer that reads text (CLIP), score against negative sentences too and use the margin."""


@dataclass(frozen=True)
class ShapeSettings:
    """Steps that make a slice's mask the target's shape rather than a fragment (shape.py).

    Each is named after what it does; measured figures in Testing/Benchmarks/RESULTS.md (issue 18):
    unite_parts is on by default, the others hurt, did not help everywhere, or cost too much time.
    """

    unite_parts: bool = True
    """Add other candidates to the retrieved one while the same scorer ranks the union higher,
    then refine with the union's box (full cascade only; extra scorer calls). On by default: on the
    template's brain, deep grey and ventricles it raised or kept 3D Dice with both oracles in both
    modes, for up to 7% more time with the oracles (up to 58% more crops scored: est. +18% with CLIP)."""
    union_pool: int = 8
    """Candidates considered for the union: the best-scored ones after the retrieved one."""
    union_max_added: int = 3
    """At most this many candidates are added."""
    union_min_gain: float = 0.0
    """A union is kept only when it scores more than this above the current one."""
    union_max_gap: Optional[float] = 0.5
    """A candidate joins only when its gap to the union is at most this fraction of the union's
    equivalent diameter (parts of one target touch or nearly touch); None: no limit. Without it a
    CLIP-like score's noise united a lesion with parts 54 px away on a 233 px slice (its Dice 0.86 ->
    0.16). Measured alternative, not kept: refining the part's own box too and keeping the better-scored
    mask (it lost 6 points of deep grey with the exact oracle: a key slice's best mask is not the best
    one to propagate)."""
    refine_rounds: int = 0
    """Prompt again with the box of the refined mask, at most this many more times."""
    box_tolerance: int = 2
    """...stopping when the box moves by at most this many pixels on every side."""
    fill_holes: bool = False
    """Fill holes inside a closed outline in each slice's parts."""
    context_padding: float = 0.0
    """Refine on the slice padded with this fraction of its longest side of background on each side
    (box-only models judge a box against its surroundings); one extra encoding per slice."""
    zoom_factor: float = 0.0
    """Refine small boxes on a square window this many times as wide as their union (at least
    zoom_min_side pixels), which the model enlarges to its input; only where that enlarges them at
    least twice, for one extra encoding per such slice; 0: never. Before context_padding. Off for
    retrieved and propagated boxes: a neighbour's box is loose around a shrinking target, and zoomed
    in LiteMedSAM filled more of it; a user's box is tight, and is zoomed
    (PropagationSettings.hint_zoom_factor; figures: RESULTS.md, issue 19, sixth measurement)."""
    zoom_min_side: int = 64
    """The smallest window zoom_factor makes, in the slice's pixels."""


@dataclass(frozen=True)
class CleanupSettings:
    """3D clean-up after the run (cleanup.py): holes filled by default, the rest off."""

    keep_largest: bool = False
    """Keep the top-k largest 3D components (two lungs, two kidneys)."""
    fill_holes: bool = True
    """Fill holes enclosed in each slice. On by default: the models leave patches inside an organ
    out of its mask (Testing/Benchmarks/RESULTS.md); off for a target that is a ring in its slices
    (a wall round a lumen)."""
    fill_flagged: bool = False
    """Replace flagged slices by what their two neighbours agree on."""


@dataclass(frozen=True)
class VolumeSettings:
    """One run over one volume: which slices, how they are windowed, and how the cascade runs.

    `axis` and `slice_range` are this volume's own (numbers, not "auto"): a request for
    many volumes (pipeline.SegmentSettings) says them as text and resolves them per volume.
    """

    top_k: int = 1
    """Candidates retrieved and refined per slice (two lungs, two kidneys)."""
    axis: int = 0
    """The numpy axis the slices are taken across."""
    slice_range: Optional[Tuple[int, int]] = None
    """(start, stop), stop excluded, negative values from the end; None: every slice."""
    window: Optional[Tuple[float, float]] = None
    """Intensity window (low, high); None: a robust window over the whole volume."""
    mode: str = "propagate"
    """propagate: the full cascade on key slices, neighbours' boxes elsewhere; every-slice: the paper's."""
    propagation: PropagationSettings = field(default_factory=PropagationSettings)
    proposal: ProposalSettings = field(default_factory=ProposalSettings)
    presence: PresenceSettings = field(default_factory=PresenceSettings)
    """After the run: slices where the target is judged absent lose their mask (volume.decide_presence)."""
    shape: ShapeSettings = field(default_factory=ShapeSettings)
    """The steps between retrieval and a slice's mask (shape.py), for full cascades and propagated slices."""
    cleanup: CleanupSettings = field(default_factory=CleanupSettings)
    """Applied after the run by pipeline.segment_image; segment_volume's mask is the raw one."""
    adapt: bool = False
    """Pick the proposal thresholds per volume first (adaptation.adapt_settings)."""
    skip_empty_slices: bool = True
    """Slices whose windowed image is uniform (air, padding) never reach the models."""
    reencode_for_refine: bool = False
    """The paper's second encoding per slice before refine; kept for the benchmark only."""
    max_slice_side: int = MAX_SLICE_SIDE
    """Longer slices are shrunk for the models and their masks enlarged back (nearest)."""
    slice_thickness_mm: Optional[float] = None
    """The distance between slices along `axis`, where it is known (for_thickness sets it)."""

    def for_thickness(self, thickness_mm: Optional[float]) -> VolumeSettings:
        """These settings for a volume whose slices along `axis` are `thickness_mm` apart: the key
        interval in slices that keeps key slices within the propagation's distance in millimetres,
        and the thickness that sets the edge flags' depth (quality.QualityRules.edge_slices)."""
        interval = self.propagation.interval_for(thickness_mm)
        return replace(self, propagation=replace(self.propagation, key_interval=interval),
                       slice_thickness_mm=thickness_mm)


def parse_slice_range(text: Optional[str], count: int) -> Tuple[int, int]:
    """"A:B" (B excluded; either may be empty or negative) to (start, stop), with reasons when it is wrong."""
    if text is None or text.strip() in ("", ":"):
        return 0, count
    start_text, sep, stop_text = text.partition(":")
    try:
        start = int(start_text) if start_text.strip() else 0
        stop = int(stop_text) if sep and stop_text.strip() else (count if sep else start + 1)
    except ValueError:
        raise InputError(f"Slice range {text!r} must look like A:B with whole numbers (B excluded).") from None
    return check_slice_range((start, stop), count)


def check_slice_range(slice_range: Tuple[int, int], count: int) -> Tuple[int, int]:
    """(start, stop) with negative ends counted from the end; reversed, empty or outside ranges are refused."""
    start, stop = slice_range
    first = start + count if start < 0 else start
    last = stop + count if stop < 0 else stop
    if last < first:
        raise InputError(f"Slice range {start}:{stop} is reversed: A is the first slice, B the one after the last "
                         f"({stop}:{start}).")
    if first == last:
        raise InputError(f"Slice range {start}:{stop} is empty: B is excluded, so {start}:{start + 1} is one slice.")
    if not (0 <= first < last <= count):
        raise InputError(f"Slice range {start}:{stop} is outside this volume's {count} slices along the axis "
                         f"(valid: 0:{count}).")
    return first, last
