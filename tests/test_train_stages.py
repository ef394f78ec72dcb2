"""huabi.train stages on a tiny generated captioned folder: shapes, learning, exact resumption, export."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from huabi.errors import HuabiError
from huabi.train.cache import build_cache, latent_scaling_factor, load_cache
from huabi.train.common import TrainLog
from huabi.train.clip import CLIPTrainConfig, encode_text, train_clip
from huabi.train.data import default_tokenizer, load_training_images, pick_captions, tokenize_captions
from huabi.train.recipe import RecipeRun, run_recipe, tiny_recipe
from huabi.train.unet import (
    UNetTrainConfig,
    min_snr_weights,
    scaled_linear_alphas_cumprod,
    train_unet,
)
from huabi.train.vae import VAETrainConfig, train_vae

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 190, 40), "yellow": (230, 210, 20)}


class Crash(RuntimeError):
    pass


def _crash_after(k: int):
    def hook(step: int, metrics: dict) -> None:
        if step == k:
            raise Crash(f"simulated interruption after step {step}")

    return hook


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """8 images (4 colours x circle/square) with two caption variants each, plus one uncaptioned."""
    root = tmp_path_factory.mktemp("tiny-data")
    for name, rgb in COLOURS.items():
        for shape in ("circle", "square"):
            image = Image.new("RGB", (48, 48), "white")
            draw = ImageDraw.Draw(image)
            (draw.ellipse if shape == "circle" else draw.rectangle)((8, 8, 40, 40), fill=rgb)
            image.save(root / f"{name}_{shape}.png")
            (root / f"{name}_{shape}.txt").write_text(f"a {name} {shape}\n{name}, {shape}\n", encoding="utf-8")
    Image.new("RGB", (48, 48), "gray").save(root / "zz_uncaptioned.png")
    return root


@pytest.fixture(scope="module")
def images(folder):
    return load_training_images(folder, 32, None)


@pytest.fixture(scope="module")
def token_ids(images):
    return tokenize_captions(default_tokenizer(), images.captions)


def test_training_images_and_captions(images, token_ids, folder, tmp_path):
    assert images.pixels.shape == (9, 32, 32, 3)
    assert images.captions[0] == "" and len(images.captions) == 17
    assert images.caption_ids[-1] == []  # the uncaptioned image
    assert [images.captions[i] for i in images.caption_ids[0]] == ["a blue circle", "blue, circle"]
    batch = images.batch_pixels(torch.tensor([0, 1]))
    assert batch.shape == (2, 3, 32, 32) and -1.0 <= float(batch.min()) and float(batch.max()) <= 1.0
    assert token_ids.shape == (17, 77)
    assert token_ids[1, 0].item() == 49406 and 49407 in token_ids[1].tolist()
    # the decoded-pixel cache is reused and, when frozen, survives a changed folder
    first = load_training_images(folder, 32, tmp_path)
    assert (tmp_path / "pixels-32.npy").exists()
    assert torch.equal(torch.from_numpy(first.pixels[:]), torch.from_numpy(images.pixels[:]))
    (folder / "zz_uncaptioned.txt").write_text("grey\n", encoding="utf-8")
    try:
        assert len(load_training_images(folder, 32, tmp_path, frozen=True).captions) == 17
        assert len(load_training_images(folder, 32, tmp_path).captions) == 18
    finally:
        (folder / "zz_uncaptioned.txt").unlink()


def test_caption_dropout_rate_and_uniform_variants():
    caption_ids = [[1, 2], [3, 4]] * 5000
    indices = torch.arange(len(caption_ids))
    picked = pick_captions(caption_ids, indices, torch.Generator().manual_seed(0), dropout=0.1)
    dropped = float((picked == 0).float().mean())
    assert dropped == pytest.approx(0.1, abs=0.01)  # 10,000 draws: 3 sigma is 0.009
    kept = picked[picked != 0]
    assert float((kept % 2 == 1).float().mean()) == pytest.approx(0.5, abs=0.02)
    assert torch.equal(pick_captions([[]], torch.tensor([0]), torch.Generator().manual_seed(0)), torch.tensor([0]))


def test_schedule_matches_diffusers_and_min_snr_weights():
    from diffusers import DDPMScheduler

    ours = scaled_linear_alphas_cumprod()
    reference = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    assert torch.allclose(ours.float(), reference, rtol=0, atol=1e-6)  # measured max |diff| ~ 1e-7 (fp32 vs fp64)
    abar = torch.tensor([0.999, 0.5, 0.01])
    snr = abar / (1 - abar)
    assert torch.allclose(min_snr_weights(abar, 5.0), torch.stack([5.0 / snr[0], torch.tensor(1.0), torch.tensor(1.0)]))
    assert torch.equal(min_snr_weights(abar, 0.0), torch.ones(3))


def _vae_config(**kw):
    base = dict(steps=50, batch_size=4, lr=5e-3, crop_px=16, seed=1, log_every_steps=100)
    base.update(kw)
    return VAETrainConfig(**base)


def test_vae_learns_and_reconstructs(images):
    recipe = tiny_recipe()
    losses = []
    config = _vae_config(lr=2e-3, crop_px=0, max_grad_norm=0.0)
    vae = train_vae(config, images, model_config=recipe.vae_model, on_step=lambda s, m: losses.append(m["l1"]), validation_count=0)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.65 * first, (first, last)  # measured: L1 0.65 -> 0.33 in 50 steps
    latents = vae.encode(images.batch_pixels(torch.arange(2))).latent_dist.mean
    assert latents.shape == (2, 4, 16, 16)  # (32, 32) blocks: f=2


def test_vae_resume_after_crash_is_exact(images, tmp_path):
    recipe = tiny_recipe()
    config = _vae_config(steps=6, save_every_steps=3, save_every_s=0)
    straight = train_vae(config, images, model_config=recipe.vae_model, state_path=tmp_path / "a.pt", validation_count=0)
    with pytest.raises(Crash):
        train_vae(config, images, model_config=recipe.vae_model, state_path=tmp_path / "b.pt", on_step=_crash_after(5), validation_count=0)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 3  # steps 4-5 were lost, as a real crash loses them
    resumed = train_vae(config, images, model_config=recipe.vae_model, state_path=tmp_path / "b.pt", validation_count=0)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    state_a = torch.load(tmp_path / "a.pt", weights_only=True)
    state_b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state_a["step"] == state_b["step"] == 6
    for key, value in state_a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg_sq"], state_b["optimizer"]["state"][key]["exp_avg_sq"])


def test_vae_config_errors(images):
    with pytest.raises(HuabiError, match="^crop_px must be a multiple of 8, got 12$"):
        train_vae(_vae_config(crop_px=12), images)
    with pytest.raises(HuabiError, match=r"^crop_px 64 is larger than the images \(32 px\)$"):
        train_vae(_vae_config(crop_px=64, steps=1), images, model_config=tiny_recipe().vae_model, validation_count=0)


def test_clip_contrastive_loss_falls(images, token_ids):
    recipe = tiny_recipe()
    losses = []
    config = CLIPTrainConfig(steps=40, batch_size=8, lr=2e-3, seed=0, log_every_steps=100)
    model = train_clip(config, images, token_ids, model_config=recipe.clip_model, on_step=lambda s, m: losses.append(m["loss"]))
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses  # measured: 2.33 -> 0.004 in 40 steps
    hidden = encode_text(model.text_model, token_ids[:3])
    assert hidden.shape == (3, 77, 64)


def test_clip_errors(images, token_ids):
    recipe = tiny_recipe()
    with pytest.raises(HuabiError, match="^batch_size must be >= 2 for contrastive training, got 1$"):
        train_clip(CLIPTrainConfig(steps=1, batch_size=1, lr=1e-3), images, token_ids, model_config=recipe.clip_model)
    with pytest.raises(HuabiError, match=r"^token_ids must be \[17, 77\], got \[3, 77\]$"):
        train_clip(CLIPTrainConfig(steps=1, batch_size=2, lr=1e-3), images, token_ids[:3], model_config=recipe.clip_model)
    with pytest.raises(HuabiError, match="^text_width must be a multiple of 64"):
        train_clip(CLIPTrainConfig(steps=1, batch_size=2, lr=1e-3), images, token_ids, model_config=dataclasses.replace(recipe.clip_model, text_width=96))


@pytest.fixture(scope="module")
def cache(images, token_ids, tmp_path_factory):
    recipe = tiny_recipe()
    torch.manual_seed(0)
    vae = recipe.vae_model.build(seed=0)
    text_encoder = recipe.clip_model.build(seed=0).text_model
    return build_cache(vae, text_encoder, images, token_ids, tmp_path_factory.mktemp("cache"), batch_size=4)


def test_cache_shapes_and_scaling(cache, images, tmp_path):
    assert cache.latents.shape == (9, 4, 16, 16)
    assert cache.text.shape == (17, 77, 64) and cache.text.dtype.name == "float16"
    assert cache.scaling_factor == pytest.approx(latent_scaling_factor(cache.latents))
    assert float((cache.latents * cache.scaling_factor).std()) == pytest.approx(1.0, abs=1e-4)
    assert cache.caption_ids == images.caption_ids
    with pytest.raises(HuabiError, match=r"is missing or incomplete \(no meta.json\); run the cache stage$"):
        load_cache(tmp_path)
    with pytest.raises(HuabiError, match="^cached latents have zero variance; is the VAE trained\\?$"):
        latent_scaling_factor(torch.zeros(2, 4, 2, 2))


def _unet_config(**kw):
    base = dict(steps=6, batch_size=4, lr=1e-3, seed=2, log_every_steps=100, warmup_steps=2, lr_schedule="cosine", ema_decay=0.9)
    base.update(kw)
    return UNetTrainConfig(**base)


def test_unet_resume_after_crash_is_exact(cache, tmp_path):
    model_config = tiny_recipe().unet_model
    config = _unet_config(save_every_steps=2, save_every_s=0)
    straight, ema_a = train_unet(config, cache, model_config=model_config, state_path=tmp_path / "a.pt")
    with pytest.raises(Crash):
        train_unet(config, cache, model_config=model_config, state_path=tmp_path / "b.pt", on_step=_crash_after(3))
    resumed, ema_b = train_unet(config, cache, model_config=model_config, state_path=tmp_path / "b.pt")
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    for key in ema_a.shadow:
        assert torch.equal(ema_a.shadow[key], ema_b.shadow[key]), key
    state_a = torch.load(tmp_path / "a.pt", weights_only=True)
    state_b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert state_a["scheduler"]["last_epoch"] == state_b["scheduler"]["last_epoch"] == 6
    for key, value in state_a["optimizer"]["state"].items():
        assert torch.equal(value["exp_avg"], state_b["optimizer"]["state"][key]["exp_avg"])


def test_auto_precision_is_logged_and_a_state_resumes_on_another_kind_of_machine(cache, tmp_path, monkeypatch):
    """precision 'auto' is resolved per run (logged) and recorded as 'auto' in the state, so a run
    started where bf16 wins resumes where it does not (here: the answer pinned, then changed)."""
    model_config = tiny_recipe().unet_model
    config = _unet_config(precision="auto", save_every_steps=2, save_every_s=0)
    messages = []
    monkeypatch.setenv("HUABI_AUTO_DTYPE", "bf16")
    with pytest.raises(Crash):
        train_unet(config, cache, model_config=model_config, state_path=tmp_path / "s.pt", log=messages.append, on_step=_crash_after(3))
    assert "[unet] precision auto -> bf16 (bf16: pinned by HUABI_AUTO_DTYPE)" in messages
    assert torch.load(tmp_path / "s.pt", weights_only=True)["config"]["precision"] == "auto"
    monkeypatch.setenv("HUABI_AUTO_DTYPE", "fp32")
    train_unet(config, cache, model_config=model_config, state_path=tmp_path / "s.pt", log=messages.append)
    assert "[unet] precision auto -> fp32 (fp32: pinned by HUABI_AUTO_DTYPE)" in messages
    assert any("resumed from" in message for message in messages)


def test_unet_loss_falls_on_a_learnable_set(cache):
    losses = []
    config = _unet_config(steps=40, lr=2e-3, caption_dropout=0.0, ema_decay=0.0, warmup_steps=5)
    unet, ema = train_unet(config, cache, model_config=tiny_recipe().unet_model, on_step=lambda s, m: losses.append(m["mse"]))
    assert ema is None
    assert sum(losses[-10:]) / 10 < 0.7 * sum(losses[:10]) / 10, losses  # measured: mse 0.72 -> 0.22 in 40 steps


def test_unet_config_errors(cache):
    with pytest.raises(HuabiError, match=r"^caption_dropout must be in \[0, 1\), got 1.0$"):
        train_unet(_unet_config(caption_dropout=1.0), cache)
    with pytest.raises(HuabiError, match="^min_snr_gamma must be >= 0, got -5$"):
        train_unet(_unet_config(min_snr_gamma=-5), cache)
    with pytest.raises(HuabiError, match="^cross_attention_dim 256 does not match the cached text width 64$"):
        train_unet(_unet_config(), cache)


def test_recipe_end_to_end_export_and_resume(folder, tmp_path):
    """All stages of the tiny recipe; the export is an SD1-layout file huabi detects and loads as huabi-mini."""
    from huabi.models.detect import detect
    from huabi.models.family import ModelFamily
    from huabi.models.load import load_model

    messages: list[str] = []
    file_log = TrainLog(tmp_path / "state" / "train.log", echo=False)

    def log(message: str) -> None:
        messages.append(message)
        file_log(message)

    run = RecipeRun(data_dir=folder, state_dir=tmp_path / "state", out_path=tmp_path / "out" / "mini.safetensors",
                    clip_out_path=tmp_path / "out" / "mini-clip.safetensors", repo_log=tmp_path / "docs" / "log.txt", log=log)
    run_recipe(run, tiny_recipe())
    for stage in ("vae", "clip", "cache", "unet", "export"):
        assert (tmp_path / "state" / stage / "done.json").exists()
    with safe_open(str(run.out_path), "pt") as handle:
        keys = list(handle.keys())
        tensors = {k: handle.get_tensor(k) for k in keys}
    assert any(k.startswith("model.diffusion_model.") for k in keys)
    assert any(k.startswith("first_stage_model.") for k in keys)
    assert any(k.startswith("cond_stage_model.transformer.") for k in keys)
    assert tensors["huabi.version"].dtype == torch.int64 and tensors["huabi.version"].item() == 1
    assert tensors["huabi.attention_head_dim"].item() == 32
    assert tensors["huabi.native_size_px"].item() == 32
    scaling = json.loads((tmp_path / "state" / "cache" / "meta.json").read_text())["scaling_factor"]
    assert tensors["huabi.vae_scaling_factor"].item() == pytest.approx(scaling, rel=1e-6)
    assert tensors["model.diffusion_model.out.2.weight"].dtype == torch.float16
    assert detect(tensors).family is ModelFamily.HUABI_MINI
    bundle = load_model(run.out_path, compute_hash=False)
    assert bundle.family is ModelFamily.HUABI_MINI and bundle.native_size_px == 32
    with safe_open(str(run.clip_out_path), "pt") as handle:
        assert "visual_projection.weight" in handle.keys() and "logit_scale" in handle.keys()
    assert "[export] done" in (tmp_path / "docs" / "log.txt").read_text()  # the repo copy of the log
    # re-running skips every finished stage
    messages.clear()
    run_recipe(run, tiny_recipe())
    assert [m for m in messages if "already done" in m] == [f"[{s}] already done, skipping" for s in ("vae", "clip", "cache", "unet", "export")]
    with pytest.raises(HuabiError, match="^unknown stage 'dit'; choose from vae, clip, cache, unet, export or all$"):
        run_recipe(run, tiny_recipe(), ["dit"])


def test_later_stage_without_earlier_one_is_named(folder, tmp_path):
    run = RecipeRun(data_dir=folder, state_dir=tmp_path, out_path=tmp_path / "m.safetensors", clip_out_path=tmp_path / "c.safetensors", log=lambda m: None)
    with pytest.raises(HuabiError, match=r"^stage 'cache' has not finished in .*; run it first \(--stage cache\)$"):
        run_recipe(run, tiny_recipe(), ["unet"])


def test_trimming_padding_keeps_the_contrastive_loss(images, token_ids):
    from huabi.train.clip import contrastive_loss, images_for_vision, trim_padding

    recipe = tiny_recipe()
    model = recipe.clip_model.build(seed=0)
    ids = token_ids[1:9]
    trimmed = trim_padding(ids)
    assert trimmed.shape[1] < 77 and torch.equal(trimmed, ids[:, : trimmed.shape[1]])
    pixels = images_for_vision(images.batch_pixels(torch.arange(8)), recipe.clip_model.image_px)
    full, _ = contrastive_loss(model, ids, pixels)
    short, _ = contrastive_loss(model, trimmed, pixels)
    assert torch.allclose(full, short, rtol=0, atol=1e-5)  # causal tower, pooled at the first EOS


def test_polite_stop_saves_and_resume_matches(images, tmp_path):
    from huabi.train.common import TrainingStopped

    recipe = tiny_recipe()
    config = _vae_config(steps=5, save_every_s=0)
    straight = train_vae(config, images, model_config=recipe.vae_model, validation_count=0)
    calls = {"n": 0}

    def after_two() -> bool:  # e.g. a SIGTERM handler's flag
        calls["n"] += 1
        return calls["n"] >= 2

    with pytest.raises(TrainingStopped, match="^vae stopped at step 2; state saved, re-run to resume$"):
        train_vae(config, images, model_config=recipe.vae_model, state_path=tmp_path / "s.pt", validation_count=0, should_stop=after_two)
    assert torch.load(tmp_path / "s.pt", weights_only=True)["step"] == 2
    resumed = train_vae(config, images, model_config=recipe.vae_model, state_path=tmp_path / "s.pt", validation_count=0)
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


def test_snapshot_exports_the_unet_state_of_a_run_in_progress(folder, tmp_path):
    """A snapshot ships the UNet's last saved EMA weights; at the end of a run they are the final ones."""
    from huabi.train.recipe import export_snapshot

    run = RecipeRun(data_dir=folder, state_dir=tmp_path / "state", out_path=tmp_path / "mini.safetensors",
                    clip_out_path=tmp_path / "mini-clip.safetensors", log=lambda m: None)
    with pytest.raises(HuabiError, match=r"^stage 'vae' has not finished in .*; a snapshot needs the UNet stage under way$"):
        export_snapshot(run, tiny_recipe())
    run_recipe(run, tiny_recipe())
    with safe_open(str(run.out_path), "pt") as handle:
        final = {k: handle.get_tensor(k) for k in handle.keys()}
    snap = RecipeRun(data_dir=folder, state_dir=tmp_path / "state", out_path=tmp_path / "snap.safetensors",
                     clip_out_path=tmp_path / "snap-clip.safetensors", log=lambda m: None)
    summary = export_snapshot(snap, tiny_recipe())
    assert summary["out"] == str(tmp_path / "snap.safetensors")
    with safe_open(str(snap.out_path), "pt") as handle:
        assert handle.metadata()["huabi.unet_step"] == "3/3"
        snapshot = {k: handle.get_tensor(k) for k in handle.keys()}
    assert snapshot.keys() == final.keys()
    assert all(torch.equal(snapshot[k], final[k]) for k in final)


def test_finished_unet_stage_is_extended_by_more_steps(folder, tmp_path):
    """`--steps unet=N` after the run finished continues the UNet from its state and re-exports;
    the same for the VAE once the cache was built from it is refused."""
    messages: list[str] = []
    run = RecipeRun(data_dir=folder, state_dir=tmp_path / "state", out_path=tmp_path / "mini.safetensors",
                    clip_out_path=tmp_path / "mini-clip.safetensors", log=messages.append)
    recipe = tiny_recipe()
    run_recipe(run, recipe)
    first_export = run.out_path.read_bytes()
    longer = recipe.with_overrides(unet={"steps": recipe.unet.steps + 2})
    messages.clear()
    run_recipe(run, longer)
    assert f"[unet] finished at {recipe.unet.steps} steps; extending to {recipe.unet.steps + 2}" in messages
    assert f"[unet] resumed from {tmp_path / 'state' / 'unet' / 'state.pt'} at step {recipe.unet.steps}/{recipe.unet.steps + 2}" in messages
    assert json.loads((tmp_path / "state" / "unet" / "done.json").read_text())["steps"] == recipe.unet.steps + 2
    assert run.out_path.read_bytes() != first_export
    messages.clear()
    run_recipe(run, longer)  # nothing left to do
    assert len([m for m in messages if "already done" in m]) == 5
    with pytest.raises(HuabiError, match=r"^stage 'vae' finished at \d+ steps and the cache was built from it; to train it to \d+ steps use a fresh state dir$"):
        run_recipe(run, longer.with_overrides(vae={"steps": recipe.vae.steps + 1}))
