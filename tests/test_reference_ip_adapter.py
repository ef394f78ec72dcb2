"""IP-Adapter's maths against the published formula, written out here (issue 22).

huabi runs IP-Adapter through diffusers' ``IPAdapterAttnProcessor2_0`` and diffusers' image-projection
converter, and its other test compares with diffusers' own ``load_ip_adapter``: both sides share that
code, so the maths itself was never checked. Here the reference is the IP-Adapter paper's decoupled
cross-attention as the authors' ``IPAttnProcessor`` computes it, written with plain tensor operations
from the adapter file's raw tensors:

* image tokens = ``LayerNorm(image_proj.proj(image_embeds).reshape(4, context))`` (their
  ``ImageProjModel``);
* each cross-attention layer: ``softmax(Q K_text^T / sqrt(d)) V_text + scale * softmax(Q K_ip^T / sqrt(d)) V_ip``
  per head, then ``to_out``, with ``K_ip = to_k_ip(tokens)``, ``V_ip = to_v_ip(tokens)`` and the
  adapter's layer N given to the N-th attention processor of the UNet in diffusers' processor order
  (the authors number every processor, so cross-attention layers get the odd numbers);
* the image tokens reach the layers appended to the text context and are split off again, as the
  authors' code does (no ``encoder_hid_proj``, no diffusers IP-Adapter code on this side).

A second copy of the tiny SD1 UNet gets this processor through diffusers' public ``set_attn_processor``;
the same noisy latent, timestep, text context and image embedding go through huabi's patched UNet and
the reference. float32, same weights, different summation order: measured 4.8e-7 (weight 0.6) and 7.2e-7 (1.0) relative to the
largest output; asserted 1e-5.
"""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from torch.nn import functional as F

from huabi.models.ip_adapter import load_image_encoder, load_ip_adapter
from huabi.models.load import load_model
from huabi.service.attention_adapters import applied_image_prompt, prepare_image_prompt
from test_ip_adapter import adapter_tensors, models_dir, sample_image, write_adapter  # noqa: F401 - fixture

CPU = torch.device("cpu")
IMAGE_TOKENS = 4
TEXT_TOKENS = 77


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, heads: int) -> torch.Tensor:
    """Scaled dot-product attention per head, written out: [B, N, C] x [B, M, C] -> [B, N, C]."""
    batch, n, width = query.shape
    head_dim = width // heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(batch, -1, heads, head_dim).permute(0, 2, 1, 3)

    q, k, v = split(query), split(key), split(value)
    weights = torch.softmax(q @ k.transpose(-1, -2) / head_dim**0.5, dim=-1)
    return (weights @ v).permute(0, 2, 1, 3).reshape(batch, n, width)


class DecoupledCrossAttention(torch.nn.Module):
    """The authors' IPAttnProcessor maths for one cross-attention layer (no mask, no group norm)."""

    def __init__(self, to_k_ip: torch.Tensor, to_v_ip: torch.Tensor, scale: float) -> None:
        super().__init__()
        self.to_k_ip, self.to_v_ip, self.scale = to_k_ip, to_v_ip, scale

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **_):
        assert encoder_hidden_states is not None and attention_mask is None
        residual = hidden_states
        text = encoder_hidden_states[:, :-IMAGE_TOKENS]
        image = encoder_hidden_states[:, -IMAGE_TOKENS:]
        query = attn.to_q(hidden_states)
        text_part = _attention(query, attn.to_k(text), attn.to_v(text), attn.heads)
        image_part = _attention(query, F.linear(image, self.to_k_ip), F.linear(image, self.to_v_ip), attn.heads)
        out = attn.to_out[1](attn.to_out[0](text_part + self.scale * image_part))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _image_tokens(raw: dict[str, torch.Tensor], image_embeds: torch.Tensor) -> torch.Tensor:
    """The authors' ImageProjModel: linear to 4 * context, 4 tokens, LayerNorm (eps 1e-5)."""
    context = raw["image_proj.norm.weight"].shape[0]
    tokens = F.linear(image_embeds, raw["image_proj.proj.weight"], raw["image_proj.proj.bias"])
    tokens = tokens.reshape(image_embeds.shape[0], -1, context)
    return F.layer_norm(tokens, (context,), raw["image_proj.norm.weight"], raw["image_proj.norm.bias"], eps=1e-5)


@pytest.mark.parametrize("weight", [0.6, 1.0])
def test_ip_adapter_unet_output_matches_the_decoupled_cross_attention_formula(
        tiny_sd1_file, models_dir, tmp_path, weight):  # noqa: F811 - models_dir is test_ip_adapter's fixture
    ours_bundle = load_model(tiny_sd1_file)
    reference_unet = load_model(tiny_sd1_file).unet
    raw = adapter_tensors(ours_bundle.unet, seed=3)
    path = write_adapter(tmp_path / "ip-adapter_tiny_sd15.safetensors", raw)
    encoder = load_image_encoder(models_dir / "clip_vision" / "tiny-vit", device=CPU, dtype=torch.float32)
    prompt = prepare_image_prompt(ours_bundle, load_ip_adapter(path), encoder, sample_image(4), weight)

    generator = torch.Generator().manual_seed(11)
    context = int(ours_bundle.unet.config.cross_attention_dim)
    latent = torch.randn((1, 4, 8, 8), generator=generator)
    text = torch.randn((1, TEXT_TOKENS, context), generator=generator)
    timestep = torch.tensor([500])
    image_embeds = prompt.cond_embeds[:, 0]  # [1, E]: the image encoder's projected embedding

    with torch.inference_mode():
        plain = ours_bundle.unet(latent, timestep, encoder_hidden_states=text).sample
        with applied_image_prompt(ours_bundle.unet, prompt):
            ours = ours_bundle.unet(latent, timestep, encoder_hidden_states=text,
                                    added_cond_kwargs=prompt.added(negative=False)).sample

    # The reference UNet: the authors' numbering over diffusers' processor order, odd = cross-attention.
    processors = {}
    for number, name in enumerate(reference_unet.attn_processors):
        if name.endswith("attn2.processor"):
            processors[name] = DecoupledCrossAttention(raw[f"ip_adapter.{number}.to_k_ip.weight"],
                                                       raw[f"ip_adapter.{number}.to_v_ip.weight"], weight)
        else:
            processors[name] = AttnProcessor2_0()
    assert len(processors) == 2 * sum(1 for n in processors if n.endswith("attn2.processor"))
    reference_unet.set_attn_processor(processors)
    with torch.inference_mode():
        context_with_image = torch.cat([text, _image_tokens(raw, image_embeds)], dim=1)
        theirs = reference_unet(latent, timestep, encoder_hidden_states=context_with_image).sample

    difference = ((ours - theirs).abs().max() / theirs.abs().max()).item()
    effect = ((ours - plain).abs().max() / plain.abs().max()).item()
    print(f"weight {weight}: huabi vs the written-out formula {difference:.2e}; image prompt's effect {effect:.2e}")
    assert effect > 1e-2
    assert difference < 1e-5
