"""Segment Anything (ViT-B, ViT-L, ViT-H) as a segmenter: point-grid proposals, box refine."""

from __future__ import annotations

from typing import Iterator, Optional, Tuple

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.utils import amg

from .base import PromptableSegmenter, ProposalSettings


class SamSegmenter(PromptableSegmenter):
    """segment_anything's `Sam` behind the propose and refine roles."""

    # The encoder is not on ONNX Runtime by default: ViT-B encodes there in 9.3 rather than 15.3 s
    # on 2 cores (features within 9e-6), but the export (28 s) and the runtime lift the process's
    # peak memory from 3.6 to 5.5 GB, too much next to CLIP on an 8 GB laptop. The mask decoder
    # is (onnx_decoder_on_cpu): 2.6 against 7.4 s per 64 points, three masks each.
    onnx_min_encodings = 5

    def __init__(self, model: Sam, device: torch.device, name: str = "sam"):
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
    ) -> Iterator[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
        per_side = max(1, settings.points_per_side // (settings.crop_n_points_downscale_factor**crop_layer))
        grid = amg.build_point_grid(per_side)  # (n, 2) in [0, 1], x then y
        points = grid * np.array(image_size[::-1])[None, :]
        for start in range(0, len(points), settings.points_per_batch):
            batch = torch.as_tensor(points[start : start + settings.points_per_batch], device=self.device)
            yield batch, None
