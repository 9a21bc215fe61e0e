"""Segment Anything (ViT-B, ViT-L, ViT-H) as a segmenter: point-grid proposals, box refine."""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import Attention, ImageEncoderViT, add_decomposed_rel_pos
from segment_anything.utils import amg

from .base import PromptableSegmenter, ProposalSettings


class HeadByHeadAttention(Attention):
    """segment_anything's attention computed one head at a time on a CPU: the same outputs, far less memory.

    A global-attention block holds a (heads, tokens, tokens) matrix several times over; one head
    at a time holds a twelfth of it, at the same speed (Testing/Benchmarks/RESULTS.md). Other
    devices keep the one batched product.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        B, H, W, _ = x.shape
        qkv = self.qkv(x).reshape(B, H * W, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, B * self.num_heads, H * W, -1).unbind(0)
        heads = []
        for head in range(B * self.num_heads):
            q1, k1, v1 = q[head : head + 1], k[head : head + 1], v[head : head + 1]
            scores = (q1 * self.scale) @ k1.transpose(-2, -1)
            if self.use_rel_pos:
                scores = add_decomposed_rel_pos(scores, q1, self.rel_pos_h, self.rel_pos_w, (H, W), (H, W))
            heads.append(scores.softmax(dim=-1) @ v1)
        x = torch.cat(heads).view(B, self.num_heads, H, W, -1).permute(0, 2, 3, 1, 4).reshape(B, H, W, -1)
        return self.proj(x)


def attend_head_by_head(encoder: ImageEncoderViT) -> int:
    """Switch the encoder's global-attention blocks to HeadByHeadAttention; returns how many.

    Windowed blocks keep theirs: their 14 x 14 windows make small matrices. The parameters and
    their names stay as they are, so checkpoints load either way.
    """
    switched = 0
    for block in encoder.blocks:
        if block.window_size == 0 and type(block.attn) is Attention:
            block.attn.__class__ = HeadByHeadAttention
            switched += 1
    return switched


class SamSegmenter(PromptableSegmenter):
    """segment_anything's `Sam` behind the propose and refine roles."""

    # On a CPU the encoder runs on ONNX Runtime (models.cpu_runtime) for a job long enough to pay
    # for the export (figures: Testing/Benchmarks/RESULTS.md); ViT-L and ViT-H stay in torch.
    onnx_on_cpu = True
    onnx_min_encodings = 5
    takes_points = True  # trained on clicks as well as boxes

    def __init__(self, model: Sam, device: torch.device, name: str = "sam"):
        attend_head_by_head(model.image_encoder)
        super().__init__(model, device, input_side=model.image_encoder.img_size)
        self.name = name

    def _input_tensor(self, image_rgb: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int]]:
        resized = self._resize_longest(image_rgb)
        pixels = torch.as_tensor(resized, device=self.device).permute(2, 0, 1)[None].float()
        # Sam.preprocess normalises with SAM's pixel mean and std and pads to a square.
        return self.model.preprocess(pixels)[0], resized.shape[:2]

    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.image_encoder(pixels)

    def _proposal_prompts(
        self, settings: ProposalSettings, image_size: Tuple[int, int], crop_layer: int
    ) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        per_side = max(1, settings.points_per_side // (settings.crop_n_points_downscale_factor**crop_layer))
        grid = amg.build_point_grid(per_side)  # (n, 2) in [0, 1], x then y
        return grid * np.array(image_size[::-1])[None, :], None
