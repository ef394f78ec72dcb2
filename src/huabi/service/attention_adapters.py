"""Attention-level adapters for one job: hypernetworks and IP-Adapter.

Both change what the UNet's attention layers read, never its weights, and
both are put in place for a job and taken out afterwards:

* **Hypernetworks** (A1111): each attention layer's ``to_k`` / ``to_v`` is
  wrapped (on the instance, inside :meth:`AttentionAdapters.applied`) by a
  module that first transforms the context with the hypernetwork's module for
  that context width: ``to_k(ctx + mlp_k(ctx) * strength)``.  Several
  hypernetworks chain in order, as A1111's ``apply_hypernetworks`` does.  As in
  A1111 the module is picked by width only, so a hypernetwork with 320/640/1280
  entries also acts on self-attention layers of those widths.
* **IP-Adapter**: the image is encoded once by the CLIP image encoder; the
  cross-attention layers get diffusers' ``IPAdapterAttnProcessor2_0`` with the
  adapter's ``to_k_ip`` / ``to_v_ip``, and the UNet gets the adapter's image
  projection as its ``encoder_hid_proj`` (diffusers' own mechanism: it reads
  ``added_cond_kwargs["image_embeds"]``).  The embeddings ride in the
  conditioning (``UNetInputs.added``), so CFG's concatenation carries the
  image for the conditional rows and the "no image" embedding (zeros for the
  base adapter, the encoding of a black image for plus/full, as diffusers does)
  for the unconditional rows.

On exit the original ``to_k``/``to_v`` modules, attention processors,
``encoder_hid_proj`` and config value are put back: the UNet is exactly as
before (nothing in its weights was touched).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from huabi.core.prompt_parser import extract_extra_networks
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.models.hypernetwork import HYPERNETWORK_SUFFIXES, Hypernetwork, load_hypernetwork
from huabi.models.ip_adapter import (
    IMAGE_ENCODER_SUFFIXES,
    IP_ADAPTER_SUFFIXES,
    ImageEncoder,
    IPAdapterWeights,
    build_image_projection,
    load_image_encoder,
    load_ip_adapter,
)

HYPERNETWORK_FOLDERS = ("hypernetworks",)
# A1111's ControlNet extension keeps IP-Adapter models with the ControlNets; ComfyUI in ipadapter/.
IP_ADAPTER_FOLDERS = ("ipadapter", "ControlNet")
IMAGE_ENCODER_FOLDERS = ("clip_vision",)
IMAGE_EMBEDS_KEY = "image_embeds"  # diffusers' added_cond_kwargs key for encoder_hid_proj


def _attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    from diffusers.models.attention_processor import Attention

    return [(name, module) for name, module in unet.named_modules() if isinstance(module, Attention)]


# ----------------------------------------------------------------------------- hypernetworks


class HypernetworkProjection(nn.Module):
    """``projection(x')`` where ``x'`` is ``x`` passed through each hypernetwork's module for its width."""

    def __init__(self, projection: nn.Module, stages: Sequence[tuple[nn.Module, float]]) -> None:
        super().__init__()
        self.projection = projection
        self.stages = nn.ModuleList([module for module, _ in stages])
        self.strengths = [float(strength) for _, strength in stages]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        hidden = x
        for module, strength in zip(self.stages, self.strengths, strict=True):
            # In float32, as A1111 does (its modules are float32 whatever the UNet's dtype).
            hidden = module(hidden.to(torch.float32), strength)
        return self.projection(hidden.to(dtype))


def attention_context_widths(unet: nn.Module) -> list[int]:
    """The context width of every attention layer (what a hypernetwork entry must match)."""
    return sorted({int(attn.to_k.in_features) for _, attn in _attention_layers(unet)})


def check_hypernetwork_fits(network: Hypernetwork, unet: nn.Module) -> None:
    widths = attention_context_widths(unet)
    if not set(network.widths) & set(widths):
        raise HuabiError(
            f"hypernetwork {network.name}: its widths {', '.join(map(str, network.widths))} match no attention "
            f"layer of this model (context widths {', '.join(map(str, widths))})"
        )


@contextmanager
def applied_hypernetworks(unet: nn.Module, networks: Sequence[tuple[Hypernetwork, float]]) -> Iterator[int]:
    """Wrap ``to_k``/``to_v`` of every attention layer some network fits; yields how many layers changed."""
    replaced: list[tuple[nn.Module, nn.Module, nn.Module]] = []
    try:
        if networks:
            device = next(unet.parameters()).device
            for _, attn in _attention_layers(unet):
                width = int(attn.to_k.in_features)
                stages = [(net.modules[width], strength) for net, strength in networks if width in net.modules]
                if not stages:
                    continue
                for pair in (stage for stage, _ in stages):
                    pair[0].to(device)
                    pair[1].to(device)
                replaced.append((attn, attn.to_k, attn.to_v))
                attn.to_k = HypernetworkProjection(attn.to_k, [(pair[0], s) for pair, s in stages])
                attn.to_v = HypernetworkProjection(attn.to_v, [(pair[1], s) for pair, s in stages])
        yield len(replaced)
    finally:
        for attn, to_k, to_v in reversed(replaced):
            attn.to_k = to_k
            attn.to_v = to_v


# ----------------------------------------------------------------------------- IP-Adapter


@dataclass
class ImagePrompt:
    """An IP-Adapter ready to apply: its modules and the encoded image (cond and "no image")."""

    weights: IPAdapterWeights
    encoder: ImageEncoder
    weight: float
    projection: nn.Module = field(repr=False)
    processors: dict[str, nn.Module] = field(repr=False)  # attention module name -> IP processor
    cond_embeds: torch.Tensor = field(repr=False)  # [1, 1, E] or [1, 1, tokens, H]
    uncond_embeds: torch.Tensor = field(repr=False)

    def added(self, negative: bool) -> dict[str, torch.Tensor]:
        return {IMAGE_EMBEDS_KEY: self.uncond_embeds if negative else self.cond_embeds}


class _SingleAdapterProjection(nn.Module):
    """diffusers' ``MultiIPAdapterImageProjection`` fed one per-row tensor (it wants a list)."""

    def __init__(self, projection: nn.Module) -> None:
        super().__init__()
        from diffusers.models.embeddings import MultiIPAdapterImageProjection

        self.multi = MultiIPAdapterImageProjection([projection])

    def forward(self, image_embeds: torch.Tensor) -> list[torch.Tensor]:
        return self.multi([image_embeds])


def cross_attention_layers(unet: nn.Module) -> list[tuple[str, nn.Module]]:
    """Cross-attention layers in the UNet's attention order (the order IP-Adapter files number them)."""
    return [(name, attn) for name, attn in _attention_layers(unet) if attn.is_cross_attention]


def check_ip_adapter_fits(weights: IPAdapterWeights, unet: nn.Module, family_text: str) -> None:
    context = int(unet.config.cross_attention_dim)
    if weights.context_width != context:
        raise HuabiError(
            f"IP-Adapter {weights.name}: made for {weights.family_text}; this model is {family_text} ({context}-wide)"
        )
    layers = cross_attention_layers(unet)
    if len(layers) != len(weights.layers):
        raise HuabiError(
            f"IP-Adapter {weights.name}: has {len(weights.layers)} attention layers; this model has {len(layers)}"
        )
    for (name, attn), (k, _v) in zip(layers, weights.layers, strict=True):
        if int(k.shape[0]) != int(attn.inner_dim):
            raise HuabiError(f"IP-Adapter {weights.name}: layer {name} is {attn.inner_dim} wide, the adapter's {k.shape[0]}")


def check_encoder_fits(weights: IPAdapterWeights, encoder: ImageEncoder) -> None:
    width = encoder.hidden_width if weights.uses_hidden_states else encoder.embed_width
    what = "hidden states" if weights.uses_hidden_states else "image embeddings"
    if width != weights.image_embed_width:
        raise HuabiError(
            f"IP-Adapter {weights.name}: needs {weights.image_embed_width}-wide {what} but image encoder "
            f"{encoder.name} gives {width}"
        )


def encode_image(encoder: ImageEncoder, image, *, hidden_states: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond, uncond) image features: projected embeddings with zeros as "no image", or the
    penultimate hidden states with a black image's as "no image" (diffusers' choice for each)."""
    model = encoder.model
    parameter = next(model.parameters())
    pixels = encoder.processor(images=image, return_tensors="pt").pixel_values.to(parameter.device, parameter.dtype)
    with torch.inference_mode():
        if hidden_states:
            cond = model(pixels, output_hidden_states=True).hidden_states[-2]
            uncond = model(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            cond = model(pixels).image_embeds
            uncond = torch.zeros_like(cond)
    # One image per adapter: [1, 1, ...] (batch, images per adapter, features).
    return cond.unsqueeze(1).float().clone(), uncond.unsqueeze(1).float().clone()


def prepare_image_prompt(
    bundle: ModelBundle, weights: IPAdapterWeights, encoder: ImageEncoder, image, weight: float
) -> ImagePrompt:
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0

    check_ip_adapter_fits(weights, bundle.unet, _family_text(bundle))
    check_encoder_fits(weights, encoder)
    parameter = next(bundle.unet.parameters())
    projection = build_image_projection(weights, bundle.unet).to(parameter.device, parameter.dtype)
    processors: dict[str, nn.Module] = {}
    for (name, attn), (k, v) in zip(cross_attention_layers(bundle.unet), weights.layers, strict=True):
        processor = IPAdapterAttnProcessor2_0(
            hidden_size=int(attn.inner_dim), cross_attention_dim=weights.context_width,
            num_tokens=(weights.num_tokens,), scale=float(weight),
        )
        processor.load_state_dict({"to_k_ip.0.weight": k.to(torch.float32), "to_v_ip.0.weight": v.to(torch.float32)})
        processors[name] = processor.to(parameter.device, parameter.dtype).eval().requires_grad_(False)
    cond, uncond = encode_image(encoder, image, hidden_states=weights.uses_hidden_states)
    return ImagePrompt(weights, encoder, float(weight), projection, processors, cond, uncond)


@contextmanager
def applied_image_prompt(unet: nn.Module, prompt: ImagePrompt) -> Iterator[None]:
    """Install the adapter's processors and image projection on ``unet``; restore them on exit."""
    layers = dict(cross_attention_layers(unet))
    saved_processors = {name: layers[name].processor for name in prompt.processors}
    saved_proj = unet.encoder_hid_proj
    saved_type = unet.config.encoder_hid_dim_type
    try:
        for name, processor in prompt.processors.items():
            layers[name].set_processor(processor)
        unet.encoder_hid_proj = _SingleAdapterProjection(prompt.projection)
        # Instance-level config value diffusers' own loader sets; read by process_encoder_hidden_states.
        unet.config.encoder_hid_dim_type = "ip_image_proj"
        yield
    finally:
        unet.config.encoder_hid_dim_type = saved_type
        unet.encoder_hid_proj = saved_proj
        for name, processor in saved_processors.items():
            layers[name].set_processor(processor)


def _family_text(bundle: ModelBundle) -> str:
    return {"sd1": "SD 1.x", "sd2": "SD 2.x", "sdxl": "SDXL", "sdxl_refiner": "the SDXL refiner",
            "huabi_mini": "huabi-mini"}.get(bundle.family.value, bundle.family.value)


# ----------------------------------------------------------------------------- finding files


def find_adapter_file(ref: str, models_dir: Path, folders: Sequence[str], suffixes: Sequence[str], what: str,
                      *, folders_too: bool = False) -> Path:
    """A path, or a file (or folder) named ``ref`` (with or without suffix) in the models sub-folders."""
    path = Path(ref).expanduser()
    if path.exists() and (path.is_file() or folders_too):
        return path
    searched = [models_dir / folder for folder in folders]
    for folder in searched:
        if not folder.is_dir():
            continue
        for candidate in sorted(folder.rglob("*")):
            if candidate.name.startswith("."):
                continue
            if candidate.is_file() and candidate.suffix.lower() in suffixes and ref in (candidate.stem, candidate.name):
                return candidate
            if folders_too and candidate.is_dir() and candidate.name == ref and (candidate / "config.json").is_file():
                return candidate
    raise HuabiError(f"{what} {ref}: no such file, and none of that name in {', '.join(str(f) for f in searched)}")


def _encoder_candidates(models_dir: Path) -> list[Path]:
    found: list[Path] = []
    for folder in IMAGE_ENCODER_FOLDERS:
        root = models_dir / folder
        if not root.is_dir():
            continue
        for candidate in sorted(root.iterdir()):
            if candidate.name.startswith("."):
                continue
            if candidate.is_dir() and (candidate / "config.json").is_file():
                found.append(candidate)
            elif candidate.is_file() and candidate.suffix.lower() in IMAGE_ENCODER_SUFFIXES:
                found.append(candidate)
    return found


def _encoder_widths(path: Path) -> tuple[int, int] | None:
    """(projection width, hidden width) read cheaply from a config or a safetensors header."""
    try:
        if path.is_dir():
            config = json.loads((path / "config.json").read_text(encoding="utf-8"))
            config = config.get("vision_config", config)
            return int(config["projection_dim"]), int(config["hidden_size"])
        if path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as handle:
                projection = handle.get_slice("visual_projection.weight").get_shape()
            return int(projection[0]), int(projection[1])
    except Exception:  # noqa: BLE001 - an unreadable candidate is skipped, never fatal to the choice
        return None
    return None


def find_image_encoder(ref: str | None, weights: IPAdapterWeights, models_dir: Path) -> Path:
    """The named encoder, or the first one in ``clip_vision/`` whose width fits the adapter."""
    if ref is not None:
        return find_adapter_file(ref, models_dir, IMAGE_ENCODER_FOLDERS, IMAGE_ENCODER_SUFFIXES, "image encoder",
                                 folders_too=True)
    candidates = _encoder_candidates(models_dir)
    index = 1 if weights.uses_hidden_states else 0
    for candidate in candidates:
        widths = _encoder_widths(candidate)
        if widths is not None and widths[index] == weights.image_embed_width:
            return candidate
    raise HuabiError(
        f"IP-Adapter {weights.name}: no image encoder in {models_dir / IMAGE_ENCODER_FOLDERS[0]} gives the "
        f"{weights.image_embed_width}-wide features it needs; add one or pass --ip-image-encoder"
    )


# ----------------------------------------------------------------------------- one job


@dataclass
class AttentionAdapters:
    """Everything attention-level a request asked for, loaded and checked against the model."""

    hypernetworks: tuple[tuple[Hypernetwork, float], ...] = ()
    image_prompt: ImagePrompt | None = None

    @property
    def active(self) -> bool:
        return bool(self.hypernetworks) or self.image_prompt is not None

    @contextmanager
    def applied(self, bundle: ModelBundle) -> Iterator[ModelBundle]:
        """Put the adapters on ``bundle``'s UNet; yields the bundle pipelines should use."""
        if not self.active:
            yield bundle
            return
        with applied_hypernetworks(bundle.unet, self.hypernetworks):
            if self.image_prompt is None:
                yield bundle
                return
            with applied_image_prompt(bundle.unet, self.image_prompt):
                yield dataclasses.replace(bundle, extra_unet_added=self.image_prompt.added)

    def infotext(self, request: GenerationRequest) -> dict[str, object]:
        """Hypernet keys as A1111 wrote them for its hypernetwork setting (prompt tags stay in the
        prompt, as A1111 records them); huabi's IP-Adapter keys.  Keys of an adapter that is off are
        None, so stale copies from a ``--from`` image are not written again."""
        keys: dict[str, object] = {
            "Hypernet": None, "Hypernet hash": None, "Hypernet strength": None,
            "IP-Adapter": None, "IP-Adapter hash": None, "IP-Adapter image": None,
            "IP-Adapter weight": None, "IP-Adapter encoder": None,
        }
        if request.hypernetwork is not None and self.hypernetworks:
            network, strength = self.hypernetworks[0]  # the setting's network comes first
            keys.update({"Hypernet": network.name, "Hypernet hash": network.short_hash,
                         "Hypernet strength": float(strength)})
        prompt = self.image_prompt
        if prompt is not None:
            keys.update({
                "IP-Adapter": prompt.weights.name, "IP-Adapter hash": prompt.weights.short_hash,
                # Absolute, so --from finds the image from any folder.
                "IP-Adapter image": str(Path(request.ip_image).expanduser().resolve()),
                "IP-Adapter weight": float(prompt.weight),
                "IP-Adapter encoder": prompt.encoder.name,
            })
        return keys


def hypernetwork_uses(request: GenerationRequest) -> list[tuple[str, float]]:
    """(name, strength) of the request's hypernetwork setting, then of its ``<hypernet:...>`` prompt tags."""
    uses: list[tuple[str, float]] = []
    if request.hypernetwork is not None:
        uses.append((request.hypernetwork, float(request.hypernetwork_strength)))
    _text, tags = extract_extra_networks(request.prompt)
    for tag in tags:
        if tag.kind == "hypernet":
            uses.append((tag.name, tag.weights[0] if tag.weights else 1.0))
    return uses


def prepare_attention_adapters(
    request: GenerationRequest,
    bundle: ModelBundle,
    *,
    models_dir: Path,
    load_image: Callable[[str], object],
) -> AttentionAdapters:
    """Load and check the hypernetworks and IP-Adapter ``request`` uses (nothing is applied yet)."""
    networks: list[tuple[Hypernetwork, float]] = []
    loaded: dict[Path, Hypernetwork] = {}
    for name, strength in hypernetwork_uses(request):
        path = find_adapter_file(name, models_dir, HYPERNETWORK_FOLDERS, HYPERNETWORK_SUFFIXES, "hypernetwork")
        if path not in loaded:
            loaded[path] = load_hypernetwork(path)
            check_hypernetwork_fits(loaded[path], bundle.unet)
        networks.append((loaded[path], strength))
    image_prompt = None
    if request.ip_adapter is not None:
        path = find_adapter_file(request.ip_adapter, models_dir, IP_ADAPTER_FOLDERS, IP_ADAPTER_SUFFIXES, "IP-Adapter")
        weights = load_ip_adapter(path)
        check_ip_adapter_fits(weights, bundle.unet, _family_text(bundle))
        encoder_path = find_image_encoder(request.ip_image_encoder, weights, models_dir)
        parameter = next(bundle.unet.parameters())
        encoder = load_image_encoder(encoder_path, device=parameter.device, dtype=parameter.dtype)
        image = load_image(request.ip_image)
        image_prompt = prepare_image_prompt(bundle, weights, encoder, image, request.ip_weight)
    return AttentionAdapters(tuple(networks), image_prompt)
