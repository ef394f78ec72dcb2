"""The user-training demonstration on huabi-mini, all offline.

    PYTHONPATH=src .venv/bin/python scripts/demo_user_training.py [--work DIR] [--lora-steps N] [--ti-steps N] [--out docs/images]

1. A concept huabi-mini has never seen: "zqx quilt", pictures drawn by a deterministic
   program (zigzag bands in magenta/teal on yellow with a black disc; band width, phase and
   disc position vary with the seed). 12 training images; 12 more (other seeds) are the
   held-out reference the results are measured against.
2. Trained: a LoRA (``huabi train lora``) and a textual inversion (``huabi train
   textual-inversion``, token ``zqxquilt``), both through the same code path as the CLI.
3. Measured, on prompts and seeds fixed here in advance (2 prompts x 4 seeds, Euler a, 20
   steps, CFG 7): the cosine similarity of huabi-mini's own CLIP image tower
   (huabi-mini-clip) between each generated image and the mean of the held-out concept
   images, and a fixed pixel feature (16x16 area thumbnails: L2 distance to the nearest
   held-out image). Before (base model, same prompts) vs after.
4. DreamBooth drift: two DreamBooth LoRAs on the same images with instance prompt
   "zqx flag", one with prior preservation (class prompt "a flag", class images generated
   by the base model), one without. Drift = how far images of class prompts ("a flag",
   "a red flag") move from the base model's images at the same
   seeds (image-tower cosine distance and thumbnail L2).

Writes ``train_demo_grid.png`` and ``train_demo.json`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

PROMPTS = ("zqx quilt", "a picture of zqx quilt")
TI_PROMPTS = tuple(p.replace("zqx quilt", "zqxquilt") for p in PROMPTS)
CLASS_PROMPTS = ("a flag", "a red flag")
SEEDS = (1000, 1001, 1002, 1003)


def draw_concept(seed: int, size: int = 128) -> Image.Image:
    rng = random.Random(seed)
    image = Image.new("RGB", (size, size), (250, 215, 40))
    draw = ImageDraw.Draw(image)
    band = rng.randint(10, 16)
    phase = rng.randint(0, band * 2)
    amplitude = rng.randint(6, 12)
    for index, top in enumerate(range(-2 * band + phase % band, size + band, band)):
        color = (220, 30, 160) if index % 2 == 0 else (20, 160, 160)
        points = [(x, top + (amplitude if (x // 12) % 2 else 0)) for x in range(0, size + 12, 12)]
        lower = [(x, y + band // 2) for x, y in reversed(points)]
        draw.polygon(points + lower, fill=color)
    radius = rng.randint(14, 22)
    cx, cy = rng.randint(radius + 4, size - radius - 4), rng.randint(radius + 4, size - radius - 4)
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=(15, 15, 15))
    return image


def write_dataset(folder: Path, seeds, caption_folder: str) -> None:
    group = folder / caption_folder
    group.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        draw_concept(seed).save(group / f"zqx_{seed}.png")


def generate(model: Path, prompts, out: Path, *, lora: Path | None = None, embedding: Path | None = None) -> list[Image.Image]:
    from huabi.train.samples import SamplePrompt, generate_with_engine

    models_dir = out / "models"
    if lora is not None:
        (models_dir / "Lora").mkdir(parents=True, exist_ok=True)
        (models_dir / "Lora" / lora.name).write_bytes(lora.read_bytes())
    embeddings = None
    if embedding is not None:
        embeddings = out / "embeddings"
        embeddings.mkdir(parents=True, exist_ok=True)
        (embeddings / embedding.name).write_bytes(embedding.read_bytes())
    items = []
    for prompt in prompts:
        text = f"{prompt} <lora:{lora.stem}:1>" if lora is not None else prompt
        items.extend(SamplePrompt(text, seed=seed, steps=20, cfg_scale=7.0) for seed in SEEDS)
    paths = generate_with_engine(model, items, out / "images", models_dir=models_dir, embeddings_dir=embeddings, sampler="Euler a")
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def features(clip, images):
    from huabi.eval.faithfulness import clip_image_features, thumbnail_features, to_pixels

    pixels = to_pixels(images, 128)
    return clip_image_features(clip, pixels), thumbnail_features(pixels)


def concept_scores(clip, images, reference) -> dict:
    tower, thumbs = features(clip, images)
    ref_tower, ref_thumbs = reference
    centroid = F.normalize(ref_tower.mean(0, keepdim=True), dim=-1)
    cosine = (tower @ centroid.T).squeeze(1)
    nearest = torch.cdist(thumbs, ref_thumbs).min(dim=1).values / math.sqrt(thumbs.shape[1])
    return {"tower_cosine_to_concept": round(float(cosine.mean()), 4),
            "thumbnail_rms_to_nearest_concept_image": round(float(nearest.mean()), 4)}


def drift(clip, base_images, images) -> dict:
    a_tower, a_thumbs = features(clip, base_images)
    b_tower, b_thumbs = features(clip, images)
    return {"tower_cosine_distance": round(float(1 - (a_tower * b_tower).sum(-1).mean()), 4),
            "thumbnail_rms": round(float((a_thumbs - b_thumbs).pow(2).mean(1).sqrt().mean()), 4)}


def grid(rows, labels, path: Path) -> None:
    cell = 96
    width = 150 + cell * len(rows[0])
    canvas = Image.new("RGB", (width, cell * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (row, label) in enumerate(zip(rows, labels)):
        draw.text((6, r * cell + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(row):
            canvas.paste(image.resize((cell, cell), Image.BICUBIC), (150 + c * cell, r * cell))
    canvas.save(path)


def prepare_concept(work: Path):
    """The training folder, the held-out images, huabi-mini's CLIP pair and the held-out features."""
    from huabi.models.clip_pair import clip_pair_path, load_clip_pair
    from huabi.models.load import load_model
    from huabi.train.user_train import builtin_model

    model = builtin_model()
    write_dataset(work / "data", range(1, 13), "4_zqx quilt")
    held_out = [draw_concept(seed) for seed in range(101, 113)]
    bundle = load_model(model, compute_hash=False)
    clip = load_clip_pair(clip_pair_path(model), text_encoder=bundle.text_encoders[0])
    return model, held_out, clip, features(clip, held_out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/huabi-train-demo"))
    parser.add_argument("--out", type=Path, default=Path("docs/images"))
    # 200 LoRA steps: measured on huabi-mini v4 (image-tower cosine 0.313 at 100 steps, 0.827 at 200; v1 needed 100)
    parser.add_argument("--lora-steps", type=int, default=200)
    # textual inversion: 200 steps (lr 1e-3, 5e-3 or 2e-2) did no better than 100 on v4 (docs/training_users.md)
    parser.add_argument("--ti-steps", type=int, default=100)
    parser.add_argument("--db-steps", type=int, default=60)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from huabi.train.user_config import UserTrainConfig
    from huabi.train.user_train import train_user

    work = args.work
    model, held_out, clip, reference = prepare_concept(work)
    report: dict = {"prompts": PROMPTS, "seeds": SEEDS, "steps": {"lora": args.lora_steps, "textual_inversion": args.ti_steps}}
    log = lambda message: print(message, file=sys.stderr, flush=True)  # noqa: E731

    common = dict(train_data_dir=str(work / "data"), resolution=128, min_bucket_reso=64, train_batch_size=4,
                  seed=7, caption_extension=".txt", save_precision="fp16")
    timings = {}
    started = time.monotonic()
    lora = train_user(UserTrainConfig(mode="lora", output=str(work / "zqx.safetensors"), network_dim=8, network_alpha=8.0,
                                      learning_rate=2e-3, max_train_steps=args.lora_steps, **common), log=log, progress=False).output
    timings["lora_s"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    ti = train_user(UserTrainConfig(mode="textual-inversion", output=str(work / "zqxquilt.safetensors"), token_string="zqxquilt",
                                    init_word="pattern", num_vectors_per_token=2, learning_rate=1e-3,
                                    use_object_template=True,  # see docs/training_users.md (TI strength study)
                                    class_tokens="zqxquilt", max_train_steps=args.ti_steps, **common), log=log, progress=False).output
    timings["textual_inversion_s"] = round(time.monotonic() - started, 1)

    before = generate(model, PROMPTS, work / "gen_before")
    after_lora = generate(model, PROMPTS, work / "gen_lora", lora=lora)
    before_ti = generate(model, TI_PROMPTS, work / "gen_before_ti")
    after_ti = generate(model, TI_PROMPTS, work / "gen_ti", embedding=ti)
    report["lora"] = {"before": concept_scores(clip, before, reference), "after": concept_scores(clip, after_lora, reference)}
    report["textual_inversion"] = {"before": concept_scores(clip, before_ti, reference), "after": concept_scores(clip, after_ti, reference)}
    report["reference_held_out_self"] = concept_scores(clip, held_out, reference)

    # DreamBooth drift with and without prior preservation
    db_common = dict(common, max_train_steps=args.db_steps, class_tokens="zqx flag")
    db_data = work / "db_data"
    write_dataset(db_data, range(1, 13), "4_zqx flag")
    db_common["train_data_dir"] = str(db_data)
    started = time.monotonic()
    with_prior = train_user(UserTrainConfig(mode="dreambooth", output=str(work / "db_prior.safetensors"), network_dim=8,
                                            network_alpha=8.0, learning_rate=2e-3, reg_data_dir=str(work / "class_flag"),
                                            class_prompt="a flag", num_class_images=8, prior_loss_weight=1.0, **db_common),
                            log=log, progress=False).output
    without_prior = train_user(UserTrainConfig(mode="dreambooth", output=str(work / "db_noprior.safetensors"), network_dim=8,
                                               network_alpha=8.0, learning_rate=2e-3, **db_common), log=log, progress=False).output
    timings["dreambooth_two_runs_s"] = round(time.monotonic() - started, 1)
    base_class = generate(model, CLASS_PROMPTS, work / "gen_class_base")
    prior_class = generate(model, CLASS_PROMPTS, work / "gen_class_prior", lora=with_prior)
    noprior_class = generate(model, CLASS_PROMPTS, work / "gen_class_noprior", lora=without_prior)
    instance_prior = generate(model, ("zqx flag",), work / "gen_inst_prior", lora=with_prior)
    instance_noprior = generate(model, ("zqx flag",), work / "gen_inst_noprior", lora=without_prior)
    report["dreambooth"] = {
        "class_prompts": CLASS_PROMPTS,
        "drift_with_prior_preservation": drift(clip, base_class, prior_class),
        "drift_without_prior_preservation": drift(clip, base_class, noprior_class),
        "instance_with_prior": concept_scores(clip, instance_prior, reference),
        "instance_without_prior": concept_scores(clip, instance_noprior, reference),
    }
    report["wall_times"] = timings
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [held_out[:8], before, after_lora, after_ti, base_class, noprior_class, prior_class]
    labels = ["concept (held out)", "before: zqx quilt", "LoRA: zqx quilt", "TI: zqxquilt", "base: a flag...",
              "DB no prior: a flag", "DB prior: a flag"]
    grid(rows, labels, args.out / "train_demo_grid.png")
    (args.out / "train_demo.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
