"""The closed set of model families huabi knows.

Detection (``huabi.models.detect.detect``) looks at tensor names and shapes only; a file
that matches none of these is an error, never a guess.
"""

from __future__ import annotations

import enum


class ModelFamily(str, enum.Enum):
    SD1 = "sd1"  # SD 1.x: CLIP ViT-L/14 text encoder, 768-wide context
    SD2 = "sd2"  # SD 2.x: OpenCLIP ViT-H/14, 1024-wide context (eps 512 or v 768)
    SDXL = "sdxl"  # SDXL base: CLIP-L + OpenCLIP bigG, 2048-wide context, pooled + size conditioning
    SDXL_REFINER = "sdxl_refiner"  # SDXL refiner: OpenCLIP bigG only, aesthetic-score conditioning
    HUABI_MINI = "huabi_mini"  # huabi's built-in model: SD1 layout in miniature, marked by huabi.* tensors


class Prediction(str, enum.Enum):
    EPSILON = "epsilon"
    V = "v_prediction"


class UNetVariant(str, enum.Enum):
    """What the UNet's input channels carry besides the noisy latent."""

    BASE = "base"  # 4 channels: latent
    INPAINT = "inpaint"  # 9 channels: latent + mask + masked-image latent
    INSTRUCT_PIX2PIX = "instruct_pix2pix"  # 8 channels: latent + image latent
