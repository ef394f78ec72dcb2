"""Training a diffusers ``AutoencoderKL`` (SD's f=8 KL autoencoder) from scratch or further.

Loss: L1 + MSE reconstruction of the posterior sample plus a small KL term, as in
the SD autoencoder minus its LPIPS/GAN parts (no pretrained LPIPS net offline).
The autoencoder is fully convolutional, so it trains on random ``crop_px`` crops
(4x cheaper at 64 of 128 px) and is validated at full size.
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
from huabi.train.data import TrainingImages

VAE_SALT = 1


@dataclass(frozen=True)
class VAEModelConfig:
    block_out_channels: tuple[int, ...] = (32, 64, 128, 128)  # 4 levels -> f=8
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32

    def build(self, *, seed: int = 0):
        from diffusers import AutoencoderKL

        torch.manual_seed(seed)  # the same initial weights for the same seed
        n = len(self.block_out_channels)
        return AutoencoderKL(
            in_channels=3,
            out_channels=3,
            latent_channels=self.latent_channels,
            block_out_channels=tuple(self.block_out_channels),
            layers_per_block=self.layers_per_block,
            down_block_types=("DownEncoderBlock2D",) * n,
            up_block_types=("UpDecoderBlock2D",) * n,
            norm_num_groups=self.norm_num_groups,
        )


@dataclass(frozen=True)
class VAETrainConfig(LoopConfig):
    crop_px: int = 64  # random square crops (0: whole images)
    flip: bool = True  # random horizontal flips
    kl_weight: float = 1e-6
    mse_weight: float = 1.0
    l1_weight: float = 1.0
    # L1 on the opponent-colour differences (red-green, yellow-blue) on top of the RGB terms: RGB
    # losses let a short run settle for grey greens (huabi-mini v1's VAE: 8% of green hues kept)
    chroma_weight: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_positive("crop_px", self.crop_px, allow_zero=True)
        if self.crop_px % 8:
            raise HuabiError(f"crop_px must be a multiple of 8, got {self.crop_px}")
        for name in ("kl_weight", "mse_weight", "l1_weight", "chroma_weight"):
            check_positive(name, getattr(self, name), allow_zero=True)


def vae_batch(images: TrainingImages, order: DataOrder, config: VAETrainConfig, step: int) -> torch.Tensor:
    """The (cropped, flipped) pixel batch of ``step`` in [-1, 1]."""
    generator = step_generator(config.seed, VAE_SALT, step)
    pixels = images.batch_pixels(order.batch(step))
    size = pixels.shape[-1]
    crop = config.crop_px if 0 < config.crop_px < size else size
    if config.crop_px > size:
        raise HuabiError(f"crop_px {config.crop_px} is larger than the images ({size} px)")
    offsets = torch.randint(0, size - crop + 1, (pixels.shape[0], 2), generator=generator)
    flips = torch.rand(pixels.shape[0], generator=generator) < 0.5
    out = torch.empty(pixels.shape[0], 3, crop, crop)
    for i in range(pixels.shape[0]):
        top, left = offsets[i].tolist()
        patch = pixels[i, :, top : top + crop, left : left + crop]
        out[i] = patch.flip(-1) if (config.flip and flips[i]) else patch
    return out


def vae_loss(vae, pixels: torch.Tensor, config: VAETrainConfig, generator: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    posterior = vae.encode(pixels).latent_dist
    noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean.device)
    latents = posterior.mean + posterior.std * noise
    reconstruction = vae.decode(latents).sample.float()
    l1 = (reconstruction - pixels).abs().mean()
    mse = (reconstruction - pixels).pow(2).mean()
    mean, logvar = posterior.mean.float(), posterior.logvar.float()
    kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
    loss = config.l1_weight * l1 + config.mse_weight * mse + config.kl_weight * kl
    metrics = {"loss": float(loss.detach()), "l1": float(l1.detach()), "kl": float(kl.detach())}
    if config.chroma_weight:
        chroma = (opponent_chroma(reconstruction) - opponent_chroma(pixels)).abs().mean()
        loss = loss + config.chroma_weight * chroma
        metrics.update(loss=float(loss.detach()), chroma=float(chroma.detach()))
    return loss, metrics


def opponent_chroma(pixels: torch.Tensor) -> torch.Tensor:
    """[N, 2, H, W]: red minus green, and yellow ((R + G) / 2) minus blue, of RGB pixels [N, 3, H, W]."""
    r, g, b = pixels.float().unbind(1)
    return torch.stack([r - g, (r + g) / 2 - b], dim=1)


def psnr(original: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """PSNR in dB of pixels in [-1, 1] (as images in [0, 1])."""
    mse = F.mse_loss(reconstruction.float() / 2, original.float() / 2)
    return float(10 * torch.log10(1.0 / mse.clamp_min(1e-10)))


# Hue bands in degrees (start, end; red wraps around 0) for ``colour_fidelity``.
HUE_BANDS: tuple[tuple[str, float, float], ...] = (
    ("red", 345, 15), ("orange", 15, 45), ("yellow", 45, 70), ("green", 70, 165),
    ("cyan", 165, 200), ("blue", 200, 255), ("purple", 255, 345),
)


def vae_from_record(record: dict):
    """The ``AutoencoderKL`` of a training record ``{"model_config": ..., "state_dict": ...}`` (eval mode)."""
    config = VAEModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in record["model_config"].items()})
    vae = config.build()
    vae.load_state_dict(record["state_dict"])
    return vae.eval()


def rgb_to_hsv(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in degrees [0, 360), saturation and value in [0, 1] of pixels [N, 3, H, W] in [-1, 1]."""
    rgb = ((pixels.float() + 1) / 2).clamp(0, 1)
    r, g, b = rgb.unbind(1)
    high, low = rgb.amax(1), rgb.amin(1)
    span = (high - low).clamp_min(1e-6)
    hue = torch.where(high == r, ((g - b) / span) % 6, torch.where(high == g, (b - r) / span + 2, (r - g) / span + 4)) * 60
    return hue % 360, (high - low) / high.clamp_min(1e-6), high


def colour_fidelity(original: torch.Tensor, reconstruction: torch.Tensor, *, min_pixels: int = 100) -> dict[str, dict[str, float]]:
    """Per hue band of the original's clearly coloured pixels (saturation > 0.5, value > 0.3): the
    share whose reconstructed hue is within 30 degrees (``hue_kept``) and the mean saturation
    ratio (``saturation_kept``). PSNR hides a VAE that turns every green grey (huabi-mini v1's:
    green 8% hue kept, half its saturation, at 19 dB overall); this names it. Bands with fewer than
    ``min_pixels`` such pixels are left out."""
    hue0, sat0, val0 = rgb_to_hsv(original)
    hue1, sat1, _ = rgb_to_hsv(reconstruction)
    coloured = (sat0 > 0.5) & (val0 > 0.3)
    report = {}
    for name, start, end in HUE_BANDS:
        band = coloured & (((hue0 >= start) | (hue0 < end)) if start > end else ((hue0 >= start) & (hue0 < end)))
        count = int(band.sum())
        if count < min_pixels:
            continue
        error = ((hue1[band] - hue0[band] + 180) % 360 - 180).abs()
        report[name] = {
            "pixels": count,
            "hue_kept": float((error < 30).float().mean()),
            "saturation_kept": float(sat1[band].mean() / sat0[band].mean()),
        }
    return report


@torch.no_grad()
def reconstruct(vae, pixels: torch.Tensor, *, batch_size: int = 32, precision: str = "fp32") -> torch.Tensor:
    """Mean-latent reconstructions of ``pixels`` (float32, clamped to [-1, 1], on the CPU)."""
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    rows = []
    with autocast(device, precision):
        for start in range(0, len(pixels), batch_size):
            batch = pixels[start : start + batch_size].to(device)
            rows.append(vae.decode(vae.encode(batch).latent_dist.mean).sample.float().clamp(-1, 1).cpu())
    vae.train(was_training)
    return torch.cat(rows)


def format_colour_fidelity(report: dict[str, dict[str, float]]) -> str:
    return ", ".join(f"{name} {row['hue_kept']:.2f}/{row['saturation_kept']:.2f}" for name, row in report.items())


def train_vae(
    config: VAETrainConfig,
    images: TrainingImages,
    *,
    model_config: VAEModelConfig = VAEModelConfig(),
    vae=None,
    state_path: Path | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = lambda message: None,
    on_step: HookFn | None = None,
    should_stop: Callable[[], bool] | None = None,
    validation_count: int = 64,
):
    """Train an ``AutoencoderKL`` (a new one from ``model_config``, or ``vae`` to fine-tune).

    Resumes from ``state_path`` when it exists; returns the trained module (in eval mode).
    """
    config.validate()
    device = torch.device(device)
    if vae is None:
        vae = model_config.build(seed=config.seed)
    vae = vae.to(device)
    optimizer, scheduler = make_optimizer(vae.parameters(), config)
    parts = LoopParts(modules={"vae": vae}, optimizer=optimizer, scheduler=scheduler)
    order = DataOrder(len(images), config.batch_size, config.seed)
    record = {**config_dict(config), "model": config_dict(model_config), "data_count": len(images)}
    # spread over the whole set: the first few images (one source, few greens) misjudged colours
    validation = images.batch_pixels(torch.linspace(0, len(images) - 1, min(validation_count, len(images))).long())

    precision = loop_precision("vae", config.precision, device, log)

    def step_fn(step: int) -> dict[str, float]:
        pixels = vae_batch(images, order, config, step).to(device)
        generator = step_generator(config.seed, VAE_SALT + 100, step)
        with autocast(device, precision):
            loss, metrics = vae_loss(vae, pixels, config, generator)
        loss.backward()
        return metrics

    def on_save(step: int) -> None:
        reconstruction = reconstruct(vae, validation, precision=precision)
        colours = format_colour_fidelity(colour_fidelity(validation, reconstruction))
        log(f"[vae] step {step} validation PSNR {psnr(validation, reconstruction):.2f} dB at {images.size_px} px"
            + (f"; hue kept/saturation kept: {colours}" if colours else ""))

    run_loop(
        name="vae",
        parts=parts,
        config=config,
        config_record=record,
        step_fn=step_fn,
        state_path=state_path,
        log=log,
        should_stop=should_stop,
        on_step=on_step,
        on_save=on_save if validation_count > 0 else None,
    )
    return vae
