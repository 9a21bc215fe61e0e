"""Model backends behind small interfaces: segmenters (propose, refine) and scorers."""

from .base import Candidate, OracleScorer, ProposalSettings, RefinedMask, Scorer, Segmenter
from .device import resolve_device
from .registry import (
    DEFAULT_SCORER,
    DEFAULT_SEGMENTER,
    SEGMENTERS,
    SegmenterSpec,
    create_scorer,
    create_segmenter,
    get_segmenter_spec,
    list_models,
    register_segmenter,
)

__all__ = [
    "Candidate", "OracleScorer", "ProposalSettings", "RefinedMask", "Scorer", "Segmenter",
    "resolve_device", "DEFAULT_SCORER", "DEFAULT_SEGMENTER", "SEGMENTERS", "SegmenterSpec",
    "create_scorer", "create_segmenter", "get_segmenter_spec", "list_models", "register_segmenter",
]
