"""Model backends behind small interfaces: segmenters (propose, refine) and scorers.

Names are imported on first use (PEP 562), so that `catalog` and `weights` can be read
without importing torch: `salip --help` and `salip models list` stay quick.
"""

import importlib

_HOMES = {
    "Candidate": "base", "NoisyOracleScorer": "base", "OracleScorer": "base", "ProposalSettings": "base",
    "RefinedMask": "base",
    "Scorer": "base", "Segmenter": "base", "resolve_device": "device",
    "DEFAULT_SCORER": "catalog", "DEFAULT_SEGMENTER": "catalog",
    "SEGMENTERS": "registry", "SegmenterSpec": "registry", "create_scorer": "registry",
    "create_segmenter": "registry", "get_segmenter_spec": "registry", "list_models": "registry",
    "register_segmenter": "registry",
}

__all__ = sorted(_HOMES)


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value
