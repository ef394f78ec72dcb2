"""User training on tiny models: outputs load in huabi and diffusers, resume is exact, bad input fails cleanly.

Equivalence (measured here, float32 files): a trained LoRA applied by huabi's loader gives
the UNet output of the training network's own forward hooks to < 1e-5 relative, and the
weights diffusers' ``load_lora_weights`` + ``fuse_lora`` make equal huabi's to < 1e-6, for
SD1 and SDXL. Textual-inversion files load in diffusers' ``load_textual_inversion`` with
the trained vectors and give the trainer's own text conditioning.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from huabi.errors import HuabiError
from huabi.models.family import ModelFamily
from huabi.models.load import load_model
from huabi.train.user_config import UserTrainConfig, read_toml_config
from huabi.train.user_train import LatentCache, TextCache, UserTrainer, module_digest

REPO = Path(__file__).resolve().parents[1]


def make_dataset(root: Path, count: int = 3) -> Path:
    group = root / "data" / "4_zq style"
    group.mkdir(parents=True, exist_ok=True)
    sizes = [(64, 64), (96, 64), (64, 128), (80, 80)]
    for i in range(count):
        image = Image.new("RGB", sizes[i % len(sizes)], (40 + 60 * i, 200 - 50 * i, 90))
        for x in range(0, image.width, 8):  # stripes: something to learn
            for y in range(image.height):
                image.putpixel((x, y), (250, 250, 250))
        image.save(group / f"img{i}.png")
    (group / "img0.txt").write_text("zq style, stripes", encoding="utf-8")
    return root / "data"


def config_for(tmp_path: Path, model: Path, **changes) -> UserTrainConfig:
    values = dict(mode="lora", train_data_dir=str(make_dataset(tmp_path)), output=str(tmp_path / "out" / "zq.safetensors"),
                  model=str(model), resolution=64, min_bucket_reso=64, max_train_steps=3, train_batch_size=1,
                  network_dim=4, network_alpha=2.0, learning_rate=1e-2, caption_extension=".txt", save_precision="float")
    values.update(changes)
    return UserTrainConfig(**values)


def quiet(config: UserTrainConfig) -> UserTrainer:
    return UserTrainer(config, log=lambda message: None, progress=False)


def unet_probe(bundle, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    sample = torch.randn(1, 4, 8, 8, generator=generator)
    width = bundle.unet.config.cross_attention_dim
    context = torch.randn(1, 77, width, generator=generator)
    added = None
    if bundle.family is ModelFamily.SDXL:
        pooled_width = bundle.unet.config.projection_class_embeddings_input_dim - 6 * bundle.unet.config.addition_time_embed_dim
        added = {"text_embeds": torch.randn(1, pooled_width, generator=generator),
                 "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]])}
    with torch.no_grad():
        return bundle.unet(sample, torch.tensor([500]), encoder_hidden_states=context, added_cond_kwargs=added).sample


def text_probe(bundle):
    ids = bundle.tokenizers[0](["zq style, a red circle"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        return bundle.text_encoders[0](input_ids=ids).last_hidden_state


def relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max())


# ---------------------------------------------------------------- LoRA files in huabi and diffusers


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_lora_file_loads_in_huabi_and_diffusers(family, tiny_model_factory, tmp_path):
    from test_lora import _diffusers_pipe, all_tensors, max_difference

    from huabi.service.adapters import LoraPatcher, LoraUse

    model = tiny_model_factory(ModelFamily(family))
    trainer = quiet(config_for(tmp_path, model))
    result = trainer.run()
    assert result.steps == 3
    trained_unet, trained_text = unet_probe(trainer.bundle), text_probe(trainer.bundle)  # the hooks' forward

    ours = load_model(model, compute_hash=False)
    base_unet = unet_probe(ours)
    LoraPatcher().activate(ours, [LoraUse("zq", result.output)])
    patched_unet, patched_text = unet_probe(ours), text_probe(ours)
    assert relative(patched_unet, trained_unet) < 1e-5
    assert relative(patched_text, trained_text) < 1e-5
    assert relative(patched_unet, base_unet) > 1e-3  # the LoRA does change the model

    theirs = load_model(model, compute_hash=False)
    pipe = _diffusers_pipe(theirs)
    pipe.load_lora_weights(str(result.output))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    assert max_difference(all_tensors(ours), all_tensors(theirs)) < 1e-6


@pytest.mark.parametrize(("kind", "family"), [("locon", "sd1"), ("loha", "sd1"), ("lokr", "sd1"), ("oft", "sd1"), ("lora", "sd2"),
                                              ("lora", "huabi_mini")])
def test_lycoris_kinds_and_families_round_trip_through_huabi(kind, family, tiny_model_factory, tmp_path):
    from huabi.models.family import Prediction
    from huabi.service.adapters import LoraPatcher, LoraUse

    prediction = Prediction.V if family == "sd2" else Prediction.EPSILON  # SD2-768-v: the v-prediction target
    tiny_sd1_file = tiny_model_factory(ModelFamily(family), prediction=prediction)
    trainer = quiet(config_for(tmp_path, tiny_sd1_file, network_module=kind, network_alpha=0.5 if kind == "oft" else 2.0,
                               max_train_steps=2, network_train_unet_only=True))
    result = trainer.run()
    keys = set(load_file(result.output))
    suffix = {"locon": ".lora_down.weight", "lora": ".lora_down.weight", "loha": ".hada_w1_a", "lokr": ".lokr_w1",
              "oft": ".oft_diag"}[kind]
    assert any(k.endswith(suffix) for k in keys)
    if kind == "locon":
        assert any("resnets" in k and k.endswith("conv1.lora_down.weight") for k in keys)
    trained = unet_probe(trainer.bundle)
    ours = load_model(tiny_sd1_file, compute_hash=False)
    base = unet_probe(ours)
    LoraPatcher().activate(ours, [LoraUse("zq", result.output)])
    assert relative(unet_probe(ours), trained) < 1e-5
    assert relative(trained, base) > 1e-4


def test_oft_rotation_is_orthogonal_and_constrained():
    from huabi.train.networks import cayley_rotation

    blocks = torch.randn(3, 4, 4)
    rotation = cayley_rotation(blocks, constraint=0.0)
    eye = torch.eye(4).expand(3, 4, 4)
    assert torch.allclose(rotation @ rotation.transpose(1, 2), eye, atol=1e-5)
    small = cayley_rotation(blocks * 100, constraint=0.01)  # ||Q|| clamped to 0.01: R stays close to I
    assert (small - eye).norm() < 0.03
    assert torch.allclose(small @ small.transpose(1, 2), eye, atol=1e-5)


def test_metadata_keys_present_and_parseable(tiny_sd1_file, tmp_path):
    from huabi.models.inspect import format_inspection, inspect_file
    from huabi.models.lora import lora_short_hash

    result = quiet(config_for(tmp_path, tiny_sd1_file, max_train_steps=1, shuffle_caption=True, keep_tokens=1)).run()
    with safe_open(str(result.output), "pt") as handle:
        meta = handle.metadata()
    for key in ("ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_base_model_version", "ss_output_name",
                "ss_resolution", "ss_num_train_images", "ss_max_train_steps", "ss_learning_rate", "ss_sd_model_name",
                "ss_mixed_precision", "ss_seed", "ss_enable_bucket", "modelspec.sai_model_spec", "modelspec.architecture",
                "modelspec.title", "sshs_model_hash"):
        assert meta.get(key), key
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "2.0"
    assert meta["ss_base_model_version"] == "sd_v1" and meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert json.loads(meta["ss_tag_frequency"]) == {"4_zq style": {"zq style": 3, "stripes": 1}}
    assert json.loads(meta["ss_dataset_dirs"]) == {"4_zq style": {"n_repeats": 4, "img_count": 3}}
    buckets = json.loads(meta["ss_bucket_info"])["buckets"]
    assert sum(b["count"] for b in buckets.values()) == 12
    assert json.loads(meta["ss_network_args"]) == {"algo": "lora"}
    # A1111's LoRA hash: sshs_model_hash equals the file's own AutoV3 hash
    assert lora_short_hash(result.output, meta) == lora_short_hash(result.output, {})
    report = format_inspection(inspect_file(result.output, with_hashes=False))
    assert "training: steps 1; images (with repeats) 12; resolution (64, 64)" in report
    assert "trigger words: zq style, stripes" in report


# ---------------------------------------------------------------- textual inversion


def test_textual_inversion_sd1_loads_in_diffusers(tiny_sd1_file, tmp_path):
    from test_lora import _diffusers_pipe

    from huabi.train.user_train import encode_captions

    config = config_for(tmp_path, tiny_sd1_file, mode="textual-inversion", token_string="zqtok", init_word="style",
                        num_vectors_per_token=2, learning_rate=5e-2)
    trainer = quiet(config)
    result = trainer.run()
    tensors = load_file(result.output)
    base = load_model(tiny_sd1_file, compute_hash=False)
    width = base.text_encoders[0].config.hidden_size
    assert set(tensors) == {"emb_params"} and tensors["emb_params"].shape == (2, width)
    base.tokenizers = [copy.deepcopy(t) for t in base.tokenizers]  # diffusers adds tokens to the tokenizer it gets
    init_row = base.text_encoders[0].get_input_embeddings().weight[base.tokenizers[0]("style", add_special_tokens=False).input_ids[0]]
    assert not torch.allclose(tensors["emb_params"][0], init_row)  # trained away from the init word
    pipe = _diffusers_pipe(base)
    pipe.load_textual_inversion(str(result.output), token="zqtok")
    rows = pipe.tokenizer.convert_tokens_to_ids(["zqtok", "zqtok_1"])
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight[rows], tensors["emb_params"])
    with torch.no_grad():
        ours, _ = encode_captions(trainer.bundle, ["a zqtok zqtok_1 drawing"], torch.device("cpu"))
        ids = pipe.tokenizer(["a zqtok zqtok_1 drawing"], padding="max_length", max_length=77, return_tensors="pt").input_ids
        theirs = pipe.text_encoder(ids).last_hidden_state
    assert relative(ours, theirs) < 1e-5


def test_textual_inversion_sdxl_writes_clip_l_and_clip_g(tiny_sdxl_file, tmp_path):
    from huabi.models.embeddings import embedding_for_model, read_embedding_file, text_encoder_widths

    result = quiet(config_for(tmp_path, tiny_sdxl_file, mode="textual-inversion", token_string="zqtok", max_train_steps=2)).run()
    tensors = load_file(result.output)
    assert set(tensors) == {"clip_l", "clip_g"}
    bundle = load_model(tiny_sdxl_file, compute_hash=False)
    vectors = embedding_for_model(result.output, read_embedding_file(result.output), bundle.family,
                                  text_encoder_widths(bundle.text_encoders))
    assert [v.shape[-1] for v in vectors] == text_encoder_widths(bundle.text_encoders)


def test_textual_inversion_refuses_an_existing_token(tiny_sd1_file, tmp_path):
    with pytest.raises(HuabiError, match="is already a token"):
        quiet(config_for(tmp_path, tiny_sd1_file, mode="textual-inversion", token_string="<|endoftext|>")).run()


# ---------------------------------------------------------------- learning, resume


def test_loss_decreases(tiny_sd1_file, tmp_path):
    config = config_for(tmp_path, tiny_sd1_file, max_train_steps=16, learning_rate=3e-3, network_dim=8, network_alpha=8.0)
    trainer = quiet(config)
    trainer.started_at = 0
    trainer.setup()

    def held_out_loss() -> float:  # the same 6 (image, timestep, noise) draws before and after
        with torch.no_grad():
            return sum(float(trainer.micro_loss(10_000 + k)[0]) for k in range(6)) / 6

    before = held_out_loss()
    trainer.train()
    after = held_out_loss()
    print(f"held-out loss {before:.4f} -> {after:.4f}")
    assert after < 0.9 * before


def _network_tensors(trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.network.state_dict().items()}


def test_resume_after_stop_and_after_crash_is_exact(tiny_sd1_file, tmp_path):
    settings = dict(max_train_steps=6, train_batch_size=2, shuffle_caption=True, caption_dropout_rate=0.3,
                    network_dropout=0.1, noise_offset=0.05, min_snr_gamma=5.0, lr_scheduler="cosine", lr_warmup_steps=2,
                    gradient_accumulation_steps=2)
    straight = quiet(config_for(tmp_path / "a", tiny_sd1_file, **settings))
    straight.run()
    expected = _network_tensors(straight)

    # polite stop (what SIGTERM/SIGINT do): state saved at once, the re-run continues
    config = config_for(tmp_path / "b", tiny_sd1_file, **settings)
    done: list[int] = []
    with pytest.raises(Exception, match="stopped at step 3"):
        quiet(config).run(should_stop=lambda: bool(done) and done[-1] >= 3, on_step=lambda step, loss: done.append(step))
    second = quiet(config)
    second.run()
    for key, value in expected.items():
        assert torch.equal(_network_tensors(second)[key], value), key

    # crash (kill): nothing saved after the last --save-every-n-steps state; steps 5.. are redone
    config = config_for(tmp_path / "c", tiny_sd1_file, save_every_n_steps=2, **settings)

    def crash(step, loss):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        quiet(config).run(on_step=crash)
    assert torch.load(config.state_dir / "state.pt", weights_only=True)["step"] == 4
    assert (Path(config.output).parent / "zq-step000004.safetensors").exists()  # the intermediate LoRA
    resumed = quiet(config)
    resumed.run()
    for key, value in expected.items():
        assert torch.equal(_network_tensors(resumed)[key], value), key


def _cli(args, env_extra=None, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.update(env_extra or {})
    return subprocess.Popen([sys.executable, "-m", "huabi.train", *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, **kwargs)


def _wait_for(predicate, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_cli_interrupted_by_signal_resumes_to_the_same_weights(how, tiny_sd1_file, tmp_path):
    data = make_dataset(tmp_path)
    args = ["lora", str(data), "--model", str(tiny_sd1_file), "--output", str(tmp_path / "run" / "zq.safetensors"),
            "--resolution", "64", "--min-bucket-reso", "64", "--max-train-steps", "8", "--network-dim", "4",
            "--network-alpha", "2", "--learning-rate", "1e-2", "--caption-extension", ".txt", "--save-precision", "float",
            "--save-every-n-steps", "2", "--threads", "1", "--shuffle-caption"]
    state = tmp_path / "run" / "zq.state" / "state.pt"
    process = _cli(args)
    assert _wait_for(lambda: state.exists() or process.poll() is not None)
    assert process.poll() is None, process.stderr.read().decode()
    process.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGKILL)
    _out, err = process.communicate(timeout=240)
    if how == "SIGTERM":
        assert process.returncode == 143, err.decode()
        assert "re-run the same command to resume" in err.decode()
    else:
        assert process.returncode == -signal.SIGKILL
    stopped_at = torch.load(state, weights_only=True)["step"]
    assert 2 <= stopped_at < 8
    again = _cli(args)
    out, err = again.communicate(timeout=600)
    assert again.returncode == 0, err.decode()
    assert f"resumed from {state} at step {stopped_at}/8" in err.decode()

    torch.set_num_threads(1)
    reference = quiet(config_for(tmp_path / "ref", tiny_sd1_file, max_train_steps=8, shuffle_caption=True)).run()
    resumed, straight = load_file(out.decode().strip()), load_file(reference.output)
    assert resumed.keys() == straight.keys()
    assert max(float((resumed[k] - straight[k]).abs().max()) for k in resumed) < 1e-6


# ---------------------------------------------------------------- caches


def test_latent_cache_invalidates_on_changed_image_or_vae(tiny_sd1_file, tmp_path):
    from huabi.train.dataset import scan_dataset

    bundle = load_model(tiny_sd1_file, compute_hash=False)
    entry = scan_dataset(make_dataset(tmp_path, count=1)).entries[0]
    digest = module_digest(bundle.vae)
    cache = LatentCache(bundle.vae, digest, tmp_path / "cache", torch.device("cpu"))
    first = cache.get(entry, 64, 64)
    assert (cache.misses, cache.hits) == (1, 0)
    again = LatentCache(bundle.vae, digest, tmp_path / "cache", torch.device("cpu"))
    assert torch.equal(again.get(entry, 64, 64), first) and (again.misses, again.hits) == (0, 1)
    again.get(entry, 64, 128)  # another bucket is another latent
    assert again.misses == 1
    Image.new("RGB", (64, 64), (1, 2, 3)).save(entry.path)  # the image changed
    changed = LatentCache(bundle.vae, digest, tmp_path / "cache", torch.device("cpu"))
    assert not torch.equal(changed.get(entry, 64, 64), first) and changed.misses == 1
    with torch.no_grad():
        bundle.vae.encoder.conv_in.weight.mul_(1.5)  # the VAE changed
    new_digest = module_digest(bundle.vae)
    assert new_digest != digest
    other = LatentCache(bundle.vae, new_digest, tmp_path / "cache", torch.device("cpu"))
    other.get(entry, 64, 64)
    assert (other.misses, other.hits) == (1, 0)


def test_text_cache_key_follows_encoder_weights():
    calls = []

    def encode(captions):
        calls.append(list(captions))
        return torch.ones(len(captions), 77, 8), None

    cache = TextCache(encode, "digest-a")
    cache.get(["a", "b", "a"])
    cache.get(["b"])
    assert calls == [["a", "b"]]
    assert TextCache(encode, "digest-b").key("a") != cache.key("a")


# ---------------------------------------------------------------- finetune, dreambooth, samples


def test_finetune_writes_a_loadable_checkpoint_with_ema_weights(tiny_sd1_file, tmp_path):
    config = config_for(tmp_path, tiny_sd1_file, mode="finetune", max_train_steps=2, learning_rate=1e-3, ema_decay=0.5)
    trainer = quiet(config)
    result = trainer.run()
    loaded = load_model(result.output, compute_hash=False)
    shadow = trainer.ema.shadow
    for key, value in loaded.unet.state_dict().items():
        assert torch.allclose(value.float(), shadow[key].half().float(), atol=1e-3), key
    trained = dict(trainer.bundle.unet.state_dict())
    assert any(not torch.equal(trained[k], shadow[k]) for k in shadow)  # EMA differs from the last weights


def test_dreambooth_generates_class_images_and_weights_the_prior(tiny_sd1_file, tmp_path):
    reg = tmp_path / "reg"
    config = config_for(tmp_path, tiny_sd1_file, mode="dreambooth", reg_data_dir=str(reg), class_prompt="a drawing",
                        num_class_images=2, prior_loss_weight=0.5, max_train_steps=2, class_tokens="zq drawing")
    trainer = quiet(config)
    trainer.run()
    assert sorted(p.name for p in reg.iterdir()) == ["class_00000.caption", "class_00000.png", "class_00001.caption", "class_00001.png"]
    regs = [e for e in trainer.dataset.entries if e.is_reg]
    assert len(regs) == 2 and regs[0].caption == "a drawing"
    assert sum(r for e, r in zip(trainer.dataset.entries, trainer.repeats) if e.is_reg) == 12  # as many as training images
    with safe_open(config.output, "pt") as handle:
        meta = handle.metadata()
    assert meta["ss_num_reg_images"] == "2" and meta["ss_prior_loss_weight"] == "0.5"


def test_sample_images_with_kohya_prompt_flags(tiny_sd1_file, tmp_path):
    from huabi.train.samples import parse_prompt_line

    assert parse_prompt_line("zq style cat --n blurry, text --w 64 --h 128 --d 7 --s 5 --l 4.5") == \
        parse_prompt_line("zq style cat --n blurry, text --w 64 --h 128 --d 7 --s 5 --l 4.5")
    item = parse_prompt_line("zq style cat --n blurry, text --w 64 --h 128 --d 7 --s 5 --l 4.5")
    assert (item.prompt, item.negative_prompt, item.width_px, item.height_px, item.seed, item.steps, item.cfg_scale) == \
        ("zq style cat", "blurry, text", 64, 128, 7, 5, 4.5)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\nzq style --w 64 --h 64 --d 3 --s 4 --l 5\n", encoding="utf-8")
    config = config_for(tmp_path, tiny_sd1_file, max_train_steps=2, sample_every_n_steps=2, sample_prompts=str(prompts))
    quiet(config).run()
    sample = Path(config.output).parent / "sample" / "zq_000002_00.png"
    with Image.open(sample) as image:
        assert image.size == (64, 64)
        text = image.info["parameters"]
    assert "<lora:zq:1>" in text and "Seed: 3" in text and "Steps: 4" in text and "CFG scale: 5" in text


# ---------------------------------------------------------------- bad input


def _run_cli(args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "huabi.train", *args], env=env, capture_output=True, text=True, timeout=300)


def test_cli_bad_input_one_line_errors(tiny_sd1_file, tmp_path):
    data = make_dataset(tmp_path)
    out = tmp_path / "o" / "x.safetensors"
    base = ["--model", str(tiny_sd1_file), "--output", str(out), "--resolution", "64", "--min-bucket-reso", "64",
            "--max-train-steps", "1"]
    (tmp_path / "empty").mkdir()
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    cases = [
        (["lora", str(tmp_path / "empty"), *base], "has no readable images"),
        (["lora", str(data), *base, "--network-dim", "0"], "network-dim (rank) must be an integer > 0, got 0"),
        (["lora", str(data), *base, "--resolution", "100"], "resolution must be a multiple of 64, got 100"),
        (["lora", str(data), "--model", str(junk), "--output", str(out), "--resolution", "64"], "base model"),
    ]
    for args, message in cases:
        result = _run_cli(args)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and message in lines[-1], result.stderr
        assert "Traceback" not in result.stderr
        assert not out.exists()


def test_no_image_in_any_bucket_and_resume_from_another_config(tiny_sd1_file, tmp_path):
    group = tmp_path / "tall" / "1_x"
    group.mkdir(parents=True)
    Image.new("RGB", (8, 160)).save(group / "a.png")
    config = config_for(tmp_path, tiny_sd1_file, train_data_dir=str(tmp_path / "tall"), min_bucket_reso=64,
                        max_bucket_aspect_error=0.01)
    with pytest.raises(HuabiError, match="no images in any bucket"):
        quiet(config).run()
    assert not Path(config.output).exists()
    config = config_for(tmp_path / "r", tiny_sd1_file, max_train_steps=1)
    quiet(config).run()
    changed = dataclasses.replace(config, network_dim=8, max_train_steps=2)
    with pytest.raises(HuabiError, match=r"resume state .* was made with a different config: network-dim=4, now 8"):
        quiet(changed).run()


def test_toml_config_equals_flags(tmp_path):
    from huabi.train.user_cli import config_from_args

    toml = tmp_path / "c.toml"
    toml.write_text('[model_arguments]\npretrained_model_name_or_path = "m.safetensors"\n'
                    '[training]\nnetwork_dim = 16\nnetwork-alpha = 8.0\nmax_train_steps = 10\nshuffle_caption = true\n'
                    'output = "x.safetensors"\n', encoding="utf-8")
    from_file, _ = config_from_args("lora", ["data", "--config", str(toml)])
    from_flags, _ = config_from_args("lora", ["data", "--model", "m.safetensors", "--network-dim", "16", "--network-alpha", "8",
                                              "--max-train-steps", "10", "--shuffle-caption", "--output", "x.safetensors"])
    assert from_file == from_flags
    overridden, _ = config_from_args("lora", ["data", "--config", str(toml), "--network-dim", "4"])
    assert overridden.network_dim == 4
    toml.write_text("network_dimm = 3\n", encoding="utf-8")
    with pytest.raises(HuabiError, match="unknown setting 'network_dimm'"):
        read_toml_config(toml)
