"""The image encoder and mask decoder on ONNX Runtime on a CPU: same features and masks as torch, and torch
whenever they cannot run.

LiteMedSAM and SAM (ViT-B; ViT-L and ViT-H are too large for it) use it by default.
"""

import logging

import numpy as np
import pytest
import torch

from SaLIPSegmentLib.errors import ModelError
from SaLIPSegmentLib.imaging import dice, gray_to_rgb, mask_to_box, robust_window, window_to_uint8
from SaLIPSegmentLib.models import OracleScorer, ProposalSettings, cpu_runtime, create_segmenter, get_segmenter_spec
from SaLIPSegmentLib.settings import VolumeSettings
from SaLIPSegmentLib.volume import segment_volume

from conftest import TINY_SAM_PROPOSALS, disk_image

CPU = torch.device("cpu")


def torch_features(segmenter, image):
    pixels, _ = segmenter._input_tensor(image)
    with torch.inference_mode():
        return segmenter._encode_pixels(pixels[None])


def test_sams_decoder_moves_for_any_job_and_its_encoder_for_one_that_repays_the_export(
        tiny_sam, tiny_sam_checkpoint):
    image = gray_to_rgb(disk_image())
    outside_a_job, one_slice, long_job = (create_segmenter(tiny_sam, CPU, tiny_sam_checkpoint) for _ in range(3))
    one_slice.expect_encodings(1)  # what segment_volume says of a one-slice volume
    long_job.expect_encodings(long_job.onnx_min_encodings)
    for segmenter in (outside_a_job, one_slice, long_job):
        segmenter.set_image(image)
        segmenter.refine([(4, 4, 20, 20)])
    assert outside_a_job.encoder_runtime == outside_a_job.decoder_runtime == "torch"
    assert (one_slice.encoder_runtime, one_slice.decoder_runtime) == ("torch", "onnxruntime")
    assert (long_job.encoder_runtime, long_job.decoder_runtime) == ("onnxruntime", "onnxruntime")
    assert one_slice._onnx_decoder.session.get_session_options().enable_cpu_mem_arena
    torch.testing.assert_close(long_job.embedding.features, one_slice.embedding.features, atol=1e-4, rtol=1e-4)


def test_litemedsam_on_onnx_runtime_gives_torchs_features_and_masks(mni152):
    """Real weights, real MNI152 slices: the exported encoder is the same function."""
    volume, reference = mni152
    onnx, plain = (create_segmenter("litemedsam", CPU, download=False) for _ in range(2))
    onnx.expect_encodings(onnx.onnx_min_encodings)
    plain.expect_encodings(onnx.onnx_min_encodings - 1)  # one short of repaying the export
    window = robust_window(volume)
    images = [gray_to_rgb(window_to_uint8(volume[k], window)) for k in (70, 110)]
    embeddings = onnx.embed_images(images)
    assert onnx.encoder_runtime == "onnxruntime" and plain.encoder_runtime == "torch"
    # LiteMedSAM's small activations gain from the runtime keeping its buffers between slices.
    assert onnx._onnx_encoder.session.get_session_options().enable_cpu_mem_arena
    for k, image, embedding in zip((70, 110), images, embeddings):
        expected = torch_features(plain, image)
        torch.testing.assert_close(embedding.features, expected, atol=1e-4, rtol=1e-4)
        onnx.use_embedding(embedding)
        plain.set_image(image)
        box = mask_to_box(reference[k])
        a, b = onnx.refine([box])[0], plain.refine([box])[0]
        assert dice(a.mask, b.mask) > 0.999 and abs(a.predicted_iou - b.predicted_iou) < 1e-3
    assert onnx.decoder_runtime == plain.decoder_runtime == "onnxruntime"  # a job's decoder moves whatever its length


def test_litemedsams_proposals_on_onnx_runtime_are_torchs(mni152):
    """The box grid decoded in batches of 16, which the runtime runs 8 at a time: the same parts, in the same order."""
    volume, _ = mni152
    onnx, plain = (create_segmenter("litemedsam", CPU, download=False) for _ in range(2))
    onnx.expect_encodings(1)  # plain is not told of a job: it stays in torch
    image = gray_to_rgb(window_to_uint8(volume[90], robust_window(volume)))
    settings = ProposalSettings.from_dict(get_segmenter_spec("litemedsam").proposal_defaults)
    assert settings.points_per_batch > cpu_runtime.OnnxMaskDecoder.PROMPTS_PER_RUN
    onnx.set_image(image)
    plain.set_image(image)
    ours, theirs = onnx.propose(settings), plain.propose(settings)
    assert (onnx.encoder_runtime, onnx.decoder_runtime, plain.decoder_runtime) == ("torch", "onnxruntime", "torch")
    assert onnx._onnx_decoder.session.get_session_options().enable_cpu_mem_arena
    assert len(ours) > 10 and [c.box for c in ours] == [c.box for c in theirs]
    for a, b in zip(ours, theirs):
        assert dice(a.mask, b.mask) > 0.999 and abs(a.predicted_iou - b.predicted_iou) < 1e-4


@pytest.mark.parametrize("multimask", [True, False])
def test_the_runtimes_mask_decoder_returns_torchs_logits_and_scores(multimask, tiny_sam, tiny_sam_checkpoint):
    """SAM's decoder: three masks per point when proposing, one per box when refining; 20 prompts, 3 runs."""
    onnx = create_segmenter(tiny_sam, CPU, tiny_sam_checkpoint)
    plain = create_segmenter(tiny_sam, CPU, tiny_sam_checkpoint)
    onnx.expect_encodings(1000)
    image = gray_to_rgb(disk_image())
    onnx.set_image(image)
    plain.set_image(image)
    points = torch.rand(20, 2) * 31
    prompts = (points, None) if multimask else (None, torch.cat([points, points + 8], dim=1))
    with torch.inference_mode():
        ours = onnx._decode(onnx.embedding, *prompts, multimask=multimask)
        theirs = plain._decode(plain.embedding, *prompts, multimask=multimask)
    assert (onnx.decoder_runtime, plain.decoder_runtime) == ("onnxruntime", "torch")
    assert ours[0].shape == theirs[0].shape and ours[0].shape[:2] == (20, 3 if multimask else 1)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_a_job_too_short_to_repay_the_export_stays_in_torch(tiny_sam, tiny_sam_checkpoint, monkeypatch):
    built = []
    real_build = cpu_runtime.OnnxEncoder
    monkeypatch.setattr("SaLIPSegmentLib.models.base.build_onnx_encoder",
                        lambda encoder, example, arena: built.append(1) or real_build(encoder, example, 1, arena))
    segmenter = create_segmenter(tiny_sam, CPU, tiny_sam_checkpoint)
    image = gray_to_rgb(disk_image())
    segmenter.set_image(image)  # one image, nothing said of a longer job
    assert built == [] and segmenter.encoder_runtime == "torch"

    segmenter.expect_encodings(segmenter.onnx_min_encodings)
    segmenter.set_image(image)
    assert built == [1] and segmenter.encoder_runtime == "onnxruntime"
    assert not segmenter._onnx_encoder.session.get_session_options().enable_cpu_mem_arena  # SAM: memory first
    torch.testing.assert_close(segmenter.embedding.features, torch_features(segmenter, image), atol=1e-4, rtol=1e-4)
    segmenter.set_image(image)
    assert built == [1]  # exported once, then reused


def test_the_volume_runner_announces_its_job_and_masks_do_not_change(tiny_sam, tiny_sam_checkpoint, monkeypatch):
    volume = np.stack([disk_image(size=32, center=(15, 16), radius=4 + i) for i in range(6)]).astype(np.int16)
    proposal = ProposalSettings.from_dict(TINY_SAM_PROPOSALS)

    def run(runtime):
        monkeypatch.setenv(cpu_runtime.RUNTIME_VARIABLE, runtime)
        segmenter = create_segmenter(tiny_sam, CPU, tiny_sam_checkpoint)
        result = segment_volume(volume, segmenter, OracleScorer(), ["x"],
                                VolumeSettings(axis=0, proposal=proposal, mode="every-slice"), reference=volume > 100)
        summary = result.summary()  # the report says which ran
        assert (summary["encoder_runtime"], summary["decoder_runtime"]) == (
            segmenter.encoder_runtime, segmenter.decoder_runtime)
        return segmenter.encoder_runtime, segmenter.decoder_runtime, result.mask

    # SAM decodes its point grid with three masks per prompt, and the refine step with one.
    *onnx_runtimes, onnx_mask = run("onnxruntime")
    *torch_runtimes, torch_mask = run("torch")
    assert onnx_runtimes == ["onnxruntime"] * 2 and torch_runtimes == ["torch"] * 2  # 6 slices >= the minimum
    assert onnx_mask.any() and dice(onnx_mask, torch_mask) > 0.99


@pytest.mark.parametrize("obstacle", ["asked for torch", "not installed", "export fails", "too large",
                                      "reduced precision", "decoder export fails"])
def test_the_encoder_stays_in_torch_when_onnx_runtime_cannot_or_should_not_run(
        obstacle, tiny_sam, tiny_sam_checkpoint, monkeypatch, caplog):
    segmenter = create_segmenter(tiny_sam, CPU, tiny_sam_checkpoint)
    if obstacle == "asked for torch":
        monkeypatch.setenv(cpu_runtime.RUNTIME_VARIABLE, "torch")
    elif obstacle == "not installed":
        monkeypatch.setattr(cpu_runtime.importlib.util, "find_spec",
                            lambda name: None if name == "onnxruntime" else object())
    elif obstacle == "export fails":
        def failing_export(*args, **kwargs):
            raise RuntimeError("unsupported operator")

        monkeypatch.setattr(torch.onnx, "export", failing_export)
    elif obstacle == "too large":
        monkeypatch.setattr(cpu_runtime, "MAX_ENCODER_BYTES", 0)
    elif obstacle == "decoder export fails":
        def failing_decoder(*args, **kwargs):
            raise RuntimeError("unsupported operator")

        monkeypatch.setattr(cpu_runtime, "OnnxMaskDecoder", failing_decoder)
    else:
        segmenter.precision = "bf16"
    segmenter.expect_encodings(1000)
    image = gray_to_rgb(disk_image())
    with caplog.at_level(logging.WARNING):
        segmenter.set_image(image)
    assert segmenter.encoder_runtime == ("onnxruntime" if obstacle == "decoder export fails" else "torch")
    assert torch.isfinite(segmenter.embedding.features).all()
    assert ("image encoder stays in torch: ONNX export failed" in caplog.text) == (obstacle == "export fails")
    with caplog.at_level(logging.WARNING):
        candidates = segmenter.propose(ProposalSettings.from_dict(TINY_SAM_PROPOSALS))
    assert candidates  # it goes on working
    # The decoder has no size limit (it is small): it moves unless the runtime is absent, unwanted or
    # refused, or the precision is reduced.
    assert segmenter.decoder_runtime == ("onnxruntime" if obstacle == "too large" else "torch")
    assert ("mask decoder stays in torch: ONNX export failed" in caplog.text) == (
        obstacle in ("export fails", "decoder export fails"))


def test_an_unknown_runtime_is_a_clear_model_error(tiny_sam, tiny_sam_checkpoint, monkeypatch):
    monkeypatch.setenv(cpu_runtime.RUNTIME_VARIABLE, "tensorrt")
    segmenter = create_segmenter(tiny_sam, CPU, tiny_sam_checkpoint)
    segmenter.expect_encodings(1000)
    with pytest.raises(ModelError, match="SALIP_CPU_RUNTIME='tensorrt': use one of onnxruntime, torch"):
        segmenter.set_image(gray_to_rgb(disk_image()))
