"""Real sample images that installed packages ship: for the demo, tests and benchmarks.

nilearn's wheel carries the MNI152 (ICBM 2009a) T1 template, 1 mm, 197 x 233 x 189.
Its brain mask follows nilearn's own definition: the template rescaled to 0..1, above 0.2.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .errors import InputError

MNI152_T1_FILE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
BRAIN_MASK_THRESHOLD = 0.2


def _nilearn_data_dir() -> Path:
    # Found without importing nilearn, which is slow to import and not needed here.
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("The sample volume comes with nilearn: pip install nilearn")
    return Path(list(spec.submodule_search_locations)[0]) / "datasets" / "data"


def mni152_t1_path() -> Path:
    """Path to the MNI152 T1 template (NIfTI) inside the installed nilearn package."""
    path = _nilearn_data_dir() / MNI152_T1_FILE
    if not path.is_file():
        raise InputError(f"nilearn is installed but {path} is missing")
    return path


def mni152_brain_mask(t1: np.ndarray) -> np.ndarray:
    """nilearn's whole-brain mask of the template: intensity / max above 0.2."""
    t1 = np.asarray(t1, dtype=np.float64)
    return t1 / t1.max() > BRAIN_MASK_THRESHOLD


def write_sample(folder: Path) -> tuple:
    """Copy the template and write its brain mask as NIfTI files in a folder, for the demo."""
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    t1 = sitk.ReadImage(str(mni152_t1_path()))
    mask = sitk.GetImageFromArray(mni152_brain_mask(sitk.GetArrayFromImage(t1)).astype(np.uint8))
    mask.CopyInformation(t1)
    t1_path, mask_path = folder / "mni152_t1.nii.gz", folder / "mni152_brain_mask.nii.gz"
    sitk.WriteImage(t1, str(t1_path))
    sitk.WriteImage(mask, str(mask_path))
    return t1_path, mask_path


if __name__ == "__main__":
    import sys

    for written in write_sample(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(written)
