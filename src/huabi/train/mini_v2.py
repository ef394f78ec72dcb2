"""The huabi-mini v2 recipe: warm-started from the shipped v1 model, compute spent on the UNet.

Why warm start, and why only the UNet is trained (measured, see docs/training.md):

* the v1 VAE is not what loses identity (100 emoji through the VAE alone are still
  retrieved as themselves 93% of the time); its encoder defines the latent space the v1
  UNet already learned, so it is kept as it is;
* the v1 text encoder is kept frozen: its per-token states (what the UNet attends to)
  already tell the dataset's names apart, and it is also the text tower of the CLIP pair
  that judges faithfulness, so v1 and v2 are measured by the same judge;
* the UNet gets cross-attention at the 8x8 level too (v1: 4x4 + mid only). The new
  attention blocks start as exact identities (their output projection is zero), so step 0
  of v2 *is* v1, and every step after it is spent improving on 9,000 steps already paid.

Stages (each skipped once its ``done.json`` exists; the UNet can be extended with
``--steps unet=N``; the LR is constant after warm-up, so an extension continues the
same curve)::

    base    copy the v1 files (checked by SHA-256) into the state dir: the warm-start source
    cache   v1 VAE latent means of every image (with v1's scaling factor) + v1 text states
    unet    the v2 UNet from the warm start: eps, caption dropout, Min-SNR, EMA, bf16 autocast
    export  huabi-mini.safetensors (v1 VAE + text encoder, v2 UNet) and the unchanged CLIP pair

v3 (``MINI_V3``, ``--recipe v3``; measured, not shipped: docs/training.md) narrows the world instead: v2's UNet
(``--init-unet``, its ``unet/final.pt``) continued on the 3,655 emoji alone, a folder built by
``huabi data build --sources emoji`` (the same bytes as the emoji of the full set). Measured
(docs/training.md, "Memorisation vs number of items"): at ~50 exposures per item this UNet's
recall falls ~33 points per 10x items, so 9,219 items are beyond its capacity while the emoji
world is not. Nothing else changes: v1's VAE and text encoder, the v2 layout, same loss.

v4 (``MINI_V4``, ``--recipe v4``) is v3's world on the latents of a new VAE (``--init-vae``, required):
v1's VAE has one channel per GroupNorm group at its 32-wide level, an instance norm that drops what a
flat region's colour is, and it keeps 8% of green hues and 1% of purple; the same VAE with 8 groups
(``scripts/vae_probe.py --norm-groups 8``, kept in the repository as ``training/huabi-mini-v4-vae.pt``)
is the one v4 encodes with (docs/training.md, "Why green never renders green"). Its UNet warm-starts
from v1 as v2's did (a new latent space has to be re-learned whatever the start), or continues
``--init-unet`` weights when given (e.g. v3's ``unet/final.pt``).

v4-long (``MINI_V4_LONG``, ``--recipe v4-long``) continues a trained v4 UNet (``--init-unet``, required: a
state's ``unet/final.pt`` or a v4 checkpoint such as a shipped ``huabi-mini.safetensors``) on v4's world with
a fresh data order: how a later machine adds steps to the shipped v4 when its training state is gone. The
optimizer restarts (moments from zero, the recipe's short warm-up); the EMA starts from the given weights.

``centre_latents`` (``--recipe centred``) trains on per-channel centred latents: v1's latents
scaled by its one factor have variance 1 overall but per-channel means of
-1.11/-0.47/-1.74/+0.81 (mostly the white background), so what differs between items has only
0.112 of the variance the noise schedule assumes (docs/training.md, "v2 diagnosis"). The UNet
trains on ``(z - mean_c) / std_c`` (statistics of the cached latents, saved with the UNet
state) and the export folds that shift and scale into v1's 1x1 ``quant_conv`` /
``post_quant_conv`` (:func:`centred_vae`: exact, same file layout, scaling factor 1). Measured
flat against plain latents in an A/B (docs/training.md, "Centred latents, measured"), so no
shipped recipe uses it.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from huabi.data.build import read_metadata
from huabi.data.emoji_source import record_is_skin_tone_variant
from huabi.errors import HuabiError
from huabi.models.convert import state_dict_mismatch
from huabi.models.files import atomic_copy
from huabi.models.hashes import sha256_file
from huabi.train.cache import build_cache, load_cache
from huabi.train.common import atomic_write_text, config_dict, ema_weights, load_torch_file
from huabi.train.data import default_tokenizer
from huabi.train.recipe import RecipeRun, caption_token_ids, done_summary, is_done, refresh_repo_log, training_images
from huabi.train.unet import UNetModelConfig, UNetTrainConfig, train_unet

V2_STAGES = ("base", "cache", "unet", "export")
DEFAULT_V2_STATE_DIR = Path.home() / ".cache" / "huabi" / "train" / "huabi-mini-v2"

# The shipped v1 files (commit 8a20066) the v2 recipe starts from.
V1_MODEL_SHA256 = "0d3e119d846881e0bebbcb90fcc54f4d9f67247ea561f37ebc03faf24984bb56"
V1_CLIP_SHA256 = "09da6c4cc2e204035800b44858aca2bb1e7c272cd5dad74143cb20517f5771aa"
V1_COMMIT = "8a20066"


@dataclass(frozen=True)
class MiniV2Recipe:
    """Every number that defines huabi-mini v2 beyond the v1 files it starts from."""

    size_px: int = 128
    # v1's UNet plus cross-attention at 8x8: +1.19 M params; batch-8 inference step 55 -> 70 ms
    # on 2 idle cores (fp32), inside the 3 s budget for 4 images x 20 steps.
    unet_model: UNetModelConfig = UNetModelConfig(attention_levels=(False, True, True))
    # precision auto: bf16 where the CPU runs it natively and faster (a batch-32 step 0.76 s fp32 vs
    # 0.59 s bf16 on a Zen 4 with avx512_bf16), fp32 where bf16 would be emulated (AVX2-only CPUs)
    unet: UNetTrainConfig = UNetTrainConfig(
        steps=6000, batch_size=32, lr=1.5e-4, warmup_steps=100, lr_schedule="constant", precision="auto",
        ema_decay=0.999, seed=20261206,
    )
    cache_batch_size: int = 64
    name: str = "v2"  # what ``--recipe`` calls it; written into the export's metadata
    # train on per-channel centred latents; the export folds the shift/scale into the VAE
    centre_latents: bool = False
    # the data sources the folder must hold exactly (metadata.jsonl of ``huabi data build``); () = any
    sources: tuple[str, ...] = ()
    # False: the folder must hold no skin-tone variants of emoji (huabi data build --no-skin-tones)
    skin_tone_variants: bool = True
    # the UNet stage continues given weights (``--init-unet``) instead of warm-starting from v1
    needs_init_unet: bool = False
    # the cache stage encodes with a given VAE (``--init-vae``) instead of v1's
    needs_init_vae: bool = False
    model_sha256: str = V1_MODEL_SHA256  # "" skips the check (tests warm-start from tiny models)
    clip_sha256: str = V1_CLIP_SHA256

    def with_overrides(self, **stage_fields: dict) -> "MiniV2Recipe":
        changes = {}
        for name, fields in stage_fields.items():
            if name not in ("unet", "unet_model"):
                raise HuabiError(f"the v2 recipe trains only the UNet; cannot override {name!r}")
            changes[name] = dataclasses.replace(getattr(self, name), **fields)
        return dataclasses.replace(self, **changes)


# v3: v2's UNet continued on the emoji world (~78 exposures per emoji in
# 9,000 steps of 32); the short EMA window (~200 steps) suits a fine-tune that adapts fast.
MINI_V3 = MiniV2Recipe(
    name="v3",
    sources=("emoji",),
    needs_init_unet=True,
    unet=dataclasses.replace(MiniV2Recipe().unet, steps=9000, ema_decay=0.995, seed=20261207),
)
# centred latents, a long cosine run (~2 h sittings of ~8,000 steps on 2 free Zen 4 cores)
MINI_CENTRED = MiniV2Recipe(
    name="centred",
    centre_latents=True,
    unet=UNetTrainConfig(
        steps=30000, batch_size=32, lr=1.5e-4, warmup_steps=100, lr_schedule="cosine", min_lr_ratio=0.1,
        precision="auto", ema_decay=0.999, seed=20261208,
    ),
)
# v4: v3's world on the latents of a new VAE (--init-vae) whose GroupNorms see 4 channels per
# group at its 32-wide level: v1's VAE (one channel per group there, an instance norm) loses green
# and purple (docs/training.md). The UNet warm-starts from v1 unless --init-unet is given.
# It trains on the 1,870 emoji without their 1,785 skin-tone variants (near-duplicates that each took
# a share of the UNet; measured: recall falls ~33 points per 10x items at equal exposures), so each
# emoji gets ~154 exposures in 9,000 steps of 32 instead of ~79.
MINI_V4 = dataclasses.replace(
    MINI_V3, name="v4", needs_init_unet=False, needs_init_vae=True, skin_tone_variants=False,
    unet=dataclasses.replace(MINI_V3.unet, seed=20261209),
)
# v4-long: a trained v4 UNet (--init-unet) continued on the same world, with a new data order and noise draws
MINI_V4_LONG = dataclasses.replace(
    MINI_V4, name="v4-long", needs_init_unet=True, unet=dataclasses.replace(MINI_V4.unet, seed=20261210),
)
RECIPES = {recipe.name: recipe for recipe in (MiniV2Recipe(), MINI_V3, MINI_V4, MINI_V4_LONG, MINI_CENTRED)}


def channel_stats(latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and std of latents [N, C, h, w] (sums in float64)."""
    flat = latents.double().transpose(0, 1).reshape(latents.shape[1], -1)
    return flat.mean(dim=1).float(), flat.std(dim=1).float()


def centred_cache(cache, mean: torch.Tensor, std: torch.Tensor):
    """``cache`` with latents ``(z - mean_c) / std_c`` and scaling factor 1 (text unchanged)."""
    latents = (cache.latents - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
    return dataclasses.replace(cache, latents=latents, scaling_factor=1.0)


def centred_vae(vae, mean: torch.Tensor, std: torch.Tensor):
    """A copy of ``vae`` whose latents are ``(z - mean_c) / std_c`` per channel and which decodes
    them to the same pixels: the shift and scale folded into the 1x1 ``quant_conv`` (mean and
    log-variance rows) and ``post_quant_conv`` (its input channels); scaling factor 1. An exact
    reparametrisation in the same file layout."""
    import copy

    vae = copy.deepcopy(vae)
    channels = mean.numel()
    with torch.no_grad():
        q = vae.quant_conv
        q.weight[:channels] /= std.view(-1, 1, 1, 1)
        q.bias[:channels] = (q.bias[:channels] - mean) / std
        q.bias[channels:] -= 2 * torch.log(std)  # log-variance of z / std
        p = vae.post_quant_conv
        p.bias += (p.weight[:, :, 0, 0] * mean.view(1, -1)).sum(dim=1)
        p.weight *= std.view(1, -1, 1, 1)
    vae.register_to_config(scaling_factor=1.0)
    return vae


def _stats_path(run: RecipeRun) -> Path:
    return run.state_dir / "unet" / "latent_stats.json"


def latent_stats(run: RecipeRun, cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The centring statistics of this run: computed from the cache once, then read back, so a
    resumed run and the export use exactly the numbers the UNet was trained with."""
    path = _stats_path(run)
    if path.exists():
        stored = json.loads(path.read_text(encoding="utf-8"))
        return torch.tensor(stored["mean"], dtype=torch.float32), torch.tensor(stored["std"], dtype=torch.float32)
    if cache is None:
        raise HuabiError(f"{path} is missing: the centred UNet stage has not started in {run.state_dir}")
    mean, std = channel_stats(cache.latents)
    atomic_write_text(path, json.dumps({"mean": mean.tolist(), "std": std.tolist()}))
    return torch.tensor(mean.tolist()), torch.tensor(std.tolist())  # as the JSON round trip gives them


def _base_paths(run: RecipeRun) -> tuple[Path, Path]:
    return run.state_dir / "base" / "huabi-mini-v1.safetensors", run.state_dir / "base" / "huabi-mini-v1-clip.safetensors"


def _mark_done(run: RecipeRun, stage: str, summary: dict) -> None:
    atomic_write_text(run.state_dir / stage / "done.json", json.dumps(summary, indent=1))
    run.log(f"[{stage}] done: {json.dumps(summary)}")
    refresh_repo_log(run)


def load_base(run: RecipeRun):
    """The v1 model (a ``ModelBundle``, fp32, CPU) copied by the base stage."""
    from huabi.models.load import load_model

    model_path, _ = _base_paths(run)
    if not is_done(run.state_dir, "base"):
        raise HuabiError(f"stage 'base' has not finished in {run.state_dir}; run it first (--stage base)")
    return load_model(model_path, compute_hash=False)


# ---------------------------------------------------------------- stages


def stage_base(run: RecipeRun, recipe: MiniV2Recipe, base_model: Path, base_clip: Path) -> None:
    """Copy the v1 files into the state dir so later stages never depend on the repo's (replaced) files."""
    model_dst, clip_dst = _base_paths(run)
    model_dst.parent.mkdir(parents=True, exist_ok=True)
    for source, expected, dst in ((Path(base_model), recipe.model_sha256, model_dst), (Path(base_clip), recipe.clip_sha256, clip_dst)):
        if not source.is_file():
            raise HuabiError(f"warm-start file {source} is missing (huabi-mini v1, commit {V1_COMMIT})")
        digest = sha256_file(source)
        if expected and digest != expected:
            raise HuabiError(
                f"{source.name} is not huabi-mini v1 (sha256 {digest[:12]}, expected {expected[:12]}); "
                f"get v1 with: git show {V1_COMMIT}:src/huabi/assets/models/{source.name} > FILE, then --base-model FILE"
            )
        atomic_copy(source, dst)
    _mark_done(run, "base", {"model": str(base_model), "clip": str(base_clip), "model_sha256": sha256_file(model_dst)})


def check_sources(data_dir: Path, sources: Sequence[str], skin_tone_variants: bool = True) -> None:
    """Refuse a folder whose items (``metadata.jsonl`` of ``huabi data build``) are not exactly ``sources``
    (and, with ``skin_tone_variants=False``, one that holds skin-tone variants of emoji)."""
    wanted = " --sources " + ",".join(sources) + ("" if skin_tone_variants else " --no-skin-tones")
    if not (Path(data_dir) / "metadata.jsonl").is_file():
        raise HuabiError(f"{data_dir} has no metadata.jsonl; this recipe trains on a folder built by huabi data build{wanted}")
    records = read_metadata(data_dir)
    found = {record.get("source") for record in records}
    if found != set(sources):
        raise HuabiError(
            f"{data_dir} holds sources {', '.join(sorted(map(str, found))) or 'none'}, this recipe trains on "
            f"{', '.join(sources)} only: build that folder with huabi data build{wanted} --out DIR"
        )
    variants = 0 if skin_tone_variants else sum(map(record_is_skin_tone_variant, records))
    if variants:
        raise HuabiError(
            f"{data_dir} holds {variants} skin-tone variants of emoji, this recipe trains without them: "
            f"build a new folder with huabi data build{wanted} --out DIR"
        )


def _init_vae_path(run: RecipeRun) -> Path:
    return run.state_dir / "cache" / "init-vae.pt"


def _checked_init_vae(path: Path, recipe: MiniV2Recipe):
    from huabi.train.vae import vae_from_record

    vae = vae_from_record(load_torch_file(Path(path), what="--init-vae VAE weights"))
    channels, expected = int(vae.config.latent_channels), int(recipe.unet_model.latent_channels)
    if channels != expected:
        raise HuabiError(f"--init-vae {path}: its latents have {channels} channels, the UNet layout takes {expected}")
    return vae


def run_vae(run: RecipeRun, base):
    """The VAE this run encodes and exports with: the ``--init-vae`` copy its cache stage took (with
    the cache's scaling factor), else ``base``'s (v1's)."""
    path = _init_vae_path(run)
    if not path.exists():
        return base.vae
    from huabi.train.vae import vae_from_record

    vae = vae_from_record(load_torch_file(path, what="the cache stage's VAE"))
    vae.register_to_config(scaling_factor=float(done_summary(run.state_dir, "cache")["scaling_factor"]))
    return vae


def stage_cache(run: RecipeRun, recipe: MiniV2Recipe, init_vae: Path | None = None) -> None:
    if recipe.sources:
        check_sources(run.data_dir, recipe.sources, recipe.skin_tone_variants)
    if init_vae is None and recipe.needs_init_vae:
        raise HuabiError(f"recipe {recipe.name} encodes with a new VAE: pass --init-vae FILE (a VAE stage's final.pt)")
    vae = _checked_init_vae(init_vae, recipe) if init_vae is not None else None
    images = training_images(run, recipe)
    token_ids = caption_token_ids(run, images, default_tokenizer())
    started = time.time()
    base = load_base(run)
    if vae is None:
        # the warm-started UNet learned latents scaled by v1's factor: keep it, do not re-estimate
        vae, scaling = base.vae, float(base.vae.config.scaling_factor)
    else:
        # a new latent space: its own scale (1 / std of its latents), and a copy kept for the export
        scaling = None
        atomic_copy(Path(init_vae), _init_vae_path(run))
    vae_id = {"vae": str(Path(init_vae).resolve()), "vae_sha256": sha256_file(Path(init_vae))} if init_vae is not None else {"vae": "v1"}
    cache = build_cache(
        vae.to(run.device), base.text_encoders[0].to(run.device), images, token_ids, run.state_dir / "cache",
        batch_size=recipe.cache_batch_size, device=run.device, log=run.log, scaling_factor=scaling,
    )
    _mark_done(run, "cache", {"scaling_factor": cache.scaling_factor, "latents": len(cache), "captions": int(cache.text.shape[0]),
                              **vae_id, "wall_s": round(time.time() - started)})


def warm_start_unet(model_config: UNetModelConfig, base_unet: torch.nn.Module, *, seed: int = 0) -> torch.nn.Module:
    """``model_config``'s UNet holding ``base_unet``'s weights; blocks the base lacks start as identities.

    Only whole attention blocks (``*.attentions.N.*``) may be new: their ``proj_out`` is zeroed,
    so a Transformer2DModel returns its input and the new UNet computes exactly what the base did.
    """
    unet = model_config.build(seed=seed)
    ours, theirs = unet.state_dict(), base_unet.state_dict()
    for key, value in theirs.items():
        if key in ours and ours[key].shape != value.shape:
            raise HuabiError(f"the v2 layout changes the shape of {key} ({list(value.shape)} -> {list(ours[key].shape)}); cannot warm-start")
    missing, unexpected = unet.load_state_dict(theirs, strict=False)
    if unexpected:
        raise HuabiError(f"the base UNet has weights the v2 layout lacks (e.g. {unexpected[0]}); cannot warm-start")
    blocks = set()
    for key in missing:
        parts = key.split(".")
        if "attentions" not in parts:
            raise HuabiError(f"the v2 layout adds {key}, which is not part of a new attention block; cannot warm-start")
        blocks.add(".".join(parts[: parts.index("attentions") + 2]))
    modules = dict(unet.named_modules())
    with torch.no_grad():
        for name in sorted(blocks):
            proj_out = modules[name].proj_out
            proj_out.weight.zero_()
            if proj_out.bias is not None:
                proj_out.bias.zero_()
    return unet


def stage_unet(run: RecipeRun, recipe: MiniV2Recipe, init_unet: Path | None = None) -> None:
    if not is_done(run.state_dir, "cache"):
        raise HuabiError(f"stage 'cache' has not finished in {run.state_dir}; run it first (--stage cache)")
    cache = load_cache(run.state_dir / "cache")
    started = time.time()
    if recipe.centre_latents:
        mean, std = latent_stats(run, cache)
        cache = centred_cache(cache, mean, std)
        run.log(f"[unet] centred latents: per-channel mean {[round(float(x), 4) for x in mean]}, std {[round(float(x), 4) for x in std]}")
    if init_unet is None and recipe.needs_init_unet:
        raise HuabiError(f"recipe {recipe.name} continues a trained UNet: pass --init-unet FILE (for v3, v2's unet/final.pt)")
    if init_unet is not None:
        unet = recipe.unet_model.build(seed=recipe.unet.seed)
        load_init_unet(unet, Path(init_unet))
        source = f"initial weights from {init_unet}"
    else:
        unet = warm_start_unet(recipe.unet_model, load_base(run).unet, seed=recipe.unet.seed)
        source = "warm start from v1"
    if not _unet_init_path(run).exists():  # what the first session started from; a resume continues its state
        atomic_write_text(_unet_init_path(run), json.dumps({"init": str(init_unet) if init_unet is not None else "v1"}))
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    run.log(f"[unet] {len(cache)} latents {list(cache.latents.shape[1:])}, scaling factor {cache.scaling_factor:.5f}; UNet {params:.2f}M params ({source}); {recipe.unet}")
    unet, ema = train_unet(recipe.unet, cache, model_config=recipe.unet_model, unet=unet, state_path=run.state_dir / "unet" / "state.pt", device=run.device, log=run.log, should_stop=run.should_stop)
    if ema is not None:
        ema.copy_to(unet)
    from huabi.train.common import atomic_torch_save

    atomic_torch_save({"model_config": config_dict(recipe.unet_model), "state_dict": unet.state_dict()}, run.state_dir / "unet" / "final.pt")
    _mark_done(run, "unet", {"steps": recipe.unet.steps, "ema": ema is not None, "wall_s_this_session": round(time.time() - started)})


def load_init_unet(unet, path: Path) -> None:
    """Load ``--init-unet`` weights into ``unet``: a torch file with ``state_dict`` (a state's
    ``unet/final.pt``) or a huabi-mini checkpoint (``.safetensors``, e.g. the shipped model; its UNet).
    A layout that differs from ``unet``'s is refused in one line."""
    if path.suffix == ".safetensors":
        from huabi.models.load import load_model

        if not path.is_file():
            raise HuabiError(f"--init-unet checkpoint {path} does not exist")
        weights = {k: v.float() for k, v in load_model(path, compute_hash=False).unet.state_dict().items()}
    else:
        weights = load_torch_file(path, what="--init-unet UNet weights")["state_dict"]
    problem = state_dict_mismatch(unet.state_dict(), weights)
    if problem:
        raise HuabiError(f"--init-unet {path} does not hold this recipe's UNet layout: {problem}")
    unet.load_state_dict(weights)


def _unet_weights(run: RecipeRun, recipe: MiniV2Recipe, *, snapshot: bool) -> tuple[dict, str]:
    if not snapshot:
        final = load_torch_file(run.state_dir / "unet" / "final.pt", what="v2 UNet weights")
        return final["state_dict"], f"{recipe.unet.steps}/{recipe.unet.steps}"
    state = load_torch_file(run.state_dir / "unet" / "state.pt", what="v2 UNet training state")
    weights = state["modules"]["unet"]
    if state.get("ema") is not None:
        weights = ema_weights(weights, state["ema"]["shadow"])
    return weights, f"{int(state['step'])}/{int(state['config']['steps'])}"


def mini_parts(base, recipe: MiniV2Recipe, unet_weights: dict, stats: tuple[torch.Tensor, torch.Tensor] | None = None, *, vae=None):
    """The ``ModelParts`` of a huabi-mini file: ``base``'s (v1's) text encoder, ``vae`` (default
    ``base``'s) and a UNet of ``recipe``'s layout holding ``unet_weights``; ``stats`` (per-channel
    mean, std) centre the VAE."""
    from huabi.models.family import ModelFamily
    from huabi.models.save import ModelParts

    unet = recipe.unet_model.build()
    unet.load_state_dict(unet_weights)
    vae = vae if vae is not None else base.vae
    return ModelParts(
        family=ModelFamily.HUABI_MINI,
        unet=unet.eval(),
        vae=centred_vae(vae, *stats) if stats is not None else vae,
        text_encoders=list(base.text_encoders),
        prediction=base.prediction,
        native_size_px=recipe.size_px,
        alphas_cumprod=base.alphas_cumprod,
    )


def _unet_init_path(run: RecipeRun) -> Path:
    return run.state_dir / "unet" / "init.json"


def _unet_continued(run: RecipeRun) -> bool:
    """Whether the UNet stage started from ``--init-unet`` weights rather than v1's (also mid-run, for snapshots)."""
    path = _unet_init_path(run)
    return path.exists() and json.loads(path.read_text(encoding="utf-8"))["init"] != "v1"


def write_v2_export(run: RecipeRun, recipe: MiniV2Recipe, *, snapshot: bool = False) -> dict:
    """v1's VAE and text encoder with the v2 UNet, fp16 single file; the CLIP pair copied unchanged."""
    from huabi.models.save import save_single_file

    weights, step = _unet_weights(run, recipe, snapshot=snapshot)
    base = load_base(run)
    parts = mini_parts(base, recipe, weights, latent_stats(run, None) if recipe.centre_latents else None, vae=run_vae(run, base))
    metadata = {
        "huabi.recipe": json.dumps({recipe.name: config_dict(recipe), "warm_start": f"huabi-mini v1 ({V1_COMMIT})" + ("; UNet continued from --init-unet" if _unet_continued(run) else "") + ("; VAE from --init-vae" if _init_vae_path(run).exists() else "")}, default=str),
        "huabi.trained_by": "huabi.train mini-v2" + (f" --recipe {recipe.name}" if recipe.name != "v2" else ""),
        "huabi.unet_step": step,
        "modelspec.architecture": "huabi-mini",
        "modelspec.resolution": f"{recipe.size_px}x{recipe.size_px}",
    }
    path = save_single_file(parts, run.out_path, dtype=torch.float16, metadata=metadata)
    _, base_clip = _base_paths(run)
    if run.clip_out_path.resolve() != base_clip.resolve():
        atomic_copy(base_clip, run.clip_out_path)
    summary = {"out": str(path), "size_mb": round(path.stat().st_size / 1e6, 2), "clip_out": str(run.clip_out_path), "unet_step": step}
    if snapshot:
        run.log(f"[snapshot] v2 UNet step {step} (EMA) exported: {json.dumps(summary)}")
        refresh_repo_log(run)
    return summary


def _reopen_extended_unet(run: RecipeRun, recipe: MiniV2Recipe) -> None:
    done_path = run.state_dir / "unet" / "done.json"
    if not done_path.exists():
        return
    finished_at = int(done_summary(run.state_dir, "unet").get("steps", recipe.unet.steps))
    if finished_at >= recipe.unet.steps:
        return
    if not (run.state_dir / "unet" / "state.pt").exists():
        raise HuabiError(f"stage 'unet' finished at {finished_at} steps but its state.pt is gone; cannot extend it to {recipe.unet.steps}")
    run.log(f"[unet] finished at {finished_at} steps; extending to {recipe.unet.steps}")
    done_path.unlink()
    (run.state_dir / "export" / "done.json").unlink(missing_ok=True)


def run_v2(
    run: RecipeRun,
    recipe: MiniV2Recipe = MiniV2Recipe(),
    stages: Sequence[str] = V2_STAGES,
    *,
    base_model: Path | None = None,
    base_clip: Path | None = None,
    force_export: bool = False,
    init_unet: Path | None = None,
    init_vae: Path | None = None,
) -> None:
    """Run ``stages`` in order, skipping finished ones. ``base_*`` default to the repo's shipped files;
    ``init_vae`` (a VAE training record, e.g. a ``huabi.train mini --stage vae`` run's ``vae/final.pt``)
    replaces v1's VAE from the cache stage on."""
    from huabi.train.recipe import clip_out_path_for, default_out_path

    for stage in stages:
        if stage not in V2_STAGES:
            raise HuabiError(f"unknown stage {stage!r}; choose from {', '.join(V2_STAGES)} or all")
    base_model = Path(base_model) if base_model is not None else default_out_path()
    base_clip = Path(base_clip) if base_clip is not None else clip_out_path_for(base_model)
    _reopen_extended_unet(run, recipe)
    if init_vae is not None and not Path(init_vae).is_file():
        raise HuabiError(f"--init-vae VAE weights {init_vae} does not exist")
    if init_vae is not None and is_done(run.state_dir, "cache"):
        cached = done_summary(run.state_dir, "cache")
        used = cached.get("vae", "v1")
        # the same bytes at another path (e.g. the repository's copy in a fresh clone) are the same VAE
        same = sha256_file(Path(init_vae)) == cached["vae_sha256"] if "vae_sha256" in cached else used == str(Path(init_vae).resolve())
        if not same:
            raise HuabiError(f"the cache in {run.state_dir} was encoded with VAE {used}, not --init-vae {init_vae}; use a new --state")
    for stage in V2_STAGES:
        if stage not in stages:
            continue
        if is_done(run.state_dir, stage) and not (stage == "export" and force_export):
            run.log(f"[{stage}] already done, skipping")
            continue
        run.log(f"[{stage}] starting on {run.device} (recipe {recipe.name})")
        if stage == "base":
            stage_base(run, recipe, base_model, base_clip)
        elif stage == "cache":
            stage_cache(run, recipe, init_vae=init_vae)
        elif stage == "unet":
            stage_unet(run, recipe, init_unet=init_unet)
        else:
            _mark_done(run, "export", write_v2_export(run, recipe))
    refresh_repo_log(run)
