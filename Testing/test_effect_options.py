"""The Qt-free half of the Slicer effect: options to engine arguments, estimates, flags, downloads, model cache."""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from SaLIPSegmentLib import effect_options as eo
from SaLIPSegmentLib.errors import Cancelled
from SaLIPSegmentLib.jobs import BackgroundJob
from SaLIPSegmentLib.models import get_segmenter_spec
from SaLIPSegmentLib.models.base import OracleScorer, ProposalSettings, Scorer
from SaLIPSegmentLib.models.registry import weights_for
from SaLIPSegmentLib.volume import NO_TISSUE, SliceRecord, flag_slices, segment_volume

from conftest import DIGEST, PAYLOAD, disk_image


class LargestCandidateScorer(Scorer):
    """Weight-free: the biggest candidate wins (what the Slicer self-test uses)."""

    name = "largest"

    def score(self, image_rgb, candidates, sentences, reference=None):
        return np.asarray([c.area for c in candidates], dtype=np.float64)


# -- options ----------------------------------------------------------------------------------


def test_axis_choice():
    assert eo.EffectOptions(axis="auto").numpy_axis() is None
    assert eo.EffectOptions(axis="2").numpy_axis() == 2
    with pytest.raises(ValueError, match="Axis"):
        eo.EffectOptions(axis="3").numpy_axis()


def test_spin_box_minimum_means_default():
    assert eo.optional_number(0, 0) is None
    assert eo.optional_number(-1, -1) is None
    assert eo.optional_number(0, -1) == 0  # crop layers 0 is a real choice
    assert eo.optional_number(-0.01, -0.01) is None
    assert eo.optional_number(0.5, -0.01) == 0.5


def test_top_k_zero_keeps_the_prompts_own():
    assert eo.effective_top_k(eo.EffectOptions(top_k=0), prompt_top_k=2) == 2
    assert eo.effective_top_k(eo.EffectOptions(top_k=3), prompt_top_k=2) == 3


def test_proposal_overrides_go_on_top_of_the_model_defaults():
    spec = get_segmenter_spec("litemedsam")
    overrides = eo.ProposalOverrides(pred_iou_thresh=0.7, crop_n_layers=0)
    values = eo.proposal_values(spec.proposal_defaults, overrides)
    settings = ProposalSettings.from_dict(values)
    assert settings.pred_iou_thresh == 0.7
    assert settings.crop_n_layers == 0
    assert settings.stability_score_thresh == spec.proposal_defaults["stability_score_thresh"]
    assert settings.box_scales == spec.proposal_defaults["box_scales"]
    assert eo.proposal_values({}, eo.ProposalOverrides()) == {}


def test_segment_volume_kwargs_fit_segment_volume():
    proposal = ProposalSettings()
    kwargs = eo.segment_volume_kwargs(eo.EffectOptions(top_k=0), 2, axis=1, slice_range=(3, 6),
                                      window=(0.0, 80.0), proposal=proposal)
    settings = kwargs["settings"]
    assert (settings.top_k, settings.axis, settings.slice_range, settings.window, settings.proposal) == (
        2, 1, (3, 6), (0.0, 80.0), proposal)
    inspect.signature(segment_volume).bind(np.zeros((2, 2, 2)), None, None, [], **kwargs)
    explicit = eo.volume_settings(eo.EffectOptions(window=(1.0, 2.0)), 1, 0, None, (0.0, 80.0), None)
    assert explicit.window == (1.0, 2.0) and explicit.slice_range is None


# -- CPU estimate and progress text --------------------------------------------------------------


def test_cpu_estimate_and_confirmation():
    assert eo.slice_count((10, 20, 30), 1, None) == 20
    assert eo.slice_count((10, 20, 30), 0, (4, 7)) == 3
    full, encode = eo.CPU_SECONDS_PER_SLICE["vit_b"]
    assert eo.estimate_cpu_seconds("vit_b", 10, propagate=False) == 10 * full
    assert eo.estimate_cpu_seconds("vit_b", 20) == 3 * full + 17 * encode  # key slices 0, 10 and 19
    assert eo.estimate_cpu_seconds("someone-elses-sam", 2, propagate=False) == 2 * eo.CPU_SECONDS_PER_SLICE_UNKNOWN[0]
    assert not eo.needs_cpu_confirmation("cpu", "litemedsam", 3)
    assert eo.needs_cpu_confirmation("cpu", "vit_h", 100)
    assert not eo.needs_cpu_confirmation("cuda", "vit_h", 100)


def test_durations_and_progress_read_well():
    assert eo.format_duration(42) == "42 s"
    assert eo.format_duration(600) == "10 min"
    assert eo.format_duration(4 * 3600) == "4.0 h"
    assert eo.progress_text(0, 0) == "Loading models..."
    assert eo.progress_text(0, 5) == "Slice 1 of 5"
    assert eo.progress_text(4, 5) == "Slice 5 of 5"
    assert eo.progress_text(5, 5) == "5 of 5 slices done"


# -- flagged slices and jumping to them -----------------------------------------------------------


def test_flagged_slices_list_what_the_engine_flagged():
    records = [
        SliceRecord(index=0, reason=NO_TISSUE, method="skipped"),
        SliceRecord(index=1, reason="no candidate", area=0),
        SliceRecord(index=2, reason=None, area=120),
        SliceRecord(index=3, reason=None, area=0),
    ]
    flag_slices(records)
    flagged = eo.flagged_slices(records)
    assert [(f.index, f.reason) for f in flagged] == [(1, "no candidate"), (3, "empty mask")]
    assert flagged[0].label == "Slice 1: no candidate"


def test_slice_center_ras_follows_the_ijk_to_ras_matrix():
    assert eo.slice_center_ras(np.eye(4), (5, 7, 9), axis=0, index=2) == (4.0, 3.0, 2.0)
    ijk_to_ras = np.array([[-2.0, 0, 0, 10], [0, -1.0, 0, 20], [0, 0, 3.0, -5], [0, 0, 0, 1]])
    r, a, s = eo.slice_center_ras(ijk_to_ras, (5, 7, 9), axis=2, index=0)  # i = 0, j = 3, k = 2
    assert (r, a, s) == (10.0, 17.0, 1.0)


# -- errors -------------------------------------------------------------------------------------


def test_out_of_memory_is_recognised_without_importing_torch_in_the_check():
    assert eo.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"))
    assert eo.is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    assert not eo.is_out_of_memory(ValueError("bad prompt"))


# -- dependencies -------------------------------------------------------------------------------


def test_missing_requirements_map_import_names_to_pip_names():
    present = {"numpy", "scipy", "PIL", "tqdm"}

    def find_spec(name):
        if name == "open_clip":
            raise ImportError("broken install")
        return object() if name in present else None

    missing = eo.missing_pip_requirements(find_spec)
    assert "segment-anything>=1.0" in missing
    assert "open-clip-torch>=2.24" in missing
    assert not any(req.startswith(("numpy", "scipy", "pillow", "tqdm")) for req in missing)
    assert eo.missing_modules(["torch"], lambda name: None) == ["torch"]


def test_the_cpu_runtime_is_offered_but_never_required():
    from SaLIPSegmentLib.models.cpu_runtime import RUNTIME_MODULES

    def without_runtime(name):
        return None if name in RUNTIME_MODULES else object()

    assert set(eo.CPU_RUNTIME_REQUIREMENTS) == set(RUNTIME_MODULES)  # what cpu_runtime needs to import
    assert eo.missing_pip_requirements(without_runtime) == []
    assert sorted(eo.missing_pip_requirements(without_runtime, eo.CPU_RUNTIME_REQUIREMENTS)) == ["onnx", "onnxruntime"]


def test_a_failed_optional_install_is_reported_and_a_failed_required_one_raises():
    installed = []

    def pip_install(packages):
        if "onnxruntime" in packages or "broken" in packages:
            raise RuntimeError("no matching distribution for onnxruntime")
        installed.append(packages)

    failure = eo.install_pip_packages(pip_install, ["tqdm>=4.60", "scipy>=1.9"], ["onnxruntime", "onnx"])
    assert installed == ["tqdm>=4.60 scipy>=1.9"] and "no matching distribution" in failure
    assert eo.install_pip_packages(pip_install, ["tqdm>=4.60"], ["onnx"]) is None
    assert installed[1:] == ["tqdm>=4.60", "onnx"]
    with pytest.raises(RuntimeError):
        eo.install_pip_packages(pip_install, ["broken"], ["onnx"])
    assert len(installed) == 3  # nothing optional after a required package failed


def test_this_environment_has_what_the_effect_needs():
    assert eo.missing_modules(eo.TORCH_MODULES) == []
    assert eo.missing_pip_requirements() == []


def test_effect_options_imports_without_torch():
    source = inspect.getsource(eo)
    top_level = [line for line in source.splitlines() if line.startswith(("import ", "from "))]
    assert not any("torch" in line or ".models" in line or ".volume" in line for line in top_level), top_level


# -- weights ------------------------------------------------------------------------------------


def test_weights_to_download_lists_only_missing_downloadable_files(tmp_path):
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    names = ["vit_b", "ViT-B-32:openai", "litemedsam", "oracle", "not-a-model", ""]
    missing = eo.weights_to_download(names, model_dir)
    assert [name for name, _ in missing] == ["vit_b", "ViT-B-32:openai"]
    (model_dir / weights_for("vit_b").filename).write_bytes(b"placeholder")  # present: checked at load time
    assert [name for name, _ in eo.weights_to_download(names, model_dir)] == ["ViT-B-32:openai"]


def test_download_fetches_from_a_local_server_and_a_cancel_leaves_no_partial_file(server):
    from SaLIPSegmentLib.models.weights import WeightsFile, cache_dir

    items = [(name, WeightsFile(f"{name}.pth", url=f"{server}/{path}", sha256=DIGEST))
             for name, path in (("first", "good.pth"), ("second", "good.pth"))]
    reports = []
    result = eo.download_weights(items, progress=lambda d, t: reports.append((d, t)))
    assert reports == [(0, 2), (1, 2), (2, 2)]
    assert [line.split(":")[0] for line in result] == ["first", "second"]
    assert (cache_dir() / "first.pth").read_bytes() == PAYLOAD

    slow = [("slow", WeightsFile("slow.pth", url=f"{server}/slow.pth", sha256=DIGEST))]
    job = BackgroundJob(lambda progress, cancel: eo.download_weights(slow, None, progress, cancel)).start()
    job.cancel()  # checked before each file and after every chunk read
    assert job.wait(30) and job.cancelled and isinstance(job.error, Cancelled)
    assert sorted(p.name for p in cache_dir().iterdir()) == ["first.pth", "second.pth"]  # no partial file


# -- models, end to end on a tiny SAM -------------------------------------------------------------


def test_model_cache_builds_once_and_feeds_segment_volume(tiny_sam, tiny_sam_checkpoint):
    cache = eo.ModelCache()
    cache.scorer_factories["largest"] = LargestCandidateScorer
    model_dir = tiny_sam_checkpoint.parent
    segmenter, scorer, device = cache.get(tiny_sam, "largest", "cpu", model_dir)
    assert isinstance(scorer, LargestCandidateScorer) and device.type == "cpu"
    assert cache.get(tiny_sam, "largest", "cpu", model_dir)[0] is segmenter  # reused
    assert isinstance(cache.get(tiny_sam, "oracle", "cpu", model_dir)[1], OracleScorer)  # rebuilt on change

    volume = np.stack([disk_image(), disk_image(), np.full((64, 64), 20, np.uint8)])
    options = eo.EffectOptions(top_k=1, proposal=eo.ProposalOverrides(points_per_side=4))
    proposal = ProposalSettings.from_dict(
        eo.proposal_values(get_segmenter_spec(tiny_sam).proposal_defaults, options.proposal))
    kwargs = eo.segment_volume_kwargs(options, 1, axis=0, slice_range=(0, 3), window=None, proposal=proposal)
    segmenter, scorer, _ = cache.get(tiny_sam, "largest", "cpu", model_dir)
    result = segment_volume(volume, segmenter, scorer, ["a disk"], **kwargs)
    assert result.mask.shape == volume.shape
    assert result.slices[2].reason == NO_TISSUE
    assert all(f.index != 2 for f in eo.flagged_slices(result.slices))
    cache.clear()
    assert cache.get(tiny_sam, "largest", "cpu", model_dir)[0] is not segmenter
