"""CLIP-style contrastive training of a text tower and an image tower (transformers ``CLIPModel``).

The text tower (a ``CLIPTextModel``: real CLIP vocabulary of 49408 ids, 77
positions, quick_gelu, pad = EOS as SD1) becomes the diffusion model's frozen text
encoder; its ``last_hidden_state`` (after the final layer norm, SD1's choice) is the
UNet's cross-attention context. The image tower ships separately for evaluation
(CLIP score). Loss: the symmetric InfoNCE of CLIP with a learned temperature.
Images are shown to the vision tower at ``image_px`` (area-downsampled).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from huabi.errors import HuabiError
from huabi.train.common import (
    DataOrder,
    HookFn,
    LoopConfig,
    LoopParts,
    autocast,
    check_positive,
    config_dict,
    loop_precision,
    make_optimizer,
    run_loop,
    step_generator,
)
from huabi.train.data import CLIP_CONTEXT, TrainingImages

CLIP_SALT = 2
CLIP_VOCAB_SIZE = 49408
BOS_ID, EOS_ID = 49406, 49407
TEXT_HEAD_DIM = 64  # huabi's text-encoder loader infers heads = width // 64 (heads are invisible in weights)


@dataclass(frozen=True)
class CLIPModelConfig:
    text_width: int = 256
    text_layers: int = 4
    vision_width: int = 256
    vision_layers: int = 4
    image_px: int = 64
    patch_px: int = 8
    projection_dim: int = 256

    def validate(self) -> None:
        for name in ("text_width", "text_layers", "vision_width", "vision_layers", "image_px", "patch_px", "projection_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HuabiError(f"{name} must be an integer >= 1, got {value!r}")
        if self.text_width % TEXT_HEAD_DIM:
            raise HuabiError(f"text_width must be a multiple of {TEXT_HEAD_DIM} (64-wide heads), got {self.text_width}")
        if self.vision_width % TEXT_HEAD_DIM:
            raise HuabiError(f"vision_width must be a multiple of {TEXT_HEAD_DIM} (64-wide heads), got {self.vision_width}")
        if self.image_px % self.patch_px:
            raise HuabiError(f"image_px {self.image_px} must be a multiple of patch_px {self.patch_px}")

    def hf_config(self):
        from transformers import CLIPConfig

        text = dict(
            vocab_size=CLIP_VOCAB_SIZE,
            hidden_size=self.text_width,
            intermediate_size=4 * self.text_width,
            num_hidden_layers=self.text_layers,
            num_attention_heads=self.text_width // TEXT_HEAD_DIM,
            max_position_embeddings=CLIP_CONTEXT,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=self.projection_dim,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
            pad_token_id=EOS_ID,
        )
        vision = dict(
            hidden_size=self.vision_width,
            intermediate_size=4 * self.vision_width,
            num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_width // TEXT_HEAD_DIM,
            image_size=self.image_px,
            patch_size=self.patch_px,
            num_channels=3,
            hidden_act="quick_gelu",
            layer_norm_eps=1e-5,
            projection_dim=self.projection_dim,
        )
        return CLIPConfig(text_config=text, vision_config=vision, projection_dim=self.projection_dim)

    def build(self, *, seed: int = 0):
        from transformers import CLIPModel

        self.validate()
        torch.manual_seed(seed)
        return CLIPModel(self.hf_config())


@dataclass(frozen=True)
class CLIPTrainConfig(LoopConfig):
    max_logit_scale: float = 100.0  # CLIP clamps the learned temperature at 100

    def validate(self) -> None:
        super().validate()
        check_positive("max_logit_scale", self.max_logit_scale)
        if self.batch_size < 2:
            raise HuabiError(f"batch_size must be >= 2 for contrastive training, got {self.batch_size}")


def images_for_vision(pixels: torch.Tensor, image_px: int) -> torch.Tensor:
    """[-1, 1] pixels area-resized to the vision tower's input size."""
    if pixels.shape[-1] == image_px:
        return pixels
    return F.interpolate(pixels, size=(image_px, image_px), mode="area" if pixels.shape[-1] > image_px else "bilinear")


def contrastive_loss(model, input_ids: torch.Tensor, pixel_values: torch.Tensor, same: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Symmetric InfoNCE; ``same[i, j]`` marks pairs whose captions are identical (not negatives)."""
    text = F.normalize(feature_tensor(model.get_text_features(input_ids=input_ids)), dim=-1)
    image = F.normalize(feature_tensor(model.get_image_features(pixel_values=pixel_values)), dim=-1)
    logits = model.logit_scale.exp() * text.float() @ image.float().T
    if same is not None:
        # A caption shared by two images is a positive for both: mask the off-diagonal duplicates out.
        logits = logits.masked_fill(same & ~torch.eye(len(same), dtype=torch.bool, device=same.device), float("-inf"))
    targets = torch.arange(logits.shape[0], device=logits.device)
    loss = 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))
    accuracy = float((logits.argmax(1) == targets).float().mean())
    return loss, {"loss": float(loss.detach()), "acc": accuracy, "scale": float(model.logit_scale.detach().exp())}


def trim_padding(input_ids: torch.Tensor) -> torch.Tensor:
    """Drop the columns after the last caption's first EOS.

    The text tower is causal and pools at the first EOS, so positions after it never
    influence the pooled features: the trimmed batch gives the same loss and
    gradients at a fraction of the cost (captions are ~5-20 of 77 tokens).
    """
    is_eos = input_ids == EOS_ID
    if not bool(is_eos.any(dim=1).all()):
        return input_ids  # some row has no EOS (truncated by a custom tokenizer): keep everything
    length = int(is_eos.int().argmax(dim=1).max()) + 1
    return input_ids[:, :length]


def feature_tensor(output) -> torch.Tensor:
    # transformers 5 returns a ModelOutput from get_*feature_tensor; older versions a tensor
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


def train_clip(
    config: CLIPTrainConfig,
    images: TrainingImages,
    token_ids: torch.Tensor,
    *,
    model_config: CLIPModelConfig = CLIPModelConfig(),
    model=None,
    state_path: Path | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = lambda message: None,
    on_step: HookFn | None = None,
    should_stop: Callable[[], bool] | None = None,
):
    """Contrastively train text + image towers on (image, one caption variant) pairs.

    ``token_ids`` [M, 77] are the tokenized ``images.captions``. Images without a
    caption are never drawn. Returns the ``CLIPModel`` (eval mode).
    """
    config.validate()
    model_config.validate()
    if token_ids.shape != (len(images.captions), CLIP_CONTEXT):
        raise HuabiError(f"token_ids must be [{len(images.captions)}, {CLIP_CONTEXT}], got {list(token_ids.shape)}")
    captioned = torch.tensor([i for i, ids in enumerate(images.caption_ids) if ids], dtype=torch.int64)
    if len(captioned) < 2:
        raise HuabiError("contrastive training needs at least 2 captioned images")
    device = torch.device(device)
    if model is None:
        model = model_config.build(seed=config.seed)
    model = model.to(device)
    optimizer, scheduler = make_optimizer(model.parameters(), config)
    parts = LoopParts(modules={"clip": model}, optimizer=optimizer, scheduler=scheduler)
    order = DataOrder(len(captioned), config.batch_size, config.seed)
    record = {**config_dict(config), "model": config_dict(model_config), "data_count": len(images)}
    precision = loop_precision("clip", config.precision, device, log)

    def step_fn(step: int) -> dict[str, float]:
        generator = step_generator(config.seed, CLIP_SALT, step)
        items = captioned[order.batch(step)]
        caption_index = images.pick_captions(items, generator)
        same = caption_index[:, None] == caption_index[None, :]
        pixels = images_for_vision(images.batch_pixels(items), model_config.image_px)
        flips = torch.rand(len(items), generator=generator) < 0.5
        pixels = torch.where(flips[:, None, None, None], pixels.flip(-1), pixels)
        with autocast(device, precision):
            input_ids = trim_padding(token_ids[caption_index])
            loss, metrics = contrastive_loss(model, input_ids.to(device), pixels.to(device), same.to(device))
        loss.backward()
        return metrics

    def on_step_with_clamp(step: int, metrics: dict[str, float]) -> None:
        with torch.no_grad():
            model.logit_scale.clamp_(max=float(torch.log(torch.tensor(config.max_logit_scale))))
        if on_step is not None:
            on_step(step, metrics)

    run_loop(
        name="clip",
        parts=parts,
        config=config,
        config_record=record,
        step_fn=step_fn,
        state_path=state_path,
        log=log,
        should_stop=should_stop,
        on_step=on_step_with_clamp,
    )
    return model


@torch.no_grad()
def encode_text(text_encoder, token_ids: torch.Tensor, *, batch_size: int = 256, device: torch.device | str = "cpu", precision: str = "fp32") -> torch.Tensor:
    """[M, 77, width] ``last_hidden_state`` (SD1 conditioning, clip skip 1) for token ids [M, 77]."""
    text_encoder.eval()
    out = []
    for start in range(0, len(token_ids), batch_size):
        with autocast(device, precision):
            hidden = text_encoder(input_ids=token_ids[start : start + batch_size].to(device)).last_hidden_state
        out.append(hidden.float().cpu())
    return torch.cat(out)
