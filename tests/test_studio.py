"""The public API (huabi.Studio), one job entry point, progress events, cancellation, and
`edit --instruct --control` applying its ControlNet."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from diffusers import ControlNetModel
from PIL import Image

import huabi
from huabi.cli.main import main
from huabi.core.infotext import parse_infotext
from huabi.errors import HuabiError
from huabi.models.controlnet import save_controlnet_original
from huabi.models.family import ModelFamily, UNetVariant
from huabi.models.load import load_model
from huabi.service.engine import Engine, Job
from huabi.service.pngio import read_infotext
from huabi.service.progress import Cancellation, ProgressEvent
from test_img2img import gradient_image
from tiny_models import randomize_

FAST = dict(steps=3, size=(64, 64), sampler="Euler")


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_sd1_file):
    return huabi.Studio(models_dir=tmp_path_factory.mktemp("models"), device="cpu", dtype="fp32")


def test_import_huabi_is_light_and_exposes_the_api():
    code = "import sys, huabi; assert 'torch' not in sys.modules, 'torch at import'; print(sorted(huabi.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for name in ("Studio", "GeneratedImage", "ProgressEvent", "Cancellation", "GenerationRequest"):
        assert name in out
    with pytest.raises(AttributeError):
        huabi.NoSuchThing  # noqa: B018


def test_three_lines_generate_match_the_cli_bytes(studio, tiny_sd1_file, tmp_path, capsys):
    [made] = studio.generate("a red apple", seed=7, model=str(tiny_sd1_file), **FAST)
    assert isinstance(made.image, Image.Image) and made.seed == 7 and made.path is None
    assert made.infotext.startswith("a red apple\nSteps: 3, Sampler: Euler")
    assert main(["generate", "a red apple", "--seed", "7", "--model", str(tiny_sd1_file), "--steps", "3",
                 "--size", "64x64", "--sampler", "Euler", "--out", str(tmp_path), "--quiet"]) == 0
    [path] = capsys.readouterr().out.split()
    assert np.array_equal(pixels(Image.open(path)), pixels(made.image))
    assert read_infotext(path) == made.infotext


def test_edit_hires_lora_and_errors_are_arguments_of_the_same_call(studio, tiny_sd1_file, tmp_path):
    init = gradient_image(64, 64)
    plain = studio.generate("a watercolour", init_image=init, strength=0.6, seed=3, model=str(tiny_sd1_file),
                            steps=3, sampler="Euler", out_dir=tmp_path)[0]
    assert plain.path is not None and plain.path.parent == tmp_path
    assert parse_infotext(plain.infotext).params["Denoising strength"] == "0.6"
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = studio.generate("a hat", init_image=init, mask=mask, seed=3, model=str(tiny_sd1_file),
                                steps=3, sampler="Euler")[0]
    kept = pixels(inpainted.image)[:8, :8]
    assert np.array_equal(kept, pixels(init)[:8, :8])  # outside the (blurred) mask: the original pixels
    [big] = studio.generate("a castle", seed=3, model=str(tiny_sd1_file), hires=True, hires_scale=1.5,
                            hires_steps=2, steps=2, size=(64, 64))
    assert big.image.size == (96, 96)
    with pytest.raises(HuabiError, match=r"^generate: unknown argument 'stepz'"):
        studio.generate("x", stepz=3)
    with pytest.raises(HuabiError, match=r"^edit: mask needs an init_image"):
        studio.generate("x", mask=mask)


def test_events_count_the_whole_job_with_phases_and_previews(studio, tiny_sd1_file):
    events: list[ProgressEvent] = []
    studio.generate("a castle", seed=3, model=str(tiny_sd1_file), hires=True, hires_scale=1.5, hires_steps=2,
                    steps=3, size=(64, 64), batch_count=2, on_event=events.append)
    assert [(e.step, e.total, e.batch, e.batch_count) for e in events] == [
        (step, 10, (step - 1) // 5, 2) for step in range(1, 11)]
    assert [e.phase for e in events[:5]] == ["first pass"] * 3 + ["hires"] * 2
    assert events[0].latent.shape == (1, 4, 8, 8) and events[-1].latent.shape == (1, 4, 12, 12)
    preview = events[-1].preview()
    assert isinstance(preview, Image.Image) and preview.size == (12, 12)


def test_refiner_phase_is_reported(tiny_sdxl_file, tiny_model_factory):
    refiner = tiny_model_factory(ModelFamily.SDXL_REFINER)
    events: list[ProgressEvent] = []
    engine = Engine(device="cpu", dtype="fp32")
    request = huabi.GenerationRequest("a lighthouse", steps=4, seed=2, width_px=64, height_px=64, sampler="Euler",
                                      model=str(tiny_sdxl_file), refiner=str(refiner), refiner_switch_at=0.5)
    engine.run(Job(request), on_event=events.append)
    phases = [e.phase for e in events]
    assert phases[0] == "first pass" and phases[-1] == "refiner" and sorted(set(phases)) == ["first pass", "refiner"]


def test_interrupt_stops_after_the_current_step_and_skip_ends_one_batch(studio, tiny_sd1_file):
    cancel = Cancellation()
    seen: list[ProgressEvent] = []

    def interrupt_at_two(event: ProgressEvent) -> None:
        seen.append(event)
        if event.step == 2:
            cancel.interrupt()

    made = studio.generate("a cat", seed=5, model=str(tiny_sd1_file), steps=4, size=(64, 64), batch_count=3,
                           on_event=interrupt_at_two, cancel=cancel)
    assert [e.step for e in seen] == [1, 2] and len(made) == 1  # the batch is decoded as it is; no more batches
    full = studio.generate("a cat", seed=5, model=str(tiny_sd1_file), steps=4, size=(64, 64))[0]
    assert not np.array_equal(pixels(made[0].image), pixels(full.image))

    cancel = Cancellation()
    seen.clear()

    def skip_first_batch(event: ProgressEvent) -> None:
        seen.append(event)
        if event.batch == 0 and event.step == 1:
            cancel.skip()

    made = studio.generate("a cat", seed=5, model=str(tiny_sd1_file), steps=4, size=(64, 64), batch_count=2,
                           on_event=skip_first_batch, cancel=cancel)
    assert len(made) == 2 and [e.batch for e in seen] == [0, 1, 1, 1, 1]
    second_alone = studio.generate("a cat", seed=6, model=str(tiny_sd1_file), steps=4, size=(64, 64))[0]
    assert np.array_equal(pixels(made[1].image), pixels(second_alone.image))  # the next batch is untouched


# ------------------------------------------------------------- edit --instruct --control


@pytest.fixture(scope="module")
def instruct_setup(tmp_path_factory, tiny_model_factory):
    root = tmp_path_factory.mktemp("ip2p_cn")
    model = tiny_model_factory(ModelFamily.SD1, UNetVariant.INSTRUCT_PIX2PIX)
    base = load_model(tiny_model_factory(ModelFamily.SD1), compute_hash=False)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    randomize_(controlnet, torch.Generator().manual_seed(9))
    save_controlnet_original(controlnet, root / "models" / "ControlNet" / "tiny_cn.safetensors")
    image = root / "image.png"
    gradient_image(64, 64).save(image)
    picture = np.zeros((64, 64, 3), dtype=np.uint8)
    picture[16:48, 16:48] = 255
    control = root / "control.png"
    Image.fromarray(picture).save(control)
    other = root / "other.png"
    Image.fromarray(np.roll(picture, (9, -13), axis=(0, 1))).save(other)
    return model, root, image, control, other


def test_instruct_edit_applies_its_controlnet(instruct_setup, tmp_path, capsys):
    model, root, image, control, other = instruct_setup

    def edit(out, *extra):
        argv = ["edit", str(image), "make it snowy", "--instruct", "--model", str(model), "--models-dir",
                str(root / "models"), "--steps", "3", "--seed", "4", "--sampler", "Euler", "--out", str(out),
                "--quiet", *extra]
        assert main(argv) == 0, capsys.readouterr().err
        [path] = capsys.readouterr().out.split()
        return path

    plain = edit(tmp_path / "plain")
    controlled = edit(tmp_path / "a", "--controlnet", "tiny_cn", "--control-image", str(control))
    moved = edit(tmp_path / "b", "--controlnet", "tiny_cn", "--control-image", str(other))
    zero = edit(tmp_path / "c", "--controlnet", "tiny_cn", "--control-image", str(control), "--control-weight", "0")
    a, b, p = (pixels(Image.open(x)) for x in (controlled, moved, plain))
    assert not np.array_equal(a, p)  # the ControlNet changes the edit ...
    assert not np.array_equal(a, b)  # ... and so does what its image shows
    assert np.array_equal(pixels(Image.open(zero)), p)  # weight 0 is the plain edit exactly
    assert "ControlNet 0" in parse_infotext(read_infotext(controlled)).params
