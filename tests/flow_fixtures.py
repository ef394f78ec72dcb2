"""Tiny random-weight SD3/SD3.5/FLUX.1 models with the real architectures, written in every file layout.

Sizes: transformers of 64 channels (FLUX: 2 heads of 32, 1 double + 1 single block; SD3: 2 joint
blocks, heads of 64), CLIP towers of 32 channels with the real 49408-token vocabulary, a T5 v1.1
encoder of 32 channels with the real 32128-token vocabulary, and a 4-level 16-channel VAE (8x).
Every original-layout file is produced from the diffusers modules by huabi's own tables
(``flux_to_original`` / ``sd3_to_original``); the tests then check loading against diffusers' loader.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from huabi.models.convert import vae_to_original
from huabi.models.transformer_families import TransformerFamily, flux_to_original, sd3_to_original

CLIP_WIDTH = 32
T5_WIDTH = 32


def tiny_flux(family: TransformerFamily = TransformerFamily.FLUX_DEV, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    fill = family is TransformerFamily.FLUX_FILL  # latent + masked-image latent + folded mask, packed
    model = FluxTransformer2DModel(
        patch_size=1, in_channels=384 if fill else 64, out_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=32,
        num_attention_heads=2, joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_WIDTH,
        guidance_embeds=family is not TransformerFamily.FLUX_SCHNELL, axes_dims_rope=(4, 14, 14),
    )
    return _randomize(model, seed)


def tiny_sd3(family: TransformerFamily = TransformerFamily.SD3_MEDIUM, seed: int = 0):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64, num_attention_heads=1,
        joint_attention_dim=T5_WIDTH, caption_projection_dim=64, pooled_projection_dim=2 * CLIP_WIDTH,
        out_channels=16, pos_embed_max_size=16,
        dual_attention_layers=(0,) if family is TransformerFamily.SD35_MEDIUM else (),
        qk_norm="rms_norm" if family in (TransformerFamily.SD35_MEDIUM, TransformerFamily.SD35_LARGE) else None,
    )
    return _randomize(model, seed)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """diffusers zero-initialises the adaLN and output layers; random values make every tensor matter."""
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            values = torch.randn(param.shape, generator=generator)
            if param.ndim > 1:
                param.copy_(values * 0.3)
            else:  # norm scales near 1, biases near 0
                param.copy_(values * 0.1 + (1.0 if "norm" in name else 0.0))
    return model.eval()


def tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        block_out_channels=[32, 32, 32, 32], layers_per_block=1, latent_channels=16, norm_num_groups=32,
        sample_size=64, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False,
    ).eval()


def tiny_clip(activation: str, pad_id: int, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=49408, hidden_size=CLIP_WIDTH, intermediate_size=64, num_hidden_layers=2, num_attention_heads=1,
        max_position_embeddings=77, hidden_act=activation, projection_dim=CLIP_WIDTH, bos_token_id=49406,
        eos_token_id=49407, pad_token_id=pad_id,
    )
    return CLIPTextModelWithProjection(config).eval()


def tiny_t5(seed: int = 3):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=32128, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                      feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(config).eval()


class TinyFlowModel:
    """The diffusers/transformers modules of one tiny model, and writers for each file layout."""

    def __init__(self, family: TransformerFamily, seed: int = 0) -> None:
        self.family = family
        self.transformer = tiny_flux(family, seed) if family.is_flux else tiny_sd3(family, seed)
        self.vae = tiny_vae(seed)
        if family.is_sd3:
            self.vae.register_to_config(scaling_factor=1.5305, shift_factor=0.0609)
        self.clip_l = tiny_clip("quick_gelu", 49407, seed + 10)
        self.clip_g = tiny_clip("gelu", 0, seed + 11) if family.is_sd3 else None
        self.t5 = tiny_t5(seed + 12)

    # --- state dicts in the original layouts
    def transformer_original(self) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().clone() for k, v in self.transformer.state_dict().items()}
        return flux_to_original(sd) if self.family.is_flux else sd3_to_original(sd)

    def vae_original(self) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().clone() for k, v in self.vae.state_dict().items()}
        original = vae_to_original(sd)
        return original

    def clip_hf(self, which: str) -> dict[str, torch.Tensor]:
        model = self.clip_l if which == "clip_l" else self.clip_g
        return {k: v.detach().clone() for k, v in model.state_dict().items()}

    def t5_hf(self) -> dict[str, torch.Tensor]:
        sd = {k: v.detach().clone() for k, v in self.t5.state_dict().items()}
        sd.pop("encoder.embed_tokens.weight", None)  # the released t5xxl files store the shared table once
        return sd

    # --- files
    def write_all_in_one(self, path: Path, *, with_t5: bool = True, dtype: torch.dtype | None = None) -> Path:
        tensors = {"model.diffusion_model." + k: v for k, v in self.transformer_original().items()}
        tensors.update({"first_stage_model." + k: v for k, v in self.vae_original().items()})
        tensors.update({"text_encoders.clip_l.transformer." + k: v for k, v in self.clip_hf("clip_l").items()})
        if self.clip_g is not None:
            tensors.update({"text_encoders.clip_g.transformer." + k: v for k, v in self.clip_hf("clip_g").items()})
        if with_t5:
            tensors.update({"text_encoders.t5xxl.transformer." + k: v for k, v in self.t5_hf().items()})
        return _save(tensors, path, dtype)

    def write_transformer(self, path: Path, *, prefix: str = "", dtype: torch.dtype | None = None) -> Path:
        return _save({prefix + k: v for k, v in self.transformer_original().items()}, path, dtype)

    def write_parts(self, folder: Path, *, t5_dtype: torch.dtype | None = None) -> dict[str, Path]:
        """ComfyUI's split files: text_encoders/clip_l.safetensors, clip_g, t5xxl_*.safetensors, vae/ae.safetensors."""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "text_encoders").mkdir(exist_ok=True)
        (folder / "vae").mkdir(exist_ok=True)
        parts = {"clip_l": _save(self.clip_hf("clip_l"), folder / "text_encoders" / "clip_l.safetensors", None)}
        if self.clip_g is not None:
            parts["clip_g"] = _save(self.clip_hf("clip_g"), folder / "text_encoders" / "clip_g.safetensors", None)
        t5_name = "t5xxl_fp8_e4m3fn.safetensors" if t5_dtype is torch.float8_e4m3fn else "t5xxl_fp16.safetensors"
        parts["t5xxl"] = _save(self.t5_hf(), folder / "text_encoders" / t5_name, t5_dtype)
        vae_name = "ae.safetensors" if self.family.is_flux else "sd3_vae.safetensors"
        parts["vae"] = _save(self.vae_original(), folder / "vae" / vae_name, None)
        return parts

    def write_diffusers_config(self, folder: Path) -> Path:
        """A local config folder for diffusers' ``from_single_file(config=...)`` (no hub)."""
        (folder / "transformer").mkdir(parents=True, exist_ok=True)
        (folder / "vae").mkdir(parents=True, exist_ok=True)
        self.transformer.save_config(folder / "transformer")
        self.vae.save_config(folder / "vae")
        name = "FluxPipeline" if self.family.is_flux else "StableDiffusion3Pipeline"
        (folder / "model_index.json").write_text(json.dumps({"_class_name": name}))
        return folder

    def write_diffusers_folder(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        self.transformer.save_pretrained(folder / "transformer")
        self.vae.save_pretrained(folder / "vae")
        self.clip_l.save_pretrained(folder / "text_encoder")
        if self.family.is_flux:
            self.t5.save_pretrained(folder / "text_encoder_2")
            index = {"_class_name": "FluxPipeline", "transformer": ["diffusers", "FluxTransformer2DModel"],
                     "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                     "text_encoder_2": ["transformers", "T5EncoderModel"]}
        else:
            self.clip_g.save_pretrained(folder / "text_encoder_2")
            self.t5.save_pretrained(folder / "text_encoder_3")
            index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
                     "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
                     "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                     "text_encoder_3": ["transformers", "T5EncoderModel"]}
        (folder / "model_index.json").write_text(json.dumps(index))
        return folder


def _save(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype | None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if dtype is not None:
        tensors = {k: (v.to(dtype) if v.is_floating_point() and v.ndim >= 2 else v) for k, v in tensors.items()}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def plain_clip(model) -> torch.nn.Module:
    """The same CLIP tower as a ``CLIPTextModel`` (no projection), as diffusers' FluxPipeline expects."""
    from transformers import CLIPTextModel

    plain = CLIPTextModel(model.config).eval()
    inner = {k.removeprefix("text_model."): v for k, v in model.state_dict().items() if k.startswith("text_model.")}
    target = plain.state_dict()
    if any(k.startswith("text_model.") for k in target):
        inner = {"text_model." + k: v for k, v in inner.items()}
    plain.load_state_dict(inner, strict=True)
    return plain
