"""The roles a backend plays, and what SAM-family segmenters share.

Three roles (the method in README.md): *propose* candidates for an image, *refine* a
box on an already embedded image, *score* candidates against a prompt. A segmenter
plays the first two and embeds each image once: `set_image`, then any number of
`propose` and `refine` calls, as segment_anything's predictor does. `Segmenter` and
`Scorer` declare everything the volume runner calls; test doubles implement them.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import ndimage
from segment_anything.utils import amg
from torchvision.ops import batched_nms

from ..imaging import Box
from ..settings import ProposalSettings
from .cpu_runtime import OnnxEncoder, OnnxMaskDecoder, build_onnx_encoder, build_onnx_mask_decoder
from .device import autocast, autocast_dtype, default_encode_batch


@dataclass
class Candidate:
    """One part that the propose step found."""

    mask: np.ndarray
    box: Box
    predicted_iou: float
    stability: float

    @property
    def area(self) -> int:
        return int(self.mask.sum())


@dataclass
class RefinedMask:
    """The refine step's answer for one box."""

    mask: np.ndarray
    box: Box
    predicted_iou: float


@dataclass
class Embedding:
    """One encoded image: the features plus the geometry to map prompts and masks."""

    features: torch.Tensor
    original_size: Tuple[int, int]
    input_size: Tuple[int, int]
    image: Optional[np.ndarray] = field(default=None, repr=False)


__all__ = ["Candidate", "Embedding", "NoisyOracleScorer", "OracleScorer", "PromptableSegmenter", "ProposalSettings",
           "RefinedMask", "Scorer", "Segmenter", "remove_small_regions"]  # ProposalSettings: settings (no torch)


class Segmenter(ABC):
    """Propose and refine on one image at a time; the image is embedded once.

    Besides the three abstract methods, the volume runner uses the rest of this interface:
    embeddings it can hold and hand back (embed_images, use_embedding, embedding; only with
    encode_batch above 1 or an embedding to hand back), the job's size (expect_encodings),
    the memory fallback's calls (limit_encode_batch, to_device) and what ran the models
    (encoder_runtime, decoder_runtime). The defaults suit a segmenter with none of this.
    """

    name: str = "segmenter"
    precision: str = "auto"
    """Autocast precision of the model calls (models.device.PRECISIONS); auto is fp32 off CUDA."""
    device: Optional[torch.device] = None
    """Where the model runs; None for a segmenter without torch state (nothing to move)."""
    encode_batch: int = 1
    """Images per encoder call; above 1 the runner encodes upcoming slices ahead with embed_images."""
    encoder_runtime: str = "torch"
    """What encodes images now: torch, or onnxruntime (models.cpu_runtime)."""
    decoder_runtime: str = "torch"
    """What decoded masks last, likewise."""
    takes_points: bool = False
    """Whether refine_points works: a hint may then be clicks (SAM); box-only models (LiteMedSAM) refuse them."""

    @abstractmethod
    def set_image(self, image_rgb: np.ndarray) -> None:
        """Encode an H x W x 3 uint8 image; later calls work on this embedding."""

    @abstractmethod
    def propose(self, settings: ProposalSettings) -> List[Candidate]:
        """Candidate part masks for the current image, best first."""

    @abstractmethod
    def refine(self, boxes: Sequence[Box]) -> List[RefinedMask]:
        """One mask per box on the current image (single-mask output, box only)."""

    def refine_points(self, points: Sequence[Tuple[float, float]], labels: Sequence[int]) -> RefinedMask:
        """One mask from positive (1) and negative (0) clicks in pixels on the current image (a hint)."""
        raise NotImplementedError(f"{self.name} takes boxes only, not points")

    def to_device(self, device: torch.device) -> None:
        """Move the model (after a GPU ran out of memory); the current image must be set again."""
        self.device = device  # a segmenter without torch state has nothing else to move

    def embed_images(self, images: Sequence[np.ndarray]) -> List[Embedding]:
        """Encode several images without making any current (called only with encode_batch above 1)."""
        raise NotImplementedError(f"{type(self).__name__} encodes one image at a time (encode_batch 1)")

    def use_embedding(self, embedding: Embedding) -> None:
        """Make an image encoded earlier (embed_images, or `embedding` read back) the current one."""
        raise NotImplementedError(f"{type(self).__name__} does not take embeddings back")

    @property
    def embedding(self) -> Optional[Embedding]:
        """The current image's encoding, to hand back to use_embedding later; None where there is none to give."""
        return None

    def expect_encodings(self, count: int) -> None:
        """A job is about to encode `count` images (a CPU segmenter weighs a one-off export against it)."""
        return None  # nothing to weigh without an export

    def limit_encode_batch(self, images: int) -> None:
        """At most this many images per encoder call from now on (the memory fallback's call)."""
        self.encode_batch = images


class PromptableSegmenter(Segmenter):
    """What SAM and LiteMedSAM share: segment_anything's prompt encoder and mask decoder.

    Subclasses say how an image is encoded, how pixel coordinates map to the model's
    input frame, how low-resolution logits map back, and which prompts propose.
    Proposals are filtered on low-resolution logits; only survivors are upsampled.
    """

    mask_threshold = 0.0
    multimask_proposals = True
    onnx_on_cpu = False
    """Encode on ONNX Runtime on a CPU at full precision (models.cpu_runtime), where measured faster."""
    onnx_decoder_on_cpu = True
    """Decode there too, in any job (segment_volume announces one): the export pays within one
    proposal grid (Testing/Benchmarks/RESULTS.md)."""
    onnx_memory_arena = False
    """Let ONNX Runtime keep its buffers between encodings: faster where activations are small."""
    onnx_min_encodings = 1
    """Export only for a job of at least this many encodings: below it the export costs more than it saves."""

    def __init__(self, model: torch.nn.Module, device: torch.device, input_side: int):
        self.model = model.to(device).eval()
        self.device = device
        # Images are resized so their longest side is input_side, then padded square.
        self.input_side = input_side
        self._embedding: Optional[Embedding] = None
        self.encode_batch = default_encode_batch(device)
        self._onnx_encoder: Optional[OnnxEncoder] = None
        self._onnx_tried = False  # built on the first CPU encoding of a long enough job, once
        self._onnx_decoder: Optional[OnnxMaskDecoder] = None
        self._onnx_decoder_tried = False  # built on the first CPU decoding of a job, once
        self._expected_encodings = 0
        self._dense_pe: Optional[Tuple[tuple, torch.Tensor]] = None

    def to_device(self, device: torch.device) -> None:
        self.model = self.model.to(device)
        self.device = device
        self._embedding = None
        self.encode_batch = min(self.encode_batch, default_encode_batch(device))

    # -- what a subclass provides ---------------------------------------------------

    @abstractmethod
    def _input_tensor(self, image_rgb: np.ndarray) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """The image as the encoder's (3, S, S) input, and the size of its unpadded part."""

    @abstractmethod
    def _encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """Image features for a (B, 3, S, S) batch of inputs."""

    @abstractmethod
    def _proposal_prompts(
        self, settings: ProposalSettings, image_size: Tuple[int, int], crop_layer: int
    ) -> Tuple[Optional[np.ndarray], Optional[np.ndarray]]:
        """Every proposal prompt on an image of `image_size`: (points (n, 2), boxes (n, 4)) in pixels;
        one of the two is None."""

    # -- the roles ------------------------------------------------------------------

    def set_image(self, image_rgb: np.ndarray) -> None:
        self._embedding = self.embed_images([image_rgb])[0]

    def embed_images(self, images: Sequence[np.ndarray]) -> List[Embedding]:
        """Encode several images, up to `encode_batch` per encoder call; nothing becomes current.

        A GPU encodes a batch of slices in little more time than one; a CPU does not gain.
        """
        images = [np.ascontiguousarray(image) for image in images]
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"expected an H x W x 3 uint8 image, got {image.shape} {image.dtype}")
        embeddings = []
        step = max(1, self.encode_batch)
        with torch.inference_mode():
            for start in range(0, len(images), step):
                with autocast(self.device, self.precision):
                    encoded = self._encode_many(images[start : start + step])
                if not all(torch.isfinite(e.features).all() for e in encoded):
                    # fp16 overflowed somewhere in the encoder: this batch again at full precision.
                    encoded = self._encode_many(images[start : start + step])
                embeddings.extend(encoded)
        for embedding, image in zip(embeddings, images):
            embedding.image = image  # crop layers encode parts of it later
        return embeddings

    def use_embedding(self, embedding: Embedding) -> None:
        """Make an image encoded by embed_images the current one."""
        self._embedding = embedding

    def _encode(self, image_rgb: np.ndarray) -> Embedding:
        return self._encode_many([image_rgb])[0]

    def _encode_many(self, images: Sequence[np.ndarray]) -> List[Embedding]:
        inputs = [self._input_tensor(image) for image in images]
        features = self._run_encoder(torch.stack([pixels for pixels, _ in inputs]))
        return [Embedding(features=features[i : i + 1], original_size=image.shape[:2], input_size=size)
                for i, (image, (_, size)) in enumerate(zip(images, inputs))]

    def _run_encoder(self, pixels: torch.Tensor) -> torch.Tensor:
        onnx = self._cpu_encoder(pixels)
        return self._encode_pixels(pixels) if onnx is None else onnx(pixels)

    def expect_encodings(self, count: int) -> None:
        """Say that a job is about to encode `count` images, so the export can be weighed against it."""
        self._expected_encodings = max(self._expected_encodings, count)

    def _cpu_at_full_precision(self) -> bool:
        return self.device.type == "cpu" and autocast_dtype(self.device, self.precision) is None

    def _onnx_applies(self) -> bool:
        return self.onnx_on_cpu and self._cpu_at_full_precision()

    def _onnx_decoder_applies(self) -> bool:
        return self.onnx_decoder_on_cpu and self._cpu_at_full_precision()

    def _cpu_encoder(self, example: torch.Tensor) -> Optional[OnnxEncoder]:
        """The ONNX Runtime encoder where it applies (a CPU, full precision), else None."""
        if not self._onnx_applies():
            return None
        if not self._onnx_tried and self._expected_encodings >= self.onnx_min_encodings:
            self._onnx_tried = True
            self._onnx_encoder = build_onnx_encoder(self.model.image_encoder, example, self.onnx_memory_arena)
        return self._onnx_encoder

    def _cpu_decoder(self, features, sparse, dense, image_pe) -> Optional[OnnxMaskDecoder]:
        """The ONNX Runtime mask decoder where it applies (a CPU, full precision, a job), else None."""
        if not self._onnx_decoder_applies() or self._expected_encodings < 1:
            return None
        if not self._onnx_decoder_tried:
            self._onnx_decoder_tried = True
            self._onnx_decoder = build_onnx_mask_decoder(self.model.mask_decoder, features, sparse, dense, image_pe)
        return self._onnx_decoder

    @property
    def encoder_runtime(self) -> str:
        """What encodes images now: onnxruntime (once built, see models.cpu_runtime) or torch."""
        return "onnxruntime" if self._onnx_encoder is not None and self._onnx_applies() else "torch"

    @property
    def decoder_runtime(self) -> str:
        """What decoded masks last: onnxruntime (once built) or torch."""
        return "onnxruntime" if self._onnx_decoder is not None and self._onnx_decoder_applies() else "torch"

    @property
    def embedding(self) -> Embedding:
        if self._embedding is None:
            raise RuntimeError("set_image must be called before propose or refine")
        return self._embedding

    def propose(self, settings: ProposalSettings) -> List[Candidate]:
        full = self.embedding
        height, width = full.original_size
        found: List[Tuple[torch.Tensor, float, float]] = []
        crop_boxes, layer_indices = amg.generate_crop_boxes(
            (height, width), settings.crop_n_layers, settings.crop_overlap_ratio
        )
        with torch.inference_mode(), autocast(self.device, self.precision):
            for crop_box, layer in zip(crop_boxes, layer_indices):
                x0, y0, x1, y1 = crop_box
                if settings.region is not None and not _meets(crop_box, settings.region):
                    continue  # nothing of the region in this crop: not worth its encoding
                if layer == 0:
                    embedding = full
                else:
                    # Crops need encodings of their own; the full image's stays for refine.
                    embedding = self._encode(np.ascontiguousarray(full.image[y0:y1, x0:x1]))
                found.extend(self._propose_in_crop(embedding, settings, crop_box, layer, (height, width)))
        return self._deduplicate(found, settings, (height, width))

    def refine(self, boxes: Sequence[Box]) -> List[RefinedMask]:
        if not boxes:
            return []
        embedding = self.embedding
        with torch.inference_mode(), autocast(self.device, self.precision):
            box_tensor = torch.as_tensor(np.asarray(boxes, dtype=np.float32), device=self.device)
            low_res, iou = self._decode(embedding, None, box_tensor, multimask=False)
            masks = self._upsample(low_res[:, 0], embedding) > self.mask_threshold
        return [
            RefinedMask(mask=m.cpu().numpy(), box=tuple(int(v) for v in b), predicted_iou=float(s))
            for m, b, s in zip(masks, boxes, iou[:, 0].float().cpu())
        ]

    def refine_points(self, points: Sequence[Tuple[float, float]], labels: Sequence[int]) -> RefinedMask:
        """Clicks on the current image, through the torch decoder (the ONNX one is built for box prompts).

        One click is ambiguous (a part or the whole): the decoder's three masks are asked for and
        the one with the best predicted IoU kept, as segment_anything advises.
        """
        if not self.takes_points:
            return super().refine_points(points, labels)
        embedding = self.embedding
        with torch.inference_mode(), autocast(self.device, self.precision):
            xy = torch.as_tensor(np.asarray(points, dtype=np.float32), device=self.device)
            coords = self._to_input_frame(xy, embedding.original_size)[None]
            kinds = torch.as_tensor(np.asarray(labels), dtype=torch.int, device=self.device)[None]
            sparse, dense = self.model.prompt_encoder(points=(coords, kinds), boxes=None, masks=None)
            low_res, iou = self.model.mask_decoder(
                image_embeddings=embedding.features, image_pe=self._image_pe(),
                sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=len(points) == 1)
            best = int(torch.argmax(iou[0].float()))
            mask = self._upsample(low_res[:, best].float(), embedding)[0] > self.mask_threshold
        mask = mask.cpu().numpy()
        rows, cols = np.nonzero(mask)
        box = (int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())) if rows.size else (0, 0, 0, 0)
        return RefinedMask(mask=mask, box=box, predicted_iou=float(iou[0, best]))

    # -- shared machinery -------------------------------------------------------------

    def _input_size(self, original_size: Tuple[int, int]) -> Tuple[int, int]:
        scale = self.input_side / max(original_size)
        return int(original_size[0] * scale + 0.5), int(original_size[1] * scale + 0.5)

    def _resize_longest(self, image_rgb: np.ndarray) -> np.ndarray:
        """The uint8 image resized so that its longest side is input_side."""
        height, width = self._input_size(image_rgb.shape[:2])
        return np.array(Image.fromarray(image_rgb).resize((width, height), Image.BILINEAR))

    def _to_input_frame(self, xy: torch.Tensor, original_size: Tuple[int, int]) -> torch.Tensor:
        """Pixel (x, y) coordinates, shape (..., 2), to the model's input frame."""
        input_h, input_w = self._input_size(original_size)
        scale = torch.tensor([input_w / original_size[1], input_h / original_size[0]], device=xy.device)
        return xy * scale

    def _upsample(self, low_res_logits: torch.Tensor, embedding: Embedding) -> torch.Tensor:
        """(N, h, w) low-resolution logits to (N, H, W) logits on the original image.

        One interpolation from the valid (unpadded) part of the low-resolution grid,
        instead of segment_anything's two, which go through a 1024 x 1024 copy per mask.
        """
        scale = low_res_logits.shape[-1] / self.input_side
        valid_h = max(1, round(embedding.input_size[0] * scale))
        valid_w = max(1, round(embedding.input_size[1] * scale))
        valid = low_res_logits[:, None, :valid_h, :valid_w].float()
        return F.interpolate(valid, embedding.original_size, mode="bilinear", align_corners=False)[:, 0]

    def _image_pe(self) -> torch.Tensor:
        """The prompt encoder's positional encoding of the image grid: fixed for the model, so computed once
        per device and precision, not in every decoder call (a few percent of a one-box refine on a CPU)."""
        key = (str(self.device), autocast_dtype(self.device, self.precision))  # as the decoder's calls run
        if self._dense_pe is None or self._dense_pe[0] != key:
            self._dense_pe = (key, self.model.prompt_encoder.get_dense_pe())
        return self._dense_pe[1]

    def _decode(self, embedding, points, boxes, multimask):
        """Low-resolution logits (B, M, h, w) and predicted IoU (B, M) for pixel prompts."""
        size = embedding.original_size
        point_prompt = box_prompt = None
        if points is not None:
            coords = self._to_input_frame(points.float(), size)[:, None, :]
            labels = torch.ones(coords.shape[:2], dtype=torch.int, device=self.device)
            point_prompt = (coords, labels)
        if boxes is not None:
            box_prompt = self._to_input_frame(boxes.float().reshape(-1, 2, 2), size).reshape(-1, 4)
        sparse, dense = self.model.prompt_encoder(points=point_prompt, boxes=box_prompt, masks=None)
        image_pe = self._image_pe()
        onnx = self._cpu_decoder(embedding.features, sparse, dense, image_pe)
        if onnx is not None:
            return onnx(embedding.features, sparse, dense, image_pe, multimask)
        low_res, iou = self.model.mask_decoder(
            image_embeddings=embedding.features,
            image_pe=image_pe,
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return low_res.float(), iou.float()  # thresholds and stability in fp32 whatever autocast did

    def _propose_in_crop(self, embedding, settings, crop_box, layer, full_size):
        crop_h, crop_w = embedding.original_size
        x0, y0, _, _ = crop_box
        kept = []
        for points, boxes in self._prompt_batches(settings, (crop_h, crop_w), layer, (x0, y0)):
            low_res, iou = self._decode(embedding, points, boxes, multimask=self.multimask_proposals)
            low_res, iou = low_res.flatten(0, 1), iou.flatten()
            stability = amg.calculate_stability_score(
                low_res, self.mask_threshold, settings.stability_score_offset
            )
            keep = (iou >= settings.pred_iou_thresh) & (stability >= settings.stability_score_thresh)
            if not keep.any():
                continue
            masks = self._upsample(low_res[keep], embedding) > self.mask_threshold
            crop_boxes = amg.batched_mask_to_box(masks)
            if layer > 0:
                # Parts cut by the crop's edge are seen whole in a larger crop.
                near_edge = amg.is_box_near_crop_edge(crop_boxes, list(crop_box), [0, 0, full_size[1], full_size[0]])
                masks, crop_boxes = masks[~near_edge], crop_boxes[~near_edge]
                iou_kept, stab_kept = iou[keep][~near_edge], stability[keep][~near_edge]
            else:
                iou_kept, stab_kept = iou[keep], stability[keep]
            for mask, score, stab in zip(masks.cpu(), iou_kept.float().cpu(), stab_kept.float().cpu()):
                if layer > 0:
                    full_mask = torch.zeros(full_size, dtype=torch.bool)
                    full_mask[y0 : y0 + crop_h, x0 : x0 + crop_w] = mask
                    mask = full_mask
                kept.append((mask, float(score), float(stab)))
        return kept

    def _prompt_batches(self, settings: ProposalSettings, crop_size: Tuple[int, int], layer: int,
                        origin: Tuple[int, int]) -> Iterator[Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]]:
        """The crop's proposal prompts in the settings' region (if any), points_per_batch at a time.

        `origin` is the crop's (x, y) in the image, whose pixels the region is given in."""
        points, boxes = self._proposal_prompts(settings, crop_size, layer)
        if settings.region is not None:
            x0, y0, x1, y1 = settings.region
            region = (x0 - origin[0], y0 - origin[1], x1 - origin[0], y1 - origin[1])
            if points is not None:
                points = points[points_in_region(points, region)]
            if boxes is not None:
                boxes = boxes[boxes_in_region(boxes, region)]
        prompts = points if points is not None else boxes
        for start in range(0, len(prompts), settings.points_per_batch):
            batch = torch.as_tensor(prompts[start : start + settings.points_per_batch], device=self.device)
            yield (batch, None) if points is not None else (None, batch)

    def _deduplicate(self, found, settings: ProposalSettings, size) -> List[Candidate]:
        height, width = size
        candidates = []
        for mask, score, stab in found:
            mask = mask.numpy()
            if settings.min_region_area > 0:
                mask = remove_small_regions(mask, settings.min_region_area)
            area = int(mask.sum())
            if area == 0 or area > settings.max_area_fraction * height * width:
                continue
            ys, xs = np.nonzero(mask)
            box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
            candidates.append(Candidate(mask=mask, box=box, predicted_iou=score, stability=stab))
        if not candidates:
            return []
        boxes = torch.tensor([c.box for c in candidates], dtype=torch.float32)
        scores = torch.tensor([c.predicted_iou for c in candidates])
        keep = batched_nms(boxes, scores, torch.zeros(len(candidates), dtype=torch.long), settings.box_nms_thresh)
        return [candidates[i] for i in keep.tolist()]  # batched_nms returns best first


REGION_OVERLAP = 0.5
"""A grid box proposes in a region when their overlap is at least this share of the smaller of the two:
a box mostly inside the region, or a larger box holding most of it (whose mask may be the whole target)."""


def points_in_region(points: np.ndarray, region) -> np.ndarray:
    """Which (x, y) points (n, 2) lie inside the box region (x0, y0, x1, y1), as a boolean array."""
    x0, y0, x1, y1 = region
    return (points[:, 0] >= x0) & (points[:, 0] <= x1) & (points[:, 1] >= y0) & (points[:, 1] <= y1)


def boxes_in_region(boxes: np.ndarray, region) -> np.ndarray:
    """Which boxes (n, 4) overlap the box region by REGION_OVERLAP of the smaller one's area, as a boolean array."""
    x0, y0, x1, y1 = (float(v) for v in region)
    width = np.clip(np.minimum(boxes[:, 2], x1) - np.maximum(boxes[:, 0], x0), 0, None)
    height = np.clip(np.minimum(boxes[:, 3], y1) - np.maximum(boxes[:, 1], y0), 0, None)
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    smaller = np.minimum(areas, max(x1 - x0, 0.0) * max(y1 - y0, 0.0))
    return (width * height >= REGION_OVERLAP * smaller) & (width * height > 0)


def _meets(a, b) -> bool:
    """Whether two boxes (x0, y0, x1, y1) share any pixel."""
    return a[0] <= b[2] and b[0] <= a[2] and a[1] <= b[3] and b[1] <= a[3]


def remove_small_regions(mask: np.ndarray, min_area: int) -> np.ndarray:
    """Drop islands and fill holes smaller than min_area pixels."""
    labels, count = ndimage.label(mask)
    if count:
        sizes = ndimage.sum(mask, labels, index=np.arange(1, count + 1))
        mask = np.isin(labels, 1 + np.flatnonzero(sizes >= min_area))
    holes, count = ndimage.label(~mask)
    if count:
        sizes = ndimage.sum(~mask, holes, index=np.arange(1, count + 1))
        mask = mask | np.isin(holes, 1 + np.flatnonzero(sizes < min_area))
    return mask


class Scorer(ABC):
    """The retrieve role: how well each candidate matches the prompt (higher is better)."""

    name: str = "scorer"
    needs_reference = False
    scores_like_clip = True
    """Scores that may judge propagation and presence: CLIP's, or an oracle that mimics CLIP's
    scale and noise; False for the exact oracle, whose zeros would give the answer away."""
    precision: str = "auto"
    """Autocast precision of the model calls (models.device.PRECISIONS); auto is fp32 off CUDA."""

    @abstractmethod
    def score(
        self,
        image_rgb: np.ndarray,
        candidates: Sequence[Candidate],
        sentences: Sequence[str],
        reference: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """One score per candidate."""

    reads_sentences = True
    """Whether the sentences change the scores (CLIP); the oracles score by overlap with a reference alone."""

    def score_sets(
        self,
        image_rgb: np.ndarray,
        candidates: Sequence[Candidate],
        sentence_sets: Sequence[Sequence[str]],
        reference: Optional[np.ndarray] = None,
    ) -> np.ndarray:
        """The candidates' scores against each sentence set: sets x candidates (presence's negatives)."""
        return np.stack([np.asarray(self.score(image_rgb, candidates, s, reference=reference), dtype=np.float64)
                         for s in sentence_sets])

    max_batch: Optional[int] = None
    """At most this many candidates per forward pass (None: all of a slice at once)."""

    def limit_batch(self, candidates: int) -> None:
        """At most this many candidates per forward pass from now on (the memory fallback's call)."""
        self.max_batch = candidates

    def to_device(self, device: torch.device) -> None:
        """Move the model (after a GPU ran out of memory)."""
        self.device = device  # a scorer without torch state (the oracle) has nothing else to move


class OracleScorer(Scorer):
    """Ranks candidates by Dice with a reference mask (x 100, like CLIP's scale).

    For evaluation only: it measures every stage but retrieval where no CLIP
    weights exist. It needs the reference slice, so it is never a default.
    """

    name = "oracle"
    needs_reference = True
    scores_like_clip = False
    reads_sentences = False

    def score(self, image_rgb, candidates, sentences, reference=None) -> np.ndarray:
        if reference is None:
            raise ValueError("the oracle scorer needs a reference mask (--reference)")
        reference = np.asarray(reference, dtype=bool)
        scores = []
        total_ref = int(reference.sum())
        for candidate in candidates:
            overlap = int(np.logical_and(candidate.mask, reference).sum())
            denominator = candidate.area + total_ref
            scores.append(100.0 * 2.0 * overlap / denominator if denominator else 0.0)
        return np.asarray(scores, dtype=np.float64)


class NoisyOracleScorer(OracleScorer):
    """A CLIP-like oracle: 22 + 8 x Dice with the reference, plus Gaussian noise (sigma 1.5).

    CLIP never scores 0: 100 x cosine sits around 20 to 35 for any crop, so an absent target
    reads only as a drop relative to other slices, and retrieval sometimes errs. Evaluating
    with this scorer keeps presence rules honest. The noise is seeded by the slice's pixels
    and the candidate's box, so the same slice gives the same scores in any run.
    """

    name = "oracle-noisy"
    scores_like_clip = True
    BASE, SCALE, SIGMA = 22.0, 8.0, 1.5

    def score(self, image_rgb, candidates, sentences, reference=None) -> np.ndarray:
        dice = super().score(image_rgb, candidates, sentences, reference) / 100.0
        slice_seed = int.from_bytes(hashlib.blake2b(np.ascontiguousarray(image_rgb).tobytes(),
                                                    digest_size=8).digest(), "little")
        noise = [np.random.default_rng([slice_seed, *(int(v) for v in c.box)]).normal(0.0, self.SIGMA)
                 for c in candidates]
        return self.BASE + self.SCALE * dice + np.asarray(noise, dtype=np.float64)
