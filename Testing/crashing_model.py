"""A SaLIP plugin for one test: "crashing-sam" is the tiny SAM, except that it kills its own
process on a 20-pixel-high slice, as the kernel's out-of-memory killer would kill a worker.

Load it after tiny_models.py: SALIP_PLUGINS=Testing/tiny_models.py:Testing/crashing_model.py
"""

from __future__ import annotations

import os
from dataclasses import replace

from SaLIPSegmentLib.models.base import Segmenter
from SaLIPSegmentLib.models.registry import SEGMENTERS, register_segmenter

CRASH_HEIGHT = 20


class CrashingSegmenter(Segmenter):
    def __init__(self, inner):
        self.inner, self.device = inner, inner.device

    def set_image(self, image):
        if image.shape[0] == CRASH_HEIGHT:
            os._exit(137)
        self.inner.set_image(image)

    def propose(self, settings):
        return self.inner.propose(settings)

    def refine(self, boxes):
        return self.inner.refine(boxes)

    def to_device(self, device):
        self.inner.to_device(device)


tiny = SEGMENTERS["tiny-sam"]
register_segmenter(replace(tiny, name="crashing-sam", build=lambda path, device: CrashingSegmenter(
    tiny.build(path, device))))
