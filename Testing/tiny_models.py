"""Test-sized real architectures, as a SaLIP plugin (SALIP_PLUGINS=Testing/tiny_models.py).

As a plugin, the batch tests' worker processes and Ray actors know these models too.
"tiny-sam" is segment_anything's real Sam with a 2-block ViT on 128 px input; the CLIP
config next to this file is a real open_clip CLIP with 2-layer towers. Weights are
random: the code paths are the real ones, the numbers are not.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import open_clip
import torch

from SaLIPSegmentLib.models import SegmenterSpec, register_segmenter
from SaLIPSegmentLib.models.registry import load_weights_file
from SaLIPSegmentLib.models.sam import SamSegmenter
from SaLIPSegmentLib.models.weights import WeightsFile

TINY_SAM = "tiny-sam"
TINY_CLIP = "salip-test-tiny-clip"
TINY_CLIP_CONFIG = Path(__file__).with_name(f"{TINY_CLIP}.json")
# Random weights predict arbitrary IoUs, so nothing may be filtered on them.
TINY_SAM_PROPOSALS = {"points_per_side": 4, "points_per_batch": 16, "pred_iou_thresh": -1e9,
                      "stability_score_thresh": -1e9, "max_area_fraction": 1.0}


def build_tiny_sam():
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    embed = 32
    model = Sam(
        image_encoder=ImageEncoderViT(
            img_size=128, patch_size=16, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
            out_chans=embed, qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            use_rel_pos=True, window_size=4, global_attn_indexes=(1,),
        ),
        prompt_encoder=PromptEncoder(embed_dim=embed, image_embedding_size=(8, 8),
                                     input_image_size=(128, 128), mask_in_chans=4),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=embed, mlp_dim=64, num_heads=2),
            transformer_dim=embed, iou_head_depth=2, iou_head_hidden_dim=32,
        ),
    )
    return model.eval()


def register(sha256=None) -> None:
    """Register "tiny-sam" (its checkpoint checked against sha256 when given) and the tiny CLIP config."""

    def build(path, device):
        model = build_tiny_sam()
        model.load_state_dict(load_weights_file(path))
        return SamSegmenter(model, device, name=TINY_SAM)

    register_segmenter(SegmenterSpec(
        name=TINY_SAM, description="test-sized SAM, random weights",
        weights=WeightsFile("tiny_sam.pth", url=None, sha256=sha256),
        build=build, proposal_defaults=dict(TINY_SAM_PROPOSALS),
    ))
    if TINY_CLIP not in open_clip.list_models():
        open_clip.add_model_config(TINY_CLIP_CONFIG)


register()
