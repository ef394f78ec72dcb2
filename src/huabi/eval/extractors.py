"""Feature extractors for the metrics: the FID Inception-v3, OpenAI CLIP, huabi-mini's towers.

An extractor turns one PIL image into a fixed-length float vector (``prepare`` per image,
``embed`` per batch); those vectors are what the feature cache stores. From them:

* ``fid_features`` -- what FID and KID compare (Inception: the 2048-d pool; CLIP: the
  L2-normalised image embedding);
* ``class_logits`` -- what the Inception Score reads (Inception: the 1008 logits without
  the fc bias; CLIP: zero-shot logits against a list of class names);
* ``text_features`` -- CLIP only, for the CLIP score.

``identity`` names the weights (a hash of their content) and the preprocessing, so a
cached vector is only reused by the same network fed the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from huabi.errors import HuabiError
from huabi.eval import preprocess

RELATIVE_ONLY_NOTE = (
    "Features from huabi-mini's own image tower: these numbers compare runs with each other "
    "(same extractor, same reference set) and are NOT comparable with published FID/KID/IS/CLIP scores."
)
PUBLISHED_NOTE = "Features from {name}: comparable with published numbers computed with the same network and preprocessing."
RANDOM_NOTE = "Features from {name}: weights not recognised as the published ones, so compare runs with each other only."
CLIP_NOTE = ("Features from {name}: comparable with published CLIP scores / CLIP-FIDs only if these are the original "
             "OpenAI weights (huabi cannot verify that); otherwise compare runs with each other only.")


def file_digest(path: Path) -> str:
    """sha256 of a weights file (models.hashes' cache: computed once per file version)."""
    from huabi.models.hashes import model_sha256

    return model_sha256(path)


@dataclass
class Extractor:
    """Common fields; subclasses implement prepare/embed and the feature views."""

    name: str
    identity: str  # cache key part: weights hash + preprocessing
    dim: int  # length of the cached vector
    device: torch.device
    note: str
    comparable_to_published: bool
    details: dict = field(default_factory=dict)

    def prepare(self, image: Image.Image) -> torch.Tensor:
        raise NotImplementedError

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        raise NotImplementedError

    def fid_features(self, vectors: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def class_logits(self, vectors: np.ndarray, labels: Sequence[str] | None = None) -> np.ndarray:
        raise NotImplementedError

    def text_features(self, prompts: Sequence[str]) -> np.ndarray:
        raise HuabiError(f"{self.name} has no text tower: CLIP score needs a CLIP extractor (the default, or --features CLIP_FILE)")

    def describe(self) -> dict:
        return {"name": self.name, "identity": self.identity, "dim": self.dim, "comparable_to_published": self.comparable_to_published, **self.details}


# Published FID Inception weights (pt_inception-2015-12-05-6726825d.pth), sha256 prefix of the file.
PUBLISHED_INCEPTION_SHA256_PREFIX = "6726825d"


@dataclass
class InceptionExtractor(Extractor):
    model: torch.nn.Module | None = None
    resize: str = "tf1"

    def prepare(self, image: Image.Image) -> torch.Tensor:
        return preprocess.inception_input(image, self.resize)

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        pool, logits = self.model(batch.to(self.device, torch.float32))
        return torch.cat([pool, logits], dim=1).float().cpu().numpy()

    def fid_features(self, vectors: np.ndarray) -> np.ndarray:
        from huabi.models.inception_fid import POOL_DIM

        return vectors[:, :POOL_DIM]

    def class_logits(self, vectors: np.ndarray, labels: Sequence[str] | None = None) -> np.ndarray:
        from huabi.models.inception_fid import POOL_DIM

        return vectors[:, POOL_DIM:]


@dataclass
class ClipExtractor(Extractor):
    """A transformers CLIPModel (or only its vision half until text is needed)."""

    vision: torch.nn.Module | None = None  # callable: pixel_values -> image embeddings
    image_px: int = 224
    pixel_range: str = "openai"  # "openai" (mean/std) or "minus_one_to_one" (huabi-mini)
    load_full_model: object = None  # () -> (CLIPModel, tokenizer), called once when text is needed
    _full: tuple | None = None

    def prepare(self, image: Image.Image) -> torch.Tensor:
        if self.pixel_range == "minus_one_to_one":
            return preprocess.minus_one_to_one_input(image, self.image_px)
        return preprocess.clip_input(image, self.image_px)

    @torch.inference_mode()
    def embed(self, batch: torch.Tensor) -> np.ndarray:
        return self.vision(batch.to(self.device, torch.float32)).float().cpu().numpy()

    def fid_features(self, vectors: np.ndarray) -> np.ndarray:
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)

    def full(self):
        if self._full is None:
            self._full = self.load_full_model()
        return self._full

    @torch.inference_mode()
    def text_features(self, prompts: Sequence[str]) -> np.ndarray:
        from huabi.train.clip import feature_tensor

        model, tokenizer = self.full()
        max_length = int(model.config.text_config.max_position_embeddings)
        rows = []
        for start in range(0, len(prompts), 256):
            chunk = list(prompts[start : start + 256])
            ids = tokenizer(chunk, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt").input_ids
            rows.append(feature_tensor(model.get_text_features(input_ids=ids.to(self.device))).float().cpu().numpy())
        return np.concatenate(rows) if rows else np.zeros((0, self.dim), np.float32)

    def class_logits(self, vectors: np.ndarray, labels: Sequence[str] | None = None) -> np.ndarray:
        """Zero-shot logits: logit_scale * cos(image, "label") for each class name."""
        if not labels:
            raise HuabiError("Inception Score with a CLIP extractor needs class names (--labels FILE or prompts in the images)")
        model, _ = self.full()
        text = self.text_features(list(labels))
        text = text / np.linalg.norm(text, axis=1, keepdims=True)
        image = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        return float(model.logit_scale.detach().exp()) * image @ text.T


class _VisionEmbeddings(torch.nn.Module):
    def __init__(self, clip_model) -> None:
        super().__init__()
        self.clip = clip_model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        from huabi.train.clip import feature_tensor

        return feature_tensor(self.clip.get_image_features(pixel_values=pixel_values))


def huabi_mini_extractor(device: torch.device, *, clip_path: Path | None = None, checkpoint: Path | None = None) -> ClipExtractor:
    """The default: huabi-mini's CLIP pair (image tower; the text tower is the checkpoint's)."""
    from huabi.service.engine import builtin_model_path

    checkpoint = checkpoint or builtin_model_path()
    from huabi.models.clip_pair import clip_pair_path

    clip_path = clip_path or clip_pair_path(checkpoint)
    if not clip_path.is_file():
        raise HuabiError(f"{clip_path}: huabi-mini's CLIP pair is missing (reinstall huabi, or pass --features FILE)")
    from huabi.models.clip_features import load_clip_pair_vision

    vision = load_clip_pair_vision(clip_path, device=device)
    image_px = int(vision.model.config.image_size)

    def load_full():
        from huabi.models.clip_pair import load_clip_pair
        from huabi.models.load import load_model
        from huabi.train.data import default_tokenizer

        bundle = load_model(checkpoint, device="cpu", dtype=torch.float32, compute_hash=False)
        return load_clip_pair(clip_path, text_encoder=bundle.text_encoders[0], device=device), default_tokenizer()

    return ClipExtractor(
        name="huabi-mini CLIP towers", identity=f"huabi-mini-clip:{file_digest(clip_path)[:16]}:range-1..1:{image_px}px-area",
        dim=int(vision.model.config.projection_dim), device=device, note=RELATIVE_ONLY_NOTE, comparable_to_published=False,
        details={"weights": str(clip_path), "image_px": image_px},
        vision=vision, image_px=image_px, pixel_range="minus_one_to_one", load_full_model=load_full,
    )


FEATURES_SUBFOLDER = "eval"  # MODELS/eval/: where --features NAME is looked up


def find_features(features: str | Path, models_dir: Path | None = None) -> Path:
    """A path as given, else a file or folder named so (with or without its suffix) in MODELS/eval/."""
    from huabi.service.engine import default_models_dir

    path = Path(features).expanduser()
    if path.exists():
        return path
    folder = (models_dir or default_models_dir()) / FEATURES_SUBFOLDER
    if folder.is_dir() and len(path.parts) == 1:
        for candidate in sorted(folder.iterdir()):
            if candidate.name == path.name or candidate.stem == path.name:
                return candidate
    raise HuabiError(f"{features}: feature extractor weights not found (as a path, or in {folder})")


def load_extractor(features: str | Path | None = None, *, device: str | torch.device = "cpu", resize: str = "tf1") -> Extractor:
    """``features``: None (huabi-mini), or a local Inception/CLIP weights file or folder."""
    from huabi.service.engine import resolve_device

    device = resolve_device(str(device)) if not isinstance(device, torch.device) else device
    if features is None:
        return huabi_mini_extractor(device)
    path = find_features(features)
    if path.is_dir():
        return _clip_extractor(path, device)
    from huabi.models.clip_features import looks_like_clip
    from huabi.models.clip_pair import CLIP_CONFIG_KEY
    from huabi.models.formats import read_state_dict
    from huabi.models.inception_fid import looks_like_fid_inception

    state_dict, metadata = read_state_dict(path)
    if looks_like_fid_inception(state_dict):
        from huabi.models.inception_fid import load_fid_inception

        model = load_fid_inception(path, state_dict).to(device)
        digest = file_digest(path)
        published = digest.startswith(PUBLISHED_INCEPTION_SHA256_PREFIX)
        name = f"FID Inception-v3 ({path.name})"
        return InceptionExtractor(
            name=name, identity=f"inception-fid:{digest[:16]}:{resize}", dim=2048 + 1008, device=device,
            note=(PUBLISHED_NOTE if published else RANDOM_NOTE).format(name=name), comparable_to_published=published,
            details={"weights": str(path), "resize": resize}, model=model, resize=resize,
        )
    if CLIP_CONFIG_KEY in metadata:
        return huabi_mini_extractor(device, clip_path=path)
    if looks_like_clip(state_dict):
        del state_dict
        return _clip_extractor(path, device)
    from huabi.models.detect import describe_non_checkpoint

    what = ("a Stable Diffusion checkpoint" if any(k.startswith("model.diffusion_model.") for k in state_dict)
            else describe_non_checkpoint(state_dict))
    raise HuabiError(f"{path.name}: not an FID Inception-v3 or CLIP weights file ({what}; {len(state_dict)} tensors, e.g. {', '.join(list(state_dict)[:2])})")


def _clip_extractor(path: Path, device: torch.device) -> ClipExtractor:
    from huabi.models.clip_features import config_summary, load_clip_model, load_clip_tokenizer

    model = load_clip_model(path, device=device)
    tokenizer = load_clip_tokenizer(path)
    image_px = int(model.config.vision_config.image_size)
    weights = path if path.is_file() else next(p for p in (path / "model.safetensors", path / "pytorch_model.bin") if p.is_file())
    name = f"{config_summary(model)} from {path.name}"
    return ClipExtractor(
        name=name, identity=f"clip:{file_digest(weights)[:16]}:openai-bicubic:{image_px}px", dim=int(model.config.projection_dim),
        device=device, note=CLIP_NOTE.format(name=name), comparable_to_published=False, details={"weights": str(path), "image_px": image_px},
        vision=_VisionEmbeddings(model), image_px=image_px, pixel_range="openai", load_full_model=lambda: (model, tokenizer),
    )

