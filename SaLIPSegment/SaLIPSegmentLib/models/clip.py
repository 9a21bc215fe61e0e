"""CLIP (open_clip) as the scorer: masked crops against an averaged sentence ensemble."""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from ..imaging import masked_crop
from .base import Scorer
from .device import autocast


class ClipScorer(Scorer):
    """score = 100 x cosine(image embedding of the crop, mean of the sentence embeddings).

    Sentence embeddings are averaged before L2 normalisation, as in SaLIP, and cached
    per sentence set, so text is encoded once per run. All crops of a slice go
    through the image encoder in one batch.
    """

    def __init__(self, model, preprocess, tokenizer, device: torch.device, name: str = "clip"):
        self.model = model.to(device).eval()
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.device = device
        self.name = name
        self._text_cache: Dict[Tuple[str, ...], torch.Tensor] = {}

    def text_embedding(self, sentences: Sequence[str]) -> torch.Tensor:
        key = tuple(sentences)
        if key not in self._text_cache:
            with torch.inference_mode():
                tokens = self.tokenizer(list(key)).to(self.device)
                with autocast(self.device, self.precision):
                    per_sentence = self.model.encode_text(tokens)
                per_sentence = per_sentence.float()
                per_sentence = per_sentence / per_sentence.norm(dim=-1, keepdim=True)
                mean = per_sentence.mean(dim=0)
                self._text_cache[key] = mean / mean.norm()
        return self._text_cache[key]

    def score(self, image_rgb, candidates, sentences, reference=None) -> np.ndarray:
        return self.score_sets(image_rgb, candidates, [sentences], reference)[0]

    def score_sets(self, image_rgb, candidates, sentence_sets, reference=None) -> np.ndarray:
        """Sets x candidates; the crops go through the image encoder once, whatever the number of sets."""
        if not candidates:
            return np.zeros((len(sentence_sets), 0))
        texts = torch.stack([self.text_embedding(s) for s in sentence_sets])
        return np.concatenate([(100.0 * texts @ features.T).cpu().numpy().astype(np.float64)
                               for features in self._crop_features(image_rgb, candidates)], axis=1)

    def _crop_features(self, image_rgb, candidates):
        """The candidates' masked crops, L2-normalised image embeddings, max_batch at a time."""
        crops = [Image.fromarray(masked_crop(image_rgb, c.mask, c.box)) for c in candidates]
        step = self.max_batch or len(crops)
        with torch.inference_mode():
            for start in range(0, len(crops), step):
                batch = torch.stack([self.preprocess(crop) for crop in crops[start : start + step]]).to(self.device)
                with autocast(self.device, self.precision):
                    features = self.model.encode_image(batch)
                features = features.float()  # the cosine in fp32, outside autocast
                yield features / features.norm(dim=-1, keepdim=True)

    def to_device(self, device: torch.device) -> None:
        self.model = self.model.to(device)
        self.device = device
        self._text_cache.clear()


def is_torchscript_archive(path: Path) -> bool:
    """OpenAI's CLIP releases are TorchScript zips, which torch.load cannot read safely."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.split("/", 1)[-1].startswith("code/") for name in archive.namelist())


def load_clip_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint into an open_clip model without unpickling arbitrary objects.

    Plain checkpoints go through torch.load(weights_only=True) (inside open_clip's
    load_checkpoint) or safetensors. A TorchScript archive is read by TorchScript's
    own loader, whose unpickler only builds tensors and TorchScript types; we take
    its state dict and never call its code.
    """
    import open_clip

    if is_torchscript_archive(path):
        state = torch.jit.load(str(path), map_location="cpu").state_dict()
        for key in ("input_resolution", "context_length", "vocab_size"):
            state.pop(key, None)
        # TorchScript also saves buffers the model marks non-persistent (the causal mask).
        transient = {name for name, _ in model.named_buffers()} - set(model.state_dict())
        model.load_state_dict({k: v for k, v in state.items() if k not in transient})
    else:
        open_clip.load_checkpoint(model, str(path), weights_only=True)


def build_clip(model_name: str, checkpoint: Optional[Path], device: torch.device, quick_gelu: bool = False):
    """An open_clip model by config name, with weights from a local checkpoint."""
    import open_clip

    model, _, preprocess = open_clip.create_model_and_transforms(
        model_name, pretrained=None, force_quick_gelu=quick_gelu
    )
    if checkpoint is not None:
        load_clip_weights(model, checkpoint)
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipScorer(model, preprocess, tokenizer, device, name=model_name)
