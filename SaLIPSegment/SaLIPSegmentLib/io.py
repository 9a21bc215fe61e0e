"""Files: read volumes (SimpleITK), write .seg.nrrd (slicerio) and reports, atomically.

Arrays are in numpy order (k, j, i), as SimpleITK and Slicer's array helpers give them.
Geometry is kept as SimpleITK's LPS: origin, spacing, direction, and their 4x4 product.
"""

from __future__ import annotations

import json
import os
import tempfile
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence, Tuple

import numpy as np

from .errors import InputError, OutputError

DICOM_SUFFIXES = {".dcm", ".ima", ""}


@dataclass
class Image3D:
    """A scalar volume and its physical geometry (LPS, like SimpleITK and DICOM)."""

    array: np.ndarray
    """Voxels in numpy order (k, j, i)."""
    spacing: Tuple[float, float, float]
    """Along i, j, k (x, y, z), in mm."""
    origin: Tuple[float, float, float]
    direction: np.ndarray
    """3 x 3; column c is the LPS direction of voxel axis c (i, j, k)."""
    source: str = ""

    @property
    def ijk_to_lps(self) -> np.ndarray:
        matrix = np.eye(4)
        matrix[:3, :3] = self.direction @ np.diag(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix

    @property
    def spacing_kji(self) -> Tuple[float, float, float]:
        """Spacing in numpy axis order, to match `array`."""
        return tuple(reversed(self.spacing))


RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0, 1.0])


def image_from_ijk_to_ras(array: np.ndarray, ijk_to_ras, source: str = "") -> Image3D:
    """Voxels with Slicer's IJK-to-RAS matrix as an Image3D (LPS), as if read from a file.

    The geometry matters beyond spacing: a left or right preset keeps the patient's side (anatomy.py).
    """
    lps = RAS_TO_LPS @ np.asarray(ijk_to_ras, dtype=np.float64).reshape(4, 4)
    columns = lps[:3, :3]
    spacing = np.linalg.norm(columns, axis=0)
    if not np.all(np.isfinite(lps)) or np.any(spacing <= 0):
        raise InputError(f"The volume's IJK-to-RAS matrix is degenerate: {lps.tolist()}")
    return Image3D(array=array, spacing=tuple(float(s) for s in spacing), origin=tuple(float(v) for v in lps[:3, 3]),
                   direction=columns / spacing, source=source)


def _read_sitk(path: Path):
    import SimpleITK as sitk

    if path.is_dir():
        reader = sitk.ImageSeriesReader()
        series = reader.GetGDCMSeriesIDs(str(path))
        if not series:
            raise InputError(f"{path} is a folder without a DICOM series in it.")
        # The series with the most files is the volume; the others are usually scouts.
        files = max((reader.GetGDCMSeriesFileNames(str(path), s) for s in series), key=len)
        reader.SetFileNames(files)
        return reader.Execute()
    return sitk.ReadImage(str(path))


def read_image(path: os.PathLike) -> Image3D:
    """NRRD, NIfTI, MHA, a DICOM series folder or a 2D image, as a 3D scalar volume.

    A 2D image becomes a one-slice volume; a 2D RGB(A) image (a screenshot of an
    ultrasound, a PNG X-ray) becomes grey-scale by luminance.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"Input {path} does not exist.")
    try:
        image = _read_sitk(path)
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unreadable"
        raise InputError(f"Could not read {path}: {first_line}") from error
    import SimpleITK as sitk

    array = sitk.GetArrayFromImage(image)
    dimension = image.GetDimension()
    components = image.GetNumberOfComponentsPerPixel()
    if components > 1:
        if dimension == 2 and components in (3, 4):
            array = array[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        else:
            raise InputError(
                f"{path} has {components} components per voxel; SaLIP needs a scalar volume "
                "(extract one component or convert to grey-scale first)."
            )
    if dimension == 2:
        spacing = tuple(image.GetSpacing()) + (1.0,)
        origin = tuple(image.GetOrigin()) + (0.0,)
        direction = np.eye(3)
        direction[:2, :2] = np.asarray(image.GetDirection()).reshape(2, 2)
        array = array[np.newaxis]
    elif dimension == 3:
        spacing, origin = tuple(image.GetSpacing()), tuple(image.GetOrigin())
        direction = np.asarray(image.GetDirection()).reshape(3, 3)
    else:
        raise InputError(f"{path} has {dimension} dimensions; SaLIP segments 2D images and 3D volumes.")
    return Image3D(array=array, spacing=spacing, origin=origin, direction=direction, source=str(path))


def check_writable(path: os.PathLike, overwrite: bool = True) -> Path:
    """Fail early, before any model runs, if the output cannot be written."""
    path = Path(path).expanduser()
    if path.exists() and not overwrite:
        raise OutputError(f"{path} already exists; pass --overwrite to replace it.")
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name such as result.seg.nrrd.")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"Folder {parent} does not exist.")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"Folder {parent} is not writable.")
    return path


def current_umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomically(path: os.PathLike, write: Callable[[Path], None]) -> Path:
    """Call write(temporary) next to path, then rename over it: the old file stays whole on failure."""
    path = Path(path).expanduser()
    # Keep the real suffixes at the end: writers pick the format from them.
    handle, temporary = tempfile.mkstemp(prefix=f".{path.stem}.", suffix="".join(path.suffixes) or ".tmp",
                                         dir=path.parent if str(path.parent) else ".")
    os.close(handle)
    try:
        write(Path(temporary))
        # mkstemp creates the file for its owner only; a result is a file like any other.
        os.chmod(temporary, 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException as error:
        Path(temporary).unlink(missing_ok=True)
        if isinstance(error, OSError):
            raise OutputError(f"Could not write {path}: {error}") from error
        raise
    return path


def ascii_segment_name(name: str) -> str:
    """The segment name as NRRD headers can hold it: ASCII (pynrrd reads and writes only that).

    Accents are folded ("cœur" -> "coeur"); a name with no Latin letters becomes "Segment".
    """
    folded = unicodedata.normalize("NFKD", name.replace("œ", "oe").replace("Œ", "Oe"))
    folded = " ".join(folded.encode("ascii", "ignore").decode("ascii").split())
    return folded if any(c.isalnum() for c in folded) else "Segment"


def write_segmentation(
    path: os.PathLike,
    mask: np.ndarray,
    geometry: Image3D,
    segment_name: str,
    color: Sequence[float],
) -> Path:
    """Write a .seg.nrrd with one segment on the input's grid, for Slicer to load."""
    import slicerio

    mask = np.asarray(mask, dtype=bool)
    if mask.shape != geometry.array.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's {geometry.array.shape}")
    segmentation = slicerio.create_segmentation(mask.shape[::-1], geometry.ijk_to_lps)
    segment = {"id": "Segment_1", "name": ascii_segment_name(segment_name), "color": [float(c) for c in color]}
    slicerio.add_segment(segmentation, mask.transpose(2, 1, 0), segment)  # slicerio wants (i, j, k)
    return write_atomically(path, lambda tmp: slicerio.write_segmentation(str(tmp), segmentation))


def write_labelmap(path: os.PathLike, mask: np.ndarray, geometry: Image3D, label: int = 1) -> Path:
    """Write the mask as a uint8 labelmap (NIfTI, NRRD, MHA by suffix) on the input's grid."""
    import SimpleITK as sitk

    mask = np.asarray(mask, dtype=bool)
    if mask.shape != geometry.array.shape:
        raise ValueError(f"mask shape {mask.shape} differs from the volume's {geometry.array.shape}")
    image = sitk.GetImageFromArray(mask.astype(np.uint8) * np.uint8(label))
    image.SetSpacing([float(v) for v in geometry.spacing])
    image.SetOrigin([float(v) for v in geometry.origin])
    image.SetDirection([float(v) for v in np.asarray(geometry.direction).ravel()])
    return write_atomically(path, lambda tmp: sitk.WriteImage(image, str(tmp), useCompression=True))


def write_json(path: os.PathLike, data: dict) -> Path:
    text = json.dumps(data, indent=2, default=_json_default)
    return write_atomically(path, lambda tmp: tmp.write_text(text + "\n", encoding="utf-8"))


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, tuple)):
        return list(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


IMAGE_FOLDERS = ("images", "imagesTr", "imagesTs")
LABEL_FOLDERS = ("labels", "labelsTr", "labelsTs")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".png", ".jpg", ".tif", ".tiff")


def case_name(path: Path) -> str:
    name = path.name
    for suffix in VOLUME_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    # nnU-Net names image channels NAME_0000; the label is NAME.
    return name[:-5] if len(name) > 5 and name[-5] == "_" and name[-4:].isdigit() else name


def find_pairs(source: os.PathLike) -> list:
    """(case, image, reference) triples from a CSV (columns image,reference) or a folder.

    A folder holds images/ and labels/ (or nnU-Net's imagesTr/labelsTr) matched by file
    name; CSV paths are relative to the CSV's folder. Missing files are kept in the list:
    the case fails on its own and the run goes on.
    """
    import csv

    source = Path(source).expanduser()
    if source.is_file():
        with source.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"image", "reference"} <= set(reader.fieldnames):
                raise InputError(f"{source} needs a header with the columns image,reference.")
            rows = list(reader)
        pairs = []
        for row in rows:
            image = (source.parent / row["image"]).resolve()
            pairs.append((row.get("case") or case_name(image), image, (source.parent / row["reference"]).resolve()))
        return pairs
    if source.is_dir():
        images = next((source / f for f in IMAGE_FOLDERS if (source / f).is_dir()), None)
        labels = next((source / f for f in LABEL_FOLDERS if (source / f).is_dir()), None)
        if images is None or labels is None:
            raise InputError(f"{source} needs an images/ and a labels/ folder (or imagesTr/labelsTr).")
        by_name = {case_name(p): p for p in sorted(labels.iterdir()) if not p.name.startswith(".")}
        return [(case_name(p), p, by_name.get(case_name(p), labels / p.name))
                for p in sorted(images.iterdir()) if not p.name.startswith(".")]
    raise InputError(f"Dataset {source} does not exist.")


def find_volumes(source: os.PathLike) -> list:
    """(case, path) pairs from a folder or a CSV list, sorted by case, for `salip batch`.

    A folder contributes its volume files and, as one case each, its sub-folders
    (DICOM series); a CSV has an `image` column (relative to the CSV) and an optional
    `case` column. Case names are file names without suffixes (nnU-Net's _0000 dropped)
    and must be unique: they name the outputs.
    """
    import csv

    source = Path(source).expanduser()
    if source.is_file():
        with source.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise InputError(f"{source} needs a header with an image column (and optionally case).")
            rows = list(reader)
        cases = [(row.get("case") or case_name(source.parent / row["image"]),
                  (source.parent / row["image"]).resolve()) for row in rows]
    elif source.is_dir():
        cases = [(case_name(p), p.resolve()) for p in sorted(source.iterdir())
                 if not p.name.startswith(".") and (p.is_dir() or p.name.lower().endswith(VOLUME_SUFFIXES))]
    else:
        raise InputError(f"Inputs {source} do not exist.")
    names = [name for name, _ in cases]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise InputError(f"Several inputs would write the same outputs: {', '.join(repeated)}. "
                         "Give them distinct names (a CSV with a case column does).")
    return sorted(cases)
