"""The huabi-mini recipe: stages, seeds, hyper-parameters, export.

Stages run in order and each is skipped once its ``done.json`` exists (a training stage
given more steps than it finished with is extended from its saved state)::

    vae     AutoencoderKL on random 64 px crops of the 128 px images
    clip    contrastive text + image towers (the text tower becomes the text encoder)
    cache   VAE latent means of every image + text embeddings of every caption variant
    unet    UNet on the cache: eps prediction, caption dropout, Min-SNR, EMA
    export  huabi-mini.safetensors (fp16, SD1 single-file layout, huabi.* markers)
            and huabi-mini-clip.safetensors (both CLIP towers, for evaluation)

Everything lives in the state dir (default ``~/.cache/huabi/train/huabi-mini``):
``<stage>/state.pt`` (resumable loop state), ``<stage>/final.pt`` (weights + model
config), ``<stage>/done.json``, ``data/`` (decoded pixels, token ids), ``cache/``,
``train.log``. Step counts below were set from measured step times (docs/training.md).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from huabi.errors import HuabiError
from huabi.models.files import atomic_copy
from huabi.train.cache import build_cache, load_cache
from huabi.train.clip import CLIPModelConfig, CLIPTrainConfig, train_clip
from huabi.train.common import TrainLog, atomic_torch_save, atomic_write_text, config_dict, ema_weights, load_torch_file
from huabi.train.data import TrainingImages, default_tokenizer, load_training_images, tokenize_captions
from huabi.train.unet import UNetModelConfig, UNetTrainConfig, scaled_linear_alphas_cumprod, train_unet
from huabi.train.vae import VAEModelConfig, VAETrainConfig, train_vae, vae_from_record

STAGES = ("vae", "clip", "cache", "unet", "export")
DEFAULT_STATE_DIR = Path.home() / ".cache" / "huabi" / "train" / "huabi-mini"
DEFAULT_DATA_DIR = Path.home() / ".cache" / "huabi" / "data" / "huabi-mini-128"


def default_out_path() -> Path:
    import huabi

    return Path(huabi.__file__).parent / "assets" / "models" / "huabi-mini.safetensors"


@dataclass(frozen=True)
class MiniRecipe:
    """Every number that defines huabi-mini. Changing one needs a fresh state dir for that stage."""

    size_px: int = 128
    seed: int = 20251122
    # 8 GroupNorm groups: with SD's 32, the 32-wide level has one channel per group (an instance norm
    # that drops a flat region's colour): v1's VAE, built so, kept 8% of green hues and 1% of purple;
    # the 8-group VAE of v4 keeps >= 95% of every hue band (docs/training.md, "Why green never renders green")
    vae_model: VAEModelConfig = VAEModelConfig(norm_num_groups=8)
    vae: VAETrainConfig = VAETrainConfig(
        steps=600, batch_size=32, lr=4e-4, warmup_steps=100, lr_schedule="cosine", crop_px=64, seed=20251122
    )
    clip_model: CLIPModelConfig = CLIPModelConfig()
    clip: CLIPTrainConfig = CLIPTrainConfig(
        steps=650, batch_size=128, lr=5e-4, warmup_steps=60, lr_schedule="cosine", weight_decay=0.1, seed=20251123
    )
    unet_model: UNetModelConfig = UNetModelConfig()
    unet: UNetTrainConfig = UNetTrainConfig(
        steps=4500, batch_size=32, lr=3e-4, warmup_steps=200, lr_schedule="cosine", seed=20251124
    )
    cache_batch_size: int = 64

    def with_overrides(self, **stage_fields: dict) -> "MiniRecipe":
        """A copy with fields of stage configs replaced, e.g. ``unet={"steps": 10}``."""
        import dataclasses

        changes = {}
        for name, fields in stage_fields.items():
            if not hasattr(self, name):
                raise HuabiError(f"recipe has no part {name!r}")
            changes[name] = dataclasses.replace(getattr(self, name), **fields)
        return dataclasses.replace(self, **changes)


def tiny_recipe(seed: int = 0) -> MiniRecipe:
    """A miniature recipe for tests: tiny models, a few steps of each stage, 32 px images."""
    return MiniRecipe(
        size_px=32,
        seed=seed,
        vae_model=VAEModelConfig(block_out_channels=(32, 32), layers_per_block=1),
        vae=VAETrainConfig(steps=3, batch_size=4, lr=1e-3, crop_px=16, seed=seed, log_every_steps=1),
        clip_model=CLIPModelConfig(text_width=64, text_layers=1, vision_width=64, vision_layers=1, image_px=16, patch_px=8, projection_dim=32),
        clip=CLIPTrainConfig(steps=3, batch_size=4, lr=1e-3, seed=seed, log_every_steps=1),
        unet_model=UNetModelConfig(block_out_channels=(32, 64), layers_per_block=1, attention_levels=(False, True), head_dim=32, cross_attention_dim=64, sample_size=16),
        unet=UNetTrainConfig(steps=3, batch_size=4, lr=1e-3, seed=seed, log_every_steps=1, ema_decay=0.9),
        cache_batch_size=8,
    )


@dataclass
class RecipeRun:
    """Where a recipe run reads and writes."""

    data_dir: Path
    state_dir: Path
    out_path: Path
    clip_out_path: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    repo_log: Path | None = None  # a copy of train.log refreshed when a stage finishes
    log: Callable[[str], None] | None = None
    should_stop: Callable[[], bool] | None = None  # polled between steps (SIGTERM -> save and stop)

    def __post_init__(self) -> None:
        self.data_dir, self.state_dir = Path(self.data_dir), Path(self.state_dir)
        self.out_path, self.clip_out_path = Path(self.out_path), Path(self.clip_out_path)
        self.device = torch.device(self.device)
        if self.log is None:
            self.log = TrainLog(self.state_dir / "train.log")


def clip_out_path_for(out_path: Path) -> Path:
    out_path = Path(out_path)
    return out_path.with_name(out_path.stem + "-clip" + out_path.suffix)


# ---------------------------------------------------------------- stage bookkeeping


def is_done(state_dir: Path, stage: str) -> bool:
    return (Path(state_dir) / stage / "done.json").exists()


def done_summary(state_dir: Path, stage: str) -> dict:
    """What a finished stage recorded in its ``done.json``."""
    return json.loads((Path(state_dir) / stage / "done.json").read_text(encoding="utf-8"))


def _mark_done(run: RecipeRun, stage: str, summary: dict) -> None:
    atomic_write_text(run.state_dir / stage / "done.json", json.dumps(summary, indent=1))
    run.log(f"[{stage}] done: {json.dumps(summary)}")
    refresh_repo_log(run)


def refresh_repo_log(run: RecipeRun) -> None:
    source = run.state_dir / "train.log"
    if run.repo_log is not None and source.exists():
        atomic_copy(source, run.repo_log)


def _save_final(path: Path, model: torch.nn.Module, model_config, extra: dict | None = None) -> None:
    atomic_torch_save({"model_config": config_dict(model_config), "state_dict": model.state_dict(), **(extra or {})}, path)


def _load_final(run: RecipeRun, stage: str) -> dict:
    path = run.state_dir / stage / "final.pt"
    if not is_done(run.state_dir, stage):
        raise HuabiError(f"stage {stage!r} has not finished in {run.state_dir}; run it first (--stage {stage})")
    return load_torch_file(path, what=f"{stage} weights")


def training_images(run: RecipeRun, recipe: MiniRecipe) -> TrainingImages:
    return load_training_images(run.data_dir, recipe.size_px, run.state_dir / "data", frozen=True, log=run.log)


def caption_token_ids(run: RecipeRun, images: TrainingImages, tokenizer) -> torch.Tensor:
    path = run.state_dir / "data" / "tokens.pt"
    if path.exists():
        saved = load_torch_file(path, what="token cache")
        if saved.get("captions") == images.captions:
            return saved["ids"]
    ids = tokenize_captions(tokenizer, images.captions)
    atomic_torch_save({"captions": images.captions, "ids": ids}, path)
    return ids


def _params_m(module: torch.nn.Module) -> float:
    return sum(p.numel() for p in module.parameters()) / 1e6


# ---------------------------------------------------------------- stages


def stage_vae(run: RecipeRun, recipe: MiniRecipe) -> None:
    images = training_images(run, recipe)
    started = time.time()
    vae_model = recipe.vae_model.build(seed=recipe.vae.seed)
    run.log(f"[vae] {len(images)} images at {images.size_px} px; AutoencoderKL {_params_m(vae_model):.2f}M params; {recipe.vae}")
    vae = train_vae(recipe.vae, images, model_config=recipe.vae_model, vae=vae_model, state_path=run.state_dir / "vae" / "state.pt", device=run.device, log=run.log, should_stop=run.should_stop)
    _save_final(run.state_dir / "vae" / "final.pt", vae, recipe.vae_model)
    _mark_done(run, "vae", {"steps": recipe.vae.steps, "wall_s_this_session": round(time.time() - started)})


def stage_clip(run: RecipeRun, recipe: MiniRecipe, tokenizer=None) -> None:
    images = training_images(run, recipe)
    token_ids = caption_token_ids(run, images, tokenizer if tokenizer is not None else default_tokenizer())
    started = time.time()
    model = recipe.clip_model.build(seed=recipe.clip.seed)
    run.log(
        f"[clip] {len(images)} images, {len(images.captions) - 1} unique captions; text {_params_m(model.text_model):.2f}M, "
        f"vision {_params_m(model.vision_model):.2f}M params; {recipe.clip}"
    )
    model = train_clip(recipe.clip, images, token_ids, model_config=recipe.clip_model, model=model, state_path=run.state_dir / "clip" / "state.pt", device=run.device, log=run.log, should_stop=run.should_stop)
    _save_final(run.state_dir / "clip" / "final.pt", model, recipe.clip_model)
    _mark_done(run, "clip", {"steps": recipe.clip.steps, "wall_s_this_session": round(time.time() - started)})


def _load_vae(run: RecipeRun, recipe: MiniRecipe):
    return vae_from_record(_load_final(run, "vae"))


def _load_clip(run: RecipeRun, recipe: MiniRecipe):
    final = _load_final(run, "clip")
    model = CLIPModelConfig(**final["model_config"]).build()
    model.load_state_dict(final["state_dict"])
    return model.eval()


def stage_cache(run: RecipeRun, recipe: MiniRecipe, tokenizer=None) -> None:
    images = training_images(run, recipe)
    token_ids = caption_token_ids(run, images, tokenizer if tokenizer is not None else default_tokenizer())
    started = time.time()
    vae = _load_vae(run, recipe).to(run.device)
    text_encoder = _load_clip(run, recipe).text_model.to(run.device)
    cache = build_cache(vae, text_encoder, images, token_ids, run.state_dir / "cache", batch_size=recipe.cache_batch_size, device=run.device, log=run.log)
    _mark_done(run, "cache", {"scaling_factor": cache.scaling_factor, "latents": len(cache), "captions": int(cache.text.shape[0]), "wall_s": round(time.time() - started)})


def stage_unet(run: RecipeRun, recipe: MiniRecipe) -> None:
    if not is_done(run.state_dir, "cache"):
        raise HuabiError(f"stage 'cache' has not finished in {run.state_dir}; run it first (--stage cache)")
    cache = load_cache(run.state_dir / "cache")
    started = time.time()
    unet_model = recipe.unet_model.build(seed=recipe.unet.seed)
    run.log(f"[unet] {len(cache)} latents {list(cache.latents.shape[1:])}, scaling factor {cache.scaling_factor:.5f}; UNet {_params_m(unet_model):.2f}M params; {recipe.unet}")
    unet, ema = train_unet(recipe.unet, cache, model_config=recipe.unet_model, unet=unet_model, state_path=run.state_dir / "unet" / "state.pt", device=run.device, log=run.log, should_stop=run.should_stop)
    if ema is not None:
        ema.copy_to(unet)  # ship the averaged weights
    _save_final(run.state_dir / "unet" / "final.pt", unet, recipe.unet_model, {"ema": ema is not None})
    _mark_done(run, "unet", {"steps": recipe.unet.steps, "ema": ema is not None, "wall_s_this_session": round(time.time() - started)})


def _unet_snapshot(run: RecipeRun) -> tuple[dict, int, int]:
    """The UNet stage's last saved state as ``(final-style dict, step, total steps)``.

    The EMA weights when the stage keeps them (what the finished stage ships too).
    """
    state = load_torch_file(run.state_dir / "unet" / "state.pt", what="UNet training state")
    config = state["config"]
    weights = state["modules"]["unet"]
    if state.get("ema") is not None:
        weights = ema_weights(weights, state["ema"]["shadow"])
    return {"model_config": config["model"], "state_dict": weights}, int(state["step"]), int(config["steps"])


def build_mini_parts(run: RecipeRun, recipe: MiniRecipe, *, unet_final: dict | None = None):
    """The model as ``huabi.models.save.ModelParts`` (fp32, CPU) plus the CLIP model.

    ``unet_final`` replaces the finished UNet stage's weights (a snapshot of a run in progress).
    """
    from huabi.core.family import ModelFamily, Prediction
    from huabi.models.save import ModelParts

    cache_meta = json.loads((run.state_dir / "cache" / "meta.json").read_text(encoding="utf-8"))
    vae = _load_vae(run, recipe)
    vae.register_to_config(scaling_factor=float(cache_meta["scaling_factor"]), sample_size=recipe.size_px)
    clip = _load_clip(run, recipe)
    final = unet_final if unet_final is not None else _load_final(run, "unet")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in final["model_config"].items()}
    unet = UNetModelConfig(**fields).build()
    unet.load_state_dict(final["state_dict"])
    parts = ModelParts(
        family=ModelFamily.HUABI_MINI,
        unet=unet.eval(),
        vae=vae,
        text_encoders=[clip.text_model],
        prediction=Prediction.EPSILON,
        native_size_px=recipe.size_px,
        alphas_cumprod=scaled_linear_alphas_cumprod(recipe.unet.num_train_timesteps, recipe.unet.beta_start, recipe.unet.beta_end),
    )
    return parts, clip


def _write_export(run: RecipeRun, recipe: MiniRecipe, *, unet_final: dict | None = None, extra_metadata: dict | None = None) -> dict:
    from huabi.models.formats import write_safetensors_atomic
    from huabi.models.save import save_single_file

    parts, clip = build_mini_parts(run, recipe, unet_final=unet_final)
    metadata = {
        "huabi.recipe": json.dumps(config_dict(recipe), default=str),
        "huabi.trained_by": "huabi.train mini",
        "modelspec.architecture": "huabi-mini",
        "modelspec.resolution": f"{recipe.size_px}x{recipe.size_px}",
        **(extra_metadata or {}),
    }
    path = save_single_file(parts, run.out_path, dtype=torch.float16, metadata=metadata)
    # The text tower is the checkpoint's text encoder: ship only what the checkpoint lacks.
    clip_tensors = {
        k: v.detach().to(torch.float16) if v.is_floating_point() else v
        for k, v in clip.state_dict().items()
        if not k.startswith("text_model.")
    }
    clip_metadata = {
        "huabi.clip_config": json.dumps(clip.config.to_dict(), default=str),
        "huabi.format": "transformers CLIPModel state dict without text_model.* (the checkpoint's text encoder)",
    }
    write_safetensors_atomic(run.clip_out_path, clip_tensors, clip_metadata)
    return {"out": str(path), "size_mb": round(path.stat().st_size / 1e6, 2), "clip_out": str(run.clip_out_path), "clip_size_mb": round(run.clip_out_path.stat().st_size / 1e6, 2)}


def stage_export(run: RecipeRun, recipe: MiniRecipe) -> None:
    _mark_done(run, "export", _write_export(run, recipe))


def export_snapshot(run: RecipeRun, recipe: MiniRecipe) -> dict:
    """Export the model with the UNet as last saved by a UNet stage still in progress.

    For shipping a usable model between sessions of a long run: the file records the
    step (metadata ``huabi.unet_step``) and the stage stays unfinished, so the run
    resumes and the final export replaces the snapshot.
    """
    for stage in ("vae", "clip", "cache"):
        if not is_done(run.state_dir, stage):
            raise HuabiError(f"stage {stage!r} has not finished in {run.state_dir}; a snapshot needs the UNet stage under way")
    unet_final, step, total = _unet_snapshot(run)
    summary = _write_export(run, recipe, unet_final=unet_final, extra_metadata={"huabi.unet_step": f"{step}/{total}"})
    run.log(f"[snapshot] UNet step {step}/{total} (EMA) exported: {json.dumps(summary)}")
    refresh_repo_log(run)
    return summary


def _reopen_extended_stages(run: RecipeRun, recipe: MiniRecipe) -> None:
    """A finished training stage whose recipe now asks for more steps continues from its state.

    The UNet is last before export, so extending it reopens the UNet and the export. The VAE
    and CLIP feed the cache: once it is built, extending them would leave the UNet trained on
    stale latents, so that is refused.
    """
    trained_to = {"vae": recipe.vae.steps, "clip": recipe.clip.steps, "unet": recipe.unet.steps}
    for stage, steps in trained_to.items():
        done_path = run.state_dir / stage / "done.json"
        if not done_path.exists():
            continue
        finished_at = int(done_summary(run.state_dir, stage).get("steps", steps))
        if finished_at >= steps:
            continue
        if stage != "unet" and is_done(run.state_dir, "cache"):
            raise HuabiError(
                f"stage {stage!r} finished at {finished_at} steps and the cache was built from it; "
                f"to train it to {steps} steps use a fresh state dir"
            )
        if not (run.state_dir / stage / "state.pt").exists():
            raise HuabiError(f"stage {stage!r} finished at {finished_at} steps but its state.pt is gone; cannot extend it to {steps}")
        run.log(f"[{stage}] finished at {finished_at} steps; extending to {steps}")
        done_path.unlink()
        if stage == "unet":
            (run.state_dir / "export" / "done.json").unlink(missing_ok=True)


def run_recipe(run: RecipeRun, recipe: MiniRecipe = MiniRecipe(), stages: Sequence[str] = STAGES, *, tokenizer=None, force_export: bool = False) -> None:
    """Run ``stages`` in recipe order, skipping finished ones (export re-runs with ``force_export``).

    A finished stage given more steps than it ran (``--steps unet=N``) is extended from its state.
    """
    for stage in stages:
        if stage not in STAGES:
            raise HuabiError(f"unknown stage {stage!r}; choose from {', '.join(STAGES)} or all")
    _reopen_extended_stages(run, recipe)
    for stage in STAGES:
        if stage not in stages:
            continue
        if is_done(run.state_dir, stage) and not (stage == "export" and force_export):
            run.log(f"[{stage}] already done, skipping")
            continue
        run.log(f"[{stage}] starting on {run.device}")
        if stage == "vae":
            stage_vae(run, recipe)
        elif stage == "clip":
            stage_clip(run, recipe, tokenizer)
        elif stage == "cache":
            stage_cache(run, recipe, tokenizer)
        elif stage == "unet":
            stage_unet(run, recipe)
        else:
            stage_export(run, recipe)
    refresh_repo_log(run)
