"""Where `salip segment` writes, and in which format: both follow the name the user gave.

`result.seg.nrrd` is a Slicer segmentation; `.nii.gz`, `.nii`, `.nrrd` and `.mha` are a
uint8 labelmap (1 = target, 0 = background) on the input's grid, as `salip batch
--format nifti` writes; a folder (one that exists, or a name ending in "/") gets the
default name inside it. Any other name is refused before a model is loaded, so a run
never ends with a file that its suffix misdescribes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import OutputError

SEGMENTATION_SUFFIX = ".seg.nrrd"
LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")


@dataclass(frozen=True)
class OutputTarget:
    """A checked output: the file to write and what it holds ("segmentation" or "labelmap")."""

    path: Path
    kind: str


def output_kind(path: os.PathLike) -> str:
    """"segmentation" or "labelmap" from the file name; anything else is an OutputError."""
    name = Path(path).name.lower()
    if name.endswith(SEGMENTATION_SUFFIX):
        return "segmentation"
    if name.endswith(LABELMAP_SUFFIXES):
        return "labelmap"
    raise OutputError(
        f"{Path(path).name}: the output's name chooses its format; end it in {SEGMENTATION_SUFFIX} (a Slicer "
        f"segmentation) or {', '.join(LABELMAP_SUFFIXES)} (a uint8 labelmap on the input's grid), or give a "
        "folder (ending in /) to get the default name inside it."
    )


def default_output_name(input_path: os.PathLike, prompt_name: str) -> str:
    """CASE_PROMPT.seg.nrrd, CASE being the input's name without its suffixes."""
    from .io import case_name

    return f"{case_name(Path(input_path))}_{prompt_name}{SEGMENTATION_SUFFIX}"


def resolve_output(requested: str, default_name: str, overwrite: bool = False) -> OutputTarget:
    """The output the user meant, checked to be writable; a missing folder ending in "/" is created."""
    from .io import check_writable

    text = os.fspath(requested)
    path = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or path.is_dir():
        if not path.is_dir():
            _make_folder(path)
        path = path / default_name
    kind = output_kind(path)
    return OutputTarget(check_writable(path, overwrite=overwrite), kind)


def _make_folder(path: Path) -> None:
    if path.exists():
        raise OutputError(f"{path} exists and is not a folder.")
    if not path.parent.is_dir():
        raise OutputError(f"Folder {path.parent} does not exist.")
    try:
        path.mkdir()
    except OSError as error:
        raise OutputError(f"Could not create the folder {path}: {error}") from error


def write_output(target: OutputTarget, mask, image, segment_name: str, color) -> Path:
    """The mask in the target's format, on the image's grid."""
    from .io import write_labelmap, write_segmentation

    if target.kind == "labelmap":
        return write_labelmap(target.path, mask, image)
    return write_segmentation(target.path, mask, image, segment_name, color)
