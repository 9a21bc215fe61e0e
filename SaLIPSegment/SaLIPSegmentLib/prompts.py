"""Prompts: presets (sentence ensembles in Resources/Prompts/*.json) and free text.

A prompt is what CLIP compares candidates against: several descriptive sentences
whose embeddings are averaged. A preset also carries the segment's display name,
its color and how many candidates to keep per slice (two lungs, one brain).
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

from .errors import InputError, UnknownPresetError

# The module's resources sit next to its Lib package, in the source tree and where
# Slicer installs a scripted module: SaLIPSegment/{SaLIPSegmentLib,Resources/Prompts}.
PRESETS_DIR = Path(__file__).resolve().parents[1] / "Resources" / "Prompts"

# Free text becomes an ensemble of these; each puts the words in a different
# caption-like context, which averages out the quirks of any single phrasing.
FREE_TEXT_TEMPLATES = (
    "a medical image of the {}",
    "a grey-scale scan showing the {}",
    "a cropped region of a radiology image containing the {}",
    "a cross-sectional slice of the {}",
    "the {} as it appears on an MRI, CT, X-ray or ultrasound image",
)

MAX_PROMPT_CHARS = 200


@dataclass(frozen=True)
class Prompt:
    """What to segment: the segment's name and color, CLIP's sentences and top-k."""

    name: str
    display_name: str
    sentences: Tuple[str, ...]
    color: Tuple[float, float, float]
    top_k: int = 1
    aliases: Tuple[str, ...] = ()
    modalities: Tuple[str, ...] = ()
    is_preset: bool = False
    side: Optional[str] = None
    """"left" or "right" (the patient's) for one of a pair of organs: CLIP sees a crop, not
    where it lies, so the side is kept by geometry (anatomy.keep_patient_side)."""

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "display_name": self.display_name,
            "sentences": list(self.sentences),
            "color": list(self.color),
            "top_k": self.top_k,
            "preset": self.is_preset,
            "side": self.side,
        }


def _normalise(text: str) -> str:
    return re.sub(r"[\s_\-]+", " ", text.strip().lower())


def _preset_from_file(path: Path) -> Prompt:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        prompt = Prompt(
            name=data["name"],
            display_name=data["display_name"],
            sentences=tuple(data["sentences"]),
            color=tuple(float(c) for c in data["color"]),
            top_k=int(data["top_k"]),
            aliases=tuple(data.get("aliases", ())),
            modalities=tuple(data.get("modalities", ())),
            is_preset=True,
            side=data.get("side"),
        )
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"Prompt preset {path} is not valid: {error}") from error
    if not prompt.sentences or prompt.top_k < 1 or len(prompt.color) != 3:
        raise InputError(f"Prompt preset {path} needs sentences, a top_k >= 1 and an RGB color")
    if prompt.side not in (None, "left", "right"):
        raise InputError(f"Prompt preset {path}: side must be left or right, got {prompt.side!r}")
    return prompt


def load_presets(directory: Optional[Path] = None) -> Dict[str, Prompt]:
    """All presets in a folder of JSON files, by name, sorted."""
    directory = Path(directory) if directory is not None else PRESETS_DIR
    presets = [_preset_from_file(path) for path in sorted(directory.glob("*.json"))]
    return {preset.name: preset for preset in presets}


def find_preset(text: str, presets: Optional[Dict[str, Prompt]] = None) -> Optional[Prompt]:
    """The preset whose name, display name or alias matches the text, or None."""
    presets = load_presets() if presets is None else presets
    wanted = _normalise(text)
    for preset in presets.values():
        names = (preset.name, preset.display_name) + preset.aliases
        if wanted in {_normalise(name) for name in names}:
            return preset
    return None


def get_preset(name: str, presets: Optional[Dict[str, Prompt]] = None) -> Prompt:
    """A preset by name (or alias); an unknown name is an error that lists the known ones."""
    presets = load_presets() if presets is None else presets
    preset = find_preset(name, presets)
    if preset is None:
        known = ", ".join(sorted(presets))
        close = suggest_presets(name, presets)
        hint = f" Did you mean {' or '.join(close)}?" if close else ""
        raise UnknownPresetError(f"Unknown prompt preset {name!r}.{hint} Known presets: {known}.")
    return preset


def suggest_presets(text: str, presets: Optional[Dict[str, Prompt]] = None) -> Tuple[str, ...]:
    """Preset names that the text looks like a misspelling of ("lugns" -> lungs), best first."""
    import difflib

    presets = load_presets() if presets is None else presets
    spellings = {}
    for preset in presets.values():
        for spelling in (preset.name, preset.display_name) + preset.aliases:
            spellings.setdefault(_normalise(spelling), preset.name)
    close = difflib.get_close_matches(_normalise(text), list(spellings), n=6, cutoff=0.75)
    return tuple(dict.fromkeys(spellings[spelling] for spelling in close))[:3]


def _color_for_text(text: str) -> Tuple[float, float, float]:
    # Stable across runs, so the same free-text prompt always gets the same color.
    hue = int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16) / 0xFFFFFFFF
    return tuple(round(c, 3) for c in colorsys.hsv_to_rgb(hue, 0.55, 0.9))


def free_text_prompt(text: str, top_k: int = 1) -> Prompt:
    """A prompt from words the user typed: a few templated sentences around them."""
    words = " ".join(text.split())
    if not words:
        raise InputError("The prompt is empty: give a preset name (see `salip prompts`) or a few words.")
    if len(words) > MAX_PROMPT_CHARS:
        raise InputError(f"The prompt is {len(words)} characters long; keep it under {MAX_PROMPT_CHARS}.")
    return Prompt(
        name=re.sub(r"[^a-z0-9]+", "_", words.lower()).strip("_") or "segment",
        display_name=words,
        sentences=tuple(template.format(words) for template in FREE_TEXT_TEMPLATES),
        color=_color_for_text(words.lower()),
        top_k=top_k,
    )


def resolve_prompt(text: str, presets: Optional[Dict[str, Prompt]] = None) -> Prompt:
    """A preset when the text names one, else a free-text prompt."""
    if not text or not text.strip():
        return free_text_prompt("")  # raises the empty-prompt error
    preset = find_preset(text, presets)
    return preset if preset is not None else free_text_prompt(text)
