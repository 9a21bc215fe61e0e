"""The Qt-free half of the Slicer effect: options to engine arguments, estimates, flags, downloads, model cache."""

from __future__ import annotations

import inspect
import json

import numpy as np
import pytest
import torch

from SaLIPSegmentLib import effect_options as eo
from SaLIPSegmentLib.models import get_segmenter_spec
from SaLIPSegmentLib.models.base import ProposalSettings, Scorer
from SaLIPSegmentLib.models.registry import weights_for
from SaLIPSegmentLib.volume import NO_TISSUE, SliceRecord, flag_slices

from conftest import disk_image


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


# -- CPU estimate and progress text --------------------------------------------------------------


def test_cpu_estimate_and_confirmation():
    assert eo.slice_count((10, 20, 30), 1, None) == 20
    assert eo.slice_count((10, 20, 30), 0, (4, 7)) == 3
    full, encode = eo.CPU_SECONDS_PER_SLICE["vit_b"]
    assert eo.estimate_cpu_seconds("vit_b", 10, propagate=False) == 10 * full
    assert eo.estimate_cpu_seconds("vit_b", 20) == 3 * full + 17 * encode  # key slices 0, 10 and 19
    assert eo.estimate_cpu_seconds("vit_b", 20, interval=4) == 6 * full + 14 * encode  # thick slices: 0, 4, ..., 19
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
    assert eo.progress_text(0, 0, correcting=True) == "Applying the fixes..."
    assert eo.progress_text(2, 7, correcting=True) == "Redoing slice 3 of 7"
    assert eo.progress_text(7, 7, correcting=True) == "7 slices redone"


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
    assert [(f.index, f.reason, f.confidence) for f in flagged] == [(1, "no candidate", 0.0), (3, "empty mask", 0.0)]
    assert flagged[0].label == "Slice 1 (confidence 0.00): no candidate"


def test_the_status_line_says_the_volumes_verdict():
    summary = {"slices_with_mask": 40, "slices_in_range": 63, "verdict": "12 of 52 slices need a look"}
    assert eo.result_text(summary, 61.2) == (
        "40 of 63 slices have a mask (61 s); 12 of 52 slices need a look. Apply to keep it.")
    old = {"slices_with_mask": 3, "slices_in_range": 5}  # a worker from before the verdict
    assert eo.result_text(old, 2) == "3 of 5 slices have a mask (2 s). Apply to keep it."


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


def test_download_files_and_progress_text_for_the_settings_panel():
    from SaLIPSegmentLib.models.weights import WeightsFile

    spec = WeightsFile("sam.pth", url="http://127.0.0.1:1/sam.pth", sha256="ab" * 32, size_bytes=375_000_000)
    assert eo.download_files([("vit_b", spec)]) == [
        {"name": "vit_b", "filename": "sam.pth", "url": "http://127.0.0.1:1/sam.pth", "sha256": "ab" * 32,
         "size_bytes": 375_000_000}]
    assert eo.download_progress(0, 0, "", 0, 0) == (-1, "Starting the download...")
    assert eo.download_progress(1, 2, "sam.pth", 120_000_000, 375_000_000) == (
        32, "File 2 of 2: sam.pth, 120 of 375 MB")
    assert eo.download_progress(0, 1, "clip.bin", 5_000_000, 0) == (-1, "File 1 of 1: clip.bin, 5 MB")
    # 2.5 GB (vit_h) would overflow a QProgressBar's int: the bar gets a percent
    assert eo.download_progress(0, 1, "vit_h.pth", 2_560_000_000, 2_564_550_879)[0] == 99


# -- models, end to end on a tiny SAM -------------------------------------------------------------


def test_the_worker_keeps_models_between_requests_and_reloads_on_change(tiny_sam, tiny_sam_checkpoint, tmp_path):
    """The child's request handling, in-process: the effect's settings in, mask and report out."""
    from SaLIPSegmentLib.worker import LARGEST_CANDIDATE_SCORER, Worker

    volume = np.stack([disk_image(), disk_image(), np.full((64, 64), 20, np.uint8)])
    np.save(tmp_path / "volume.npy", volume)
    events = []
    worker = Worker(events.append)
    options = eo.EffectOptions(top_k=1, proposal=eo.ProposalOverrides(points_per_side=4))

    def request(number, scorer):
        settings = eo.worker_settings(options, 1, (tiny_sam, scorer, "cpu", str(tiny_sam_checkpoint.parent)),
                                      0, (0, 3), None)
        return {"type": "segment", "id": number, "volume": str(tmp_path / "volume.npy"), "spacing": [1, 1, 1],
                "output": str(tmp_path / f"out{number}"), "settings": settings}

    assert worker.handle(request(1, LARGEST_CANDIDATE_SCORER))
    assert worker.handle(request(2, LARGEST_CANDIDATE_SCORER))
    assert worker.handle(request(3, "oracle")) is True  # the oracle needs a reference: an error event
    done = [event for event in events if event["event"] == "done"]
    assert [event["model_loads"] for event in done] == [1, 1]
    mask = np.load(done[0]["mask"])
    assert mask.shape == volume.shape and not mask[2].any()
    report = json.loads(open(done[0]["report"]).read())
    assert report["slices"][2]["reason"] == NO_TISSUE
    assert all(item.index != 2 for item in eo.flagged_from_report(report))
    error = [event for event in events if event["event"] == "error"]
    assert len(error) == 1 and error[0]["id"] == 3 and worker.models.loads == 2
    assert worker.handle({"type": "exit"}) is False


def test_worker_settings_carry_what_the_child_needs():
    options = eo.EffectOptions(prompt="lungs", top_k=0, proposal=eo.ProposalOverrides(points_per_side=12))
    settings = eo.worker_settings(options, 2, ("litemedsam", "ViT-B-32:openai", "cpu", None), 0, (3, 9), (-100, 400))
    assert settings == {"prompt": "lungs", "top_k": 2, "sam": "litemedsam", "clip": "ViT-B-32:openai",
                        "device": "cpu", "model_dir": None, "axis": "0", "slices": "3:9", "window": [-100.0, 400.0],
                        "proposal": {"points_per_side": 12}, "fill_holes": True}
    whole = eo.worker_settings(eo.EffectOptions(top_k=3, fill_holes=False), 1, ("vit_b", "oracle", "auto", "/m"), 2,
                               None, None)
    assert whole["slices"] is None and whole["window"] is None and whole["top_k"] == 3 and whole["model_dir"] == "/m"
    assert whole["fill_holes"] is False
    # The child builds the run from these values: the clean-up the user chose is the one it applies.
    from SaLIPSegmentLib.worker import settings_from_request

    assert settings_from_request(settings).volume_settings(0, None).cleanup.fill_holes
    assert not settings_from_request(whole).volume_settings(0, None).cleanup.fill_holes


def test_flagged_slices_from_a_worker_report():
    report = {"slices": [{"index": 4, "flags": []}, {"index": 5, "flags": ["no candidate", "area jump"]}]}
    assert [item.label for item in eo.flagged_from_report(report)] == ["Slice 5: no candidate, area jump"]
    report["slices"][1]["confidence"] = 0.125
    assert [item.label for item in eo.flagged_from_report(report)] == [
        "Slice 5 (confidence 0.12): no candidate, area jump"]


def test_supported_slicer_versions():
    assert eo.supported_slicer((5, 10), (5, 10)) and eo.supported_slicer((6, 0), (5, 10))
    assert not eo.supported_slicer((5, 8), (5, 10))
    assert "5.10 or later" in eo.unsupported_slicer_text((5, 8), (5, 10))
