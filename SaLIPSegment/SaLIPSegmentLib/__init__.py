"""SaLIP engine: text-prompted, training-free segmentation with SAM and CLIP.

Layers, each knowing only those below it: `cli` and `io` (files), `volume`
(3D arrays), `cascade` (one 2D slice), `models` (backends), `prompts`, `imaging`.
"""

__version__ = "0.1.0"
