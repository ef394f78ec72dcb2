"""huabi-mini v2: the warm start from v1 is exact, the recipe's stages run, resume and export,
and `--ar` on a 128 px model gives the asked-for shape."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from PIL import Image, ImageDraw
from safetensors import safe_open

from huabi.errors import HuabiError
from huabi.train.mini_v2 import MiniV2Recipe, run_v2, warm_start_unet, write_v2_export
from huabi.train.recipe import RecipeRun, run_recipe, tiny_recipe
from huabi.train.unet import UNetModelConfig, UNetTrainConfig

COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 190, 40), "yellow": (230, 210, 20)}


def tiny_v2_recipe(**unet_fields) -> MiniV2Recipe:
    """The v2 recipe shrunk to tiny_recipe()'s model: its UNet gains attention on the first level."""
    v1 = tiny_recipe()
    fields = dict(steps=3, batch_size=4, lr=1e-3, warmup_steps=1, seed=5, log_every_steps=1, ema_decay=0.9, precision="bf16")
    fields.update(unet_fields)
    return MiniV2Recipe(
        size_px=v1.size_px,
        unet_model=UNetModelConfig(**{**v1.unet_model.__dict__, "attention_levels": (True, True)}),
        unet=UNetTrainConfig(**fields),
        cache_batch_size=8,
        model_sha256="",
        clip_sha256="",
    )


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny-data")
    for name, rgb in COLOURS.items():
        for shape in ("circle", "square"):
            image = Image.new("RGB", (48, 48), "white")
            draw = ImageDraw.Draw(image)
            (draw.ellipse if shape == "circle" else draw.rectangle)((8, 8, 40, 40), fill=rgb)
            image.save(root / f"{name}_{shape}.png")
            (root / f"{name}_{shape}.txt").write_text(f"a {name} {shape}\n{name}, {shape}\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def v1_files(folder, tmp_path_factory):
    """A tiny 'v1' trained by the v1 recipe: the file pair v2 warm-starts from."""
    root = tmp_path_factory.mktemp("v1")
    run = RecipeRun(data_dir=folder, state_dir=root / "state", out_path=root / "mini.safetensors",
                    clip_out_path=root / "mini-clip.safetensors", log=lambda m: None)
    run_recipe(run, tiny_recipe())
    return run.out_path, run.clip_out_path


def _v2_run(folder, tmp_path, messages=None, name="mini.safetensors") -> RecipeRun:
    return RecipeRun(data_dir=folder, state_dir=tmp_path / "state", out_path=tmp_path / "out" / name,
                     clip_out_path=tmp_path / "out" / name.replace(".safetensors", "-clip.safetensors"),
                     log=(messages.append if messages is not None else (lambda m: None)))


def _tensors(path) -> dict[str, torch.Tensor]:
    with safe_open(str(path), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}


def test_warm_start_computes_exactly_what_the_base_unet_did():
    base_config = UNetModelConfig(block_out_channels=(32, 64), attention_levels=(False, True), head_dim=32, cross_attention_dim=64, sample_size=8)
    base = base_config.build(seed=1)
    with torch.no_grad():  # non-trivial weights everywhere (fresh diffusers init zeroes some outputs)
        for p in base.parameters():
            p.add_(0.05 * torch.randn_like(p))
    grown_config = UNetModelConfig(**{**base_config.__dict__, "attention_levels": (True, True)})
    grown = warm_start_unet(grown_config, base, seed=2)
    assert sum(p.numel() for p in grown.parameters()) > sum(p.numel() for p in base.parameters())
    assert "down_blocks.0.attentions.0.proj_in.weight" in grown.state_dict()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([3, 900]), torch.randn(2, 7, 64)
    with torch.no_grad():
        expected = base(x, t, encoder_hidden_states=context).sample
        got = grown(x, t, encoder_hidden_states=context).sample
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the new blocks are not dead: their proj_out gets a gradient
    grown(x, t, encoder_hidden_states=context).sample.pow(2).mean().backward()
    assert grown.down_blocks[0].attentions[0].proj_out.weight.grad.abs().sum() > 0


def test_warm_start_refuses_layouts_that_change_more_than_attention():
    base = UNetModelConfig(block_out_channels=(32, 64), attention_levels=(False, True), head_dim=32, cross_attention_dim=64).build()
    deeper = UNetModelConfig(block_out_channels=(32, 64), layers_per_block=2, attention_levels=(False, True), head_dim=32, cross_attention_dim=64)
    with pytest.raises(HuabiError, match=r"^the v2 layout (adds .*resnets.*, which is not part of a new attention block|changes the shape of .*); cannot warm-start$"):
        warm_start_unet(deeper, base)
    wider = UNetModelConfig(block_out_channels=(32, 96), attention_levels=(False, True), head_dim=32, cross_attention_dim=64)
    with pytest.raises(HuabiError, match=r"^the v2 layout changes the shape of .* \(\[64.*\] -> \[96.*\]\); cannot warm-start$"):
        warm_start_unet(wider, base)


def test_v2_recipe_end_to_end(folder, v1_files, tmp_path):
    """base -> cache -> unet -> export: the export keeps v1's VAE, text encoder, scale and CLIP pair
    and carries the grown UNet; re-running skips; more steps reopen the UNet; snapshots work."""
    from huabi.models.load import load_model

    v1_model, v1_clip = v1_files
    messages: list[str] = []
    run = _v2_run(folder, tmp_path, messages)
    recipe = tiny_v2_recipe()
    run_v2(run, recipe, base_model=v1_model)
    for stage in ("base", "cache", "unet", "export"):
        assert (tmp_path / "state" / stage / "done.json").exists()
    assert any("warm start from v1" in m for m in messages)
    old, new = _tensors(v1_model), _tensors(run.out_path)
    for key in old:
        if key.startswith(("first_stage_model.", "cond_stage_model.")) or key == "huabi.vae_scaling_factor":
            assert torch.equal(old[key], new[key]), key
    unet_keys_new = {k for k in new if k.startswith("model.diffusion_model.")}
    unet_keys_old = {k for k in old if k.startswith("model.diffusion_model.")}
    assert unet_keys_old < unet_keys_new  # the same blocks plus the new attention
    assert any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in unet_keys_new - unet_keys_old)
    assert run.clip_out_path.read_bytes() == v1_clip.read_bytes()
    scaling = json.loads((tmp_path / "state" / "cache" / "meta.json").read_text())["scaling_factor"]
    assert scaling == pytest.approx(float(old["huabi.vae_scaling_factor"]), rel=1e-6)
    bundle = load_model(run.out_path, compute_hash=False)
    assert bundle.unet.config.down_block_types == ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"] or \
        tuple(bundle.unet.config.down_block_types) == ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D")
    with safe_open(str(run.out_path), "pt") as handle:
        assert handle.metadata()["huabi.unet_step"] == "3/3"
        assert handle.metadata()["huabi.trained_by"] == "huabi.train mini-v2"

    # the last saved state is the final one: a snapshot equals the export
    snap = _v2_run(folder, tmp_path, name="snap.safetensors")
    write_v2_export(snap, recipe, snapshot=True)
    snapshot = _tensors(snap.out_path)
    assert snapshot.keys() == new.keys() and all(torch.equal(snapshot[k], new[k]) for k in new)

    messages.clear()
    run_v2(run, recipe, base_model=v1_model)
    assert [m for m in messages if "already done" in m] == [f"[{s}] already done, skipping" for s in ("base", "cache", "unet", "export")]
    longer = recipe.with_overrides(unet={"steps": 5})
    messages.clear()
    run_v2(run, longer, base_model=v1_model)
    assert "[unet] finished at 3 steps; extending to 5" in messages
    with safe_open(str(run.out_path), "pt") as handle:
        assert handle.metadata()["huabi.unet_step"] == "5/5"


def test_v2_resume_after_interruption_is_exact(folder, v1_files, tmp_path):
    v1_model, _ = v1_files
    straight = _v2_run(folder, tmp_path / "a")
    run_v2(straight, tiny_v2_recipe(steps=4), base_model=v1_model)
    stopped = _v2_run(folder, tmp_path / "b")
    calls = {"n": 0}

    def stop_after_two() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2

    stopped.should_stop = stop_after_two
    from huabi.train.common import TrainingStopped

    with pytest.raises(TrainingStopped):
        run_v2(stopped, tiny_v2_recipe(steps=4), base_model=v1_model)
    assert not (tmp_path / "b" / "state" / "unet" / "done.json").exists()
    stopped.should_stop = None
    run_v2(stopped, tiny_v2_recipe(steps=4), base_model=v1_model)
    a, b = _tensors(straight.out_path), _tensors(stopped.out_path)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_base_stage_checks_the_v1_file(folder, v1_files, tmp_path):
    v1_model, _ = v1_files
    recipe = MiniV2Recipe(**{**tiny_v2_recipe().__dict__, "model_sha256": "0" * 64})
    with pytest.raises(HuabiError, match=r"^mini\.safetensors is not huabi-mini v1 \(sha256 [0-9a-f]{12}, expected 000000000000\); get v1 with: git show 8a20066:"):
        run_v2(_v2_run(folder, tmp_path), recipe, base_model=v1_model)
    with pytest.raises(HuabiError, match=r"^warm-start file .*nothing\.safetensors is missing"):
        run_v2(_v2_run(folder, tmp_path), tiny_v2_recipe(), base_model=tmp_path / "nothing.safetensors")
    with pytest.raises(HuabiError, match=r"^the v2 recipe trains only the UNet; cannot override 'vae'$"):
        tiny_v2_recipe().with_overrides(vae={"steps": 3})


def test_v2_command_line_errors(capsys):
    from huabi.train.__main__ import main

    assert main(["mini-v2", "--steps", "clip=3"]) == 2
    assert capsys.readouterr().err.strip() == "error: --steps expects unet=N with N >= 1 (v2 trains only the UNet), got 'clip=3'"


def test_aspect_ratio_on_a_128px_model_gives_that_shape(capsys, tiny_mini_file, tmp_path):
    """`--ar 3:2` on huabi-mini (native 128) used to snap back to 128x128."""
    from huabi.cli.main import main

    code = main(["generate", "a red apple --ar 3:2", "--model", str(tiny_mini_file), "--steps", "2",
                 "--batch-size", "1", "--out", str(tmp_path), "--quiet"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    images = [line for line in captured.out.splitlines() if not line.rsplit("/", 1)[-1].startswith("grid-")]
    assert len(images) == 1
    assert Image.open(images[0]).size == (160, 112)


def test_centred_recipe_trains_on_centred_latents_and_exports_a_matching_vae(folder, v1_files, tmp_path):
    from huabi.models.load import load_model
    from huabi.train.cache import load_cache
    from huabi.train.mini_v2 import channel_stats

    v1_model, _ = v1_files
    messages: list[str] = []
    recipe = MiniV2Recipe(**{**tiny_v2_recipe().__dict__, "centre_latents": True, "name": "centred"})
    run = _v2_run(folder, tmp_path, messages)
    run_v2(run, recipe, base_model=v1_model)
    stats = json.loads((tmp_path / "state" / "unet" / "latent_stats.json").read_text())
    cache = load_cache(tmp_path / "state" / "cache")
    mean, std = channel_stats(cache.latents)
    assert stats["mean"] == mean.tolist() and stats["std"] == std.tolist()
    assert any(m.startswith("[unet] centred latents") for m in messages)
    old, new = _tensors(v1_model), _tensors(run.out_path)
    changed = {k for k in old if k.startswith("first_stage_model.") and not torch.equal(old[k], new[k])}
    assert changed == {f"first_stage_model.{conv}.{p}" for conv in ("quant_conv", "post_quant_conv") for p in ("weight", "bias")}
    assert float(new["huabi.vae_scaling_factor"]) == 1.0
    # the exported VAE is v1's with exactly these statistics folded in (fp16 file)
    from huabi.train.mini_v2 import centred_vae

    expected = centred_vae(load_model(v1_model, compute_hash=False).vae, mean, std).state_dict()
    exported = load_model(run.out_path, compute_hash=False).vae.state_dict()
    for key, value in expected.items():
        torch.testing.assert_close(exported[key], value.half().float(), rtol=0, atol=0)
    with safe_open(str(run.out_path), "pt") as handle:
        assert handle.metadata()["huabi.trained_by"] == "huabi.train mini-v2 --recipe centred"

    # --init-unet: the UNet stage starts from given weights instead of v1
    from huabi.train.common import atomic_torch_save

    start = _tensors(run.out_path)
    weights = recipe.unet_model.build(seed=9).state_dict()
    atomic_torch_save({"state_dict": weights}, tmp_path / "init.pt")
    other = _v2_run(folder, tmp_path / "init", messages)
    run_v2(other, recipe.with_overrides(unet={"steps": 1, "lr": 1e-12}), base_model=v1_model, init_unet=tmp_path / "init.pt")
    assert any("initial weights from" in m for m in messages)
    missing = tmp_path / "nowhere.pt"
    with pytest.raises(HuabiError, match=rf"^--init-unet UNet weights {missing} does not exist$"):
        run_v2(_v2_run(folder, tmp_path / "missing"), recipe, base_model=v1_model, init_unet=missing)
    got = _tensors(other.out_path)
    key = "model.diffusion_model.out.2.weight"
    assert key in got and not torch.equal(got[key], start[key])


def test_v3_recipe_needs_an_emoji_only_folder_and_continues_the_given_unet(folder, v1_files, tmp_path):
    """v3 = v2's UNet continued on the emoji world: a folder of other sources, or no --init-unet,
    is refused before any training; with both it trains from exactly the given weights."""
    from huabi.train.common import atomic_torch_save
    from huabi.train.mini_v2 import MINI_V3, MINI_V4

    v1_model, _ = v1_files
    tiny = tiny_v2_recipe(steps=1, lr=1e-12)
    recipe = MiniV2Recipe(**{**tiny.__dict__, "name": "v3", "sources": MINI_V3.sources, "needs_init_unet": True})
    assert MINI_V3.sources == ("emoji",) and MINI_V3.needs_init_unet and MINI_V3.unet.steps == 9000
    with pytest.raises(HuabiError, match="no metadata.jsonl.*--sources emoji"):  # a hand-made folder
        run_v2(_v2_run(folder, tmp_path / "plain"), recipe, base_model=v1_model)

    def with_metadata(root, sources):
        root.mkdir()
        for i, source in enumerate(sources):
            Image.new("RGB", (48, 48), (200, 40 * i, 30)).save(root / f"{source}-{i}.png")
            (root / f"{source}-{i}.txt").write_text(f"item {i}\n", encoding="utf-8")
        lines = [json.dumps({"file": f"{source}-{i}.png", "source": source}) for i, source in enumerate(sources)]
        (root / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        return root

    mixed = with_metadata(tmp_path / "mixed", ["emoji", "openclipart", "emoji"])
    with pytest.raises(HuabiError, match="holds sources emoji, openclipart.*emoji only"):
        run_v2(_v2_run(mixed, tmp_path / "m"), recipe, base_model=v1_model)
    emoji = with_metadata(tmp_path / "emoji", ["emoji"] * 4)
    # v4's world has no skin-tone variants: a folder with one is refused, naming the build option
    assert not MINI_V4.skin_tone_variants and MINI_V3.skin_tone_variants
    toned = with_metadata(tmp_path / "toned", ["emoji"] * 3)
    lines = (toned / "metadata.jsonl").read_text(encoding="utf-8").splitlines()
    lines[1] = json.dumps({"file": "emoji-1.png", "source": "emoji", "codepoints": "U+1F44B U+1F3FD"})
    (toned / "metadata.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    no_tones = dataclasses.replace(recipe, skin_tone_variants=False)
    with pytest.raises(HuabiError, match="holds 1 skin-tone variants of emoji.*--sources emoji --no-skin-tones"):
        run_v2(_v2_run(toned, tmp_path / "t"), no_tones, base_model=v1_model)
    with pytest.raises(HuabiError, match="continues a trained UNet: pass --init-unet"):
        run_v2(_v2_run(emoji, tmp_path / "e"), recipe, base_model=v1_model)
    weights = recipe.unet_model.build(seed=9).state_dict()
    atomic_torch_save({"state_dict": weights}, tmp_path / "init.pt")
    run = _v2_run(emoji, tmp_path / "e")
    run_v2(run, recipe, base_model=v1_model, init_unet=tmp_path / "init.pt")
    from huabi.models.load import load_model

    exported = load_model(run.out_path, compute_hash=False).unet.state_dict()
    for key, value in weights.items():  # lr 1e-12: the continued UNet is the given one (fp16 file)
        torch.testing.assert_close(exported[key], value.half().float(), rtol=0, atol=1e-3)
    with safe_open(str(run.out_path), "pt") as handle:
        assert handle.metadata()["huabi.trained_by"] == "huabi.train mini-v2 --recipe v3"
        assert "UNet continued from --init-unet" in handle.metadata()["huabi.recipe"]


def test_init_vae_replaces_v1s_vae_in_the_cache_and_the_export(folder, v1_files, tmp_path):
    """--init-vae: the cache encodes with the given VAE at its own latent scale, and the exported
    file carries that VAE and scale; a VAE whose latents the UNet cannot take is refused."""
    from huabi.models.load import load_model
    from huabi.train.cache import load_cache, latent_scaling_factor
    from huabi.train.common import atomic_torch_save, config_dict
    from huabi.train.vae import VAEModelConfig

    v1_model, _ = v1_files
    recipe = tiny_v2_recipe(steps=1)
    v1 = load_model(v1_model, compute_hash=False)
    config = VAEModelConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)  # as v4's VAE
    other = config.build(seed=11)
    atomic_torch_save({"model_config": config_dict(config), "state_dict": other.state_dict()}, tmp_path / "vae.pt")
    run = _v2_run(folder, tmp_path / "run")
    run_v2(run, recipe, base_model=v1_model, init_vae=tmp_path / "vae.pt")
    cache = load_cache(tmp_path / "run" / "state" / "cache")
    assert cache.scaling_factor == pytest.approx(latent_scaling_factor(cache.latents))
    assert cache.scaling_factor != pytest.approx(float(v1.vae.config.scaling_factor))
    exported = load_model(run.out_path, compute_hash=False).vae
    assert float(exported.config.scaling_factor) == pytest.approx(cache.scaling_factor, rel=1e-3)
    assert exported.config.norm_num_groups == 8  # the file marks the group count; the loader builds it
    for key, value in other.state_dict().items():
        torch.testing.assert_close(exported.state_dict()[key], value.half().float(), rtol=0, atol=0)
    run_v2(run, recipe, base_model=v1_model, init_vae=tmp_path / "vae.pt")  # resuming with the same VAE is fine
    run_v2(run, recipe, base_model=v1_model, init_vae=tmp_path / "run" / ".." / "vae.pt")  # the same file, spelled otherwise
    import shutil

    (tmp_path / "clone").mkdir()
    shutil.copy(tmp_path / "vae.pt", tmp_path / "clone" / "vae.pt")
    run_v2(run, recipe, base_model=v1_model, init_vae=tmp_path / "clone" / "vae.pt")  # the same bytes elsewhere (a fresh clone's copy)
    atomic_torch_save({"model_config": config_dict(config), "state_dict": config.build(seed=12).state_dict()}, tmp_path / "clone" / "vae.pt")
    with pytest.raises(HuabiError, match="was encoded with VAE .*vae.pt, not --init-vae .*clone/vae.pt; use a new --state"):
        run_v2(run, recipe, base_model=v1_model, init_vae=tmp_path / "clone" / "vae.pt")
    with pytest.raises(HuabiError, match=r"^--init-vae VAE weights .*nowhere.pt does not exist$"):
        run_v2(run, recipe, base_model=v1_model, init_vae=tmp_path / "nowhere.pt")
    run_v2(_v2_run(folder, tmp_path / "run-v1"), recipe, base_model=v1_model, stages=("base", "cache"))
    with pytest.raises(HuabiError, match="was encoded with VAE v1, not --init-vae"):
        run_v2(_v2_run(folder, tmp_path / "run-v1"), recipe, base_model=v1_model, init_vae=tmp_path / "vae.pt")

    wide = VAEModelConfig(block_out_channels=(32, 32), layers_per_block=1, latent_channels=8)
    atomic_torch_save({"model_config": config_dict(wide), "state_dict": wide.build().state_dict()}, tmp_path / "wide.pt")
    with pytest.raises(HuabiError, match="latents have 8 channels, the UNet layout takes 4"):
        run_v2(_v2_run(folder, tmp_path / "wide"), recipe, base_model=v1_model, init_vae=tmp_path / "wide.pt")


def test_v4_recipe_needs_a_new_vae(folder, v1_files, tmp_path):
    """v4 = v3's world on a new VAE's latents, its UNet warm-started from v1: without --init-vae it
    stops before encoding anything; with it, the export says the UNet was not continued from --init-unet."""
    from huabi.train.mini_v2 import MINI_V3, MINI_V4, RECIPES

    assert RECIPES["v4"] is MINI_V4 and MINI_V4.needs_init_vae and not MINI_V3.needs_init_vae
    assert (MINI_V4.sources, MINI_V4.needs_init_unet, MINI_V4.unet.steps) == (MINI_V3.sources, False, MINI_V3.unet.steps)
    v1_model, _ = v1_files
    recipe = MiniV2Recipe(**{**tiny_v2_recipe(steps=1).__dict__, "name": "v4", "needs_init_vae": True})
    run = _v2_run(folder, tmp_path / "run")
    with pytest.raises(HuabiError, match=r"^recipe v4 encodes with a new VAE: pass --init-vae FILE \(a VAE stage's final.pt\)$"):
        run_v2(run, recipe, base_model=v1_model)
    assert not (run.state_dir / "cache" / "done.json").exists()
    from huabi.train.common import atomic_torch_save, config_dict
    from huabi.train.vae import VAEModelConfig

    config = VAEModelConfig(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8)
    atomic_torch_save({"model_config": config_dict(config), "state_dict": config.build(seed=11).state_dict()}, tmp_path / "vae.pt")
    run_v2(run, recipe, base_model=v1_model, init_vae=tmp_path / "vae.pt")
    with safe_open(str(run.out_path), "pt") as handle:
        warm_start = json.loads(handle.metadata()["huabi.recipe"])["warm_start"]
    assert warm_start == "huabi-mini v1 (8a20066); VAE from --init-vae"


def test_v4_long_continues_the_unet_of_a_checkpoint(folder, v1_files, tmp_path):
    """v4-long adds steps to a trained v4 when its state is gone: --init-unet takes a huabi-mini
    checkpoint (its UNet, exactly), a file of another layout or no file is refused in one line."""
    from huabi.models.load import load_model
    from huabi.train.mini_v2 import MINI_V4, MINI_V4_LONG, RECIPES, load_init_unet

    assert RECIPES["v4-long"] is MINI_V4_LONG and MINI_V4_LONG.needs_init_unet and MINI_V4_LONG.needs_init_vae
    assert (MINI_V4_LONG.sources, MINI_V4_LONG.skin_tone_variants, MINI_V4_LONG.unet_model) == (MINI_V4.sources, False, MINI_V4.unet_model)
    assert MINI_V4_LONG.unet.seed != MINI_V4.unet.seed  # a fresh data order, not a replay
    v1_model, _ = v1_files
    first = _v2_run(folder, tmp_path / "first")
    run_v2(first, tiny_v2_recipe(steps=2), base_model=v1_model)
    recipe = dataclasses.replace(tiny_v2_recipe(steps=1, lr=1e-12), name="v4-long", needs_init_unet=True)
    unet = recipe.unet_model.build(seed=3)
    load_init_unet(unet, first.out_path)
    given = load_model(first.out_path, compute_hash=False).unet.state_dict()
    for key, value in unet.state_dict().items():
        torch.testing.assert_close(value, given[key].float(), rtol=0, atol=0)
    with pytest.raises(HuabiError, match=r"^--init-unet .*mini.safetensors does not hold this recipe's UNet layout: missing \d+ keys, e\.g\. [^;]+$"):
        load_init_unet(recipe.unet_model.build(), v1_model)  # v1: no attention on the first level
    with pytest.raises(HuabiError, match=r"^--init-unet checkpoint .*absent.safetensors does not exist$"):
        load_init_unet(recipe.unet_model.build(), tmp_path / "absent.safetensors")
    second = _v2_run(folder, tmp_path / "second")
    run_v2(second, recipe, base_model=v1_model, init_unet=first.out_path)
    continued = load_model(second.out_path, compute_hash=False).unet.state_dict()
    for key, value in given.items():  # lr 1e-12: the continued UNet is the checkpoint's
        torch.testing.assert_close(continued[key], value, rtol=0, atol=1e-3)
    with safe_open(str(second.out_path), "pt") as handle:
        assert handle.metadata()["huabi.trained_by"] == "huabi.train mini-v2 --recipe v4-long"


@pytest.mark.parametrize("recipe, data, sources, init_unet, init_vae", [
    ("v2", "huabi-mini-128", "emoji,openclipart", None, None),
    ("v3", "huabi-mini-emoji-128", "emoji", "huabi-mini-v2/unet/final.pt", None),
    ("v4", "huabi-mini-emoji-base-128", "emoji --no-skin-tones", None, "training/huabi-mini-v4-vae.pt"),
    ("v4-long", "huabi-mini-emoji-base-128", "emoji --no-skin-tones", None, "training/huabi-mini-v4-vae.pt"),
])
def test_the_launcher_builds_its_recipes_data_and_passes_its_defaults(tmp_path, recipe, data, sources, init_unet, init_vae):
    """scripts/train_mini_v2.sh with a stand-in python that records its calls: the dataset each
    recipe needs is built, v3 starts from v2's UNet, v4 encodes with the repository's 8-group VAE unless told otherwise."""
    import os
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "train_mini_v2.sh"
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f'#!/usr/bin/env bash\necho "$*" >> {calls}\n', encoding="utf-8")
    fake.chmod(0o755)
    env = {**os.environ, "HOME": str(tmp_path), "HUABI_PYTHON": str(fake), "HUABI_TRAIN_RECIPE": recipe}
    env.pop("HUABI_TRAIN_DATA", None)
    env.pop("HUABI_TRAIN_STATE", None)
    done = subprocess.run(["bash", str(script), "--steps", "unet=5"], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    build, train = calls.read_text(encoding="utf-8").splitlines()
    data_dir = tmp_path / ".cache" / "huabi" / "data" / data
    assert build.startswith(f"-m huabi.data.build --out {data_dir} --size 128 --sources {sources} ")
    assert train.startswith(f"-m huabi.train mini-v2 --recipe {recipe} --data {data_dir} ")
    assert train.endswith("--steps unet=5")
    train_dir = tmp_path / ".cache" / "huabi" / "train"
    given = f"--init-unet {train_dir / init_unet} " if init_unet else ""
    given += f"--init-vae {script.parents[1] / init_vae} " if init_vae else ""
    assert train.endswith(f"{given}--steps unet=5")
    assert ("--init-unet" in train) == bool(init_unet) and ("--init-vae" in train) == bool(init_vae)
