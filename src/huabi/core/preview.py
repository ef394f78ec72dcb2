"""Cheap live previews: a latent seen as a small RGB image without running the VAE.

For 4-channel SD latents a fixed linear map from the four latent channels to RGB is close
enough to judge composition (the "approximate cheap" preview of A1111, whose published
per-channel factors these are); other latent widths show their first three channels,
each stretched to its own range. The image has the latent's size (1/8 of the output).
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

# latent channel -> (R, G, B) contribution, for SD1/SD2/SDXL-style 4-channel latents.
SD_LATENT_RGB = ((0.298, 0.207, 0.208), (0.187, 0.286, 0.173), (-0.158, 0.189, 0.264), (-0.184, -0.271, -0.473))


def latent_preview(latent: torch.Tensor) -> Image.Image:
    """[C, h, w] denoised latent (scaled, as the sampler sees it) -> an h x w RGB image."""
    latent = latent.detach().to("cpu", torch.float32)
    if latent.ndim != 3:
        raise ValueError(f"preview: expected a [C, h, w] latent, got shape {tuple(latent.shape)}")
    if latent.shape[0] == 4:
        rgb = torch.einsum("chw,cr->rhw", latent, torch.tensor(SD_LATENT_RGB))
        rgb = (rgb + 1.0) / 2.0
    else:
        rgb = latent[:3] if latent.shape[0] >= 3 else latent[:1].expand(3, -1, -1)
        low = rgb.amin(dim=(1, 2), keepdim=True)
        high = rgb.amax(dim=(1, 2), keepdim=True)
        rgb = (rgb - low) / (high - low).clamp(min=1e-6)
    array = (rgb.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(array))
