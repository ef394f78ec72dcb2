"""Where does huabi-mini lose the prompt? Measurements behind docs/training.md's "v2 diagnosis".

    python scripts/mini_diagnose.py real                      # once: features of the 9,219 real images
    python scripts/mini_diagnose.py sample --model F --cfg 7 --steps 20 [--rescale 0.7] [--variant 0] --tag T
    python scripts/mini_diagnose.py textuse --model F --tag T  # eps-MSE with the right / another / no caption
    python scripts/mini_diagnose.py text                      # the CLIP text tower alone: caption -> real image
    python scripts/mini_diagnose.py failures --tag T --out grid.png
    python scripts/mini_diagnose.py table                     # every run so far, one line each

Items: a fixed 100 of the 300 items ``python -m huabi.eval.faithfulness`` draws (every third:
positions 0, 3, ..., 297), each with its seed from that evaluation (1000 + position), so numbers
are comparable between runs here, not with the 300-item table. Every one of these items is in the
training set (the evaluation draws from the training folder; there is no held-out split), and
caption variant 0 (the item's name) is one of the captions it was trained on.

Everything runs on the CPU in fp32 with one thread unless ``--threads`` says otherwise; results
go to ``--work`` (default ``~/.cache/huabi/diag/mini``) as JSON lines (``runs.jsonl``) plus the
generated pixels of each run (``T.npy``) for the failure grid.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_WORK = Path.home() / ".cache" / "huabi" / "diag" / "mini"
SUBSET_STRIDE = 3  # 300 evaluation items -> 100
V2_MODEL = Path.home() / ".cache" / "huabi" / "train" / "huabi-mini-v2" / "huabi-mini-v2.safetensors"
V2_STATE = V2_MODEL.parent


# ---------------------------------------------------------------- the real images


def cmd_real(args) -> None:
    """Thumbnails and CLIP image features of every real image, names, captions, sources."""
    from PIL import Image

    from huabi.data.folder import CaptionedFolder
    from huabi.eval.faithfulness import FaithfulnessConfig, clip_image_features, pick_items, thumbnail_features, to_pixels
    from huabi.models.clip_pair import clip_pair_path, load_clip_pair
    from huabi.models.load import load_model

    started = time.time()
    folder = CaptionedFolder(args.data)
    items = [item for item in folder.items if item.captions]
    names = [item.captions[0].strip().lower() for item in items]
    bundle = load_model(args.model, compute_hash=False)
    clip = load_clip_pair(clip_pair_path(args.model), text_encoder=bundle.text_encoders[0])
    thumbs, clip_feats = [], []
    for start in range(0, len(items), 512):  # decode in slices: 9,219 x 128 px fp32 would be 1.8 GB
        pixels = to_pixels([Image.open(item.path) for item in items[start : start + 512]], 128)
        thumbs.append(thumbnail_features(pixels))
        clip_feats.append(clip_image_features(clip, pixels))
    config = FaithfulnessConfig()
    picked = pick_items(names, config.count, config.item_seed)
    torch.save(
        {
            "files": [item.path.name for item in items],
            "names": names,
            "captions": [list(item.captions) for item in items],
            "thumbs": torch.cat(thumbs),
            "clip": torch.cat(clip_feats),
            "eval_items": picked,  # the 300 of the faithfulness evaluation, in its order
        },
        args.work / "real.pt",
    )
    print(json.dumps({"real_images": len(items), "distinct_names": len(set(names)), "wall_s": round(time.time() - started)}))


def load_real(work: Path) -> dict:
    real = torch.load(work / "real.pt", weights_only=False)
    names = real["names"]
    label_of = {name: i for i, name in enumerate(sorted(set(names)))}
    real["labels"] = torch.tensor([label_of[n] for n in names])
    real["label_of"] = label_of
    positions = list(range(0, len(real["eval_items"]), SUBSET_STRIDE))
    real["subset"] = [real["eval_items"][p] for p in positions]
    real["subset_seeds"] = [1000 + p for p in positions]
    return real


def source_of(file_name: str) -> str:
    return "emoji" if file_name.startswith("emoji") else "clipart"


# ---------------------------------------------------------------- CFG rescale (diagnostic only)


def rescaled_cfg(phi: float, space: str = "eps"):
    """Guidance rule: CFG, then the guided eps rescaled to the std of the conditional eps
    (Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed", eq. 15-16),
    mixed with plain CFG by ``phi``; computed in eps space per image, as diffusers'
    ``guidance_rescale`` does for eps models."""
    from huabi.core.guidance import UNetInputs

    def make(model, conds, uncond, scale):
        (cond, weight), = conds

        def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            batch = x.shape[0]
            sigma_flat = sigma.reshape(-1).expand(batch) if sigma.numel() == 1 else sigma.reshape(-1)
            inputs = UNetInputs.concat([uncond.at(0).repeat_to(batch), cond.at(0).repeat_to(batch)])
            d_uncond, d_cond = model(torch.cat([x, x]), torch.cat([sigma_flat, sigma_flat]), inputs).chunk(2)
            s = sigma_flat.view(-1, 1, 1, 1)
            if space == "x0":  # on the denoised latents (what A1111's CFG-rescale extensions see)
                d_cfg = d_uncond + (d_cond - d_uncond) * (scale * weight)
                ratio = d_cond.std(dim=(1, 2, 3), keepdim=True) / d_cfg.std(dim=(1, 2, 3), keepdim=True)
                return phi * (d_cfg * ratio) + (1.0 - phi) * d_cfg
            eps_u, eps_c = (x - d_uncond) / s, (x - d_cond) / s
            eps_cfg = eps_u + (eps_c - eps_u) * (scale * weight)
            ratio = eps_c.std(dim=(1, 2, 3), keepdim=True) / eps_cfg.std(dim=(1, 2, 3), keepdim=True)
            eps = phi * (eps_cfg * ratio) + (1.0 - phi) * eps_cfg
            return x - s * eps

        return denoise

    return make


# ---------------------------------------------------------------- generation runs


def retrieval(neighbours: torch.Tensor, wanted: torch.Tensor, keys: torch.Tensor, ks=(1, 10)) -> dict:
    hits = keys[neighbours] == wanted.unsqueeze(1)
    return {f"top{k}": round(float(hits[:, :k].any(dim=1).float().mean()), 4) for k in ks}


def score_images(pixels: torch.Tensor, prompts: list[str], items: list[int], real: dict, clip, tokenizer) -> dict:
    from huabi.eval.faithfulness import clip_image_features, clip_score, clip_text_features, nearest, text_to_image_accuracy, thumbnail_features

    labels = real["labels"][torch.tensor(items)]
    thumb_nn = nearest(thumbnail_features(pixels), real["thumbs"], 10, metric="l2")
    image_clip = clip_image_features(clip, pixels)
    clip_nn = nearest(image_clip, real["clip"], 10, metric="cosine")
    text = clip_text_features(clip, tokenizer, prompts)
    own = torch.tensor(items)
    by_source = {}
    sources = [source_of(real["files"][i]) for i in items]
    for source in ("emoji", "clipart"):
        rows = torch.tensor([s == source for s in sources])
        if rows.any():
            by_source[source] = {"n": int(rows.sum()), **retrieval(thumb_nn[rows], labels[rows], real["labels"])}
    return {
        "thumb": retrieval(thumb_nn, labels, real["labels"]),
        "thumb_own_image": retrieval(thumb_nn, own, torch.arange(len(real["labels"]))),
        "thumb_by_source": by_source,
        "clip_image": retrieval(clip_nn, labels, real["labels"]),
        "clip_score": round(clip_score(text, image_clip), 2),
        "text_to_image": {k: round(v, 4) for k, v in text_to_image_accuracy(text, image_clip, (1, 10)).items()},
        "thumb_nn1": thumb_nn[:, 0].tolist(),
    }


def cmd_sample(args) -> None:
    from huabi.core.request import GenerationRequest
    from huabi.eval.faithfulness import to_pixels
    from huabi.models.clip_pair import clip_pair_path, load_clip_pair
    from huabi.pipelines.patches import GuidancePatch
    from huabi.pipelines.txt2img import txt2img
    from huabi.service.engine import Engine
    from huabi.train.data import default_tokenizer

    real = load_real(args.work)
    items, seeds = real["subset"], real["subset_seeds"]
    if args.items == "random100":  # other training items (not among the 300), seeded
        import random

        taken = set(real["eval_items"])
        pool = [i for i in range(len(real["names"])) if i not in taken]
        items = sorted(random.Random(20261206).sample(pool, 100))
        seeds = [5000 + j for j in range(100)]
    elif args.items == "eval-emoji":  # every emoji among the evaluation's 300, each with its evaluation seed
        positions = [p for p, i in enumerate(real["eval_items"]) if source_of(real["files"][i]) == "emoji"]
        items, seeds = [real["eval_items"][p] for p in positions], [1000 + p for p in positions]
    captions = real["captions"]
    prompts = []
    for i in items:
        variants = captions[i]
        prompts.append("" if args.variant < 0 else variants[min(args.variant, len(variants) - 1)])
    started = time.time()
    engine = Engine(device="cpu", dtype="fp32")
    bundle = engine.load(str(args.model))
    clip = load_clip_pair(clip_pair_path(args.model), text_encoder=bundle.text_encoders[0])
    patches = (GuidancePatch(rescaled_cfg(args.rescale, args.rescale_space)),) if args.rescale is not None else ()
    images = []
    with torch.inference_mode():
        for prompt, seed in zip(prompts, seeds, strict=True):  # one prompt per image: seeds as the evaluation
            request = GenerationRequest(prompt=prompt, steps=args.steps, sampler=args.sampler, cfg_scale=args.cfg, seed=seed)
            images.extend(txt2img(bundle, request, [seed], device=engine.device, patches=patches).images)
        pixels = to_pixels(images, 128)
        scores = score_images(pixels, [p for p in prompts], items, real, clip, default_tokenizer()) if args.variant >= 0 else \
            score_images(pixels, [captions[i][0] for i in items], items, real, clip, default_tokenizer())
    np.save(args.work / f"{args.tag}.npy", ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    record = {
        "tag": args.tag, "kind": "sample", "model": str(args.model), "items": args.items, "variant": args.variant,
        "cfg": args.cfg, "steps": args.steps, "sampler": args.sampler, "rescale": args.rescale,
        "rescale_space": args.rescale_space if args.rescale is not None else None,
        **scores, "item_ids": items, "wall_s": round(time.time() - started),
    }
    with open(args.work / "runs.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("thumb_nn1", "item_ids")}))


# ---------------------------------------------------------------- does the UNet use the text?


def cmd_textuse(args) -> None:
    """eps-prediction MSE on training latents at fixed timesteps: own caption vs another item's vs empty.

    Same latents, noise and timesteps for the three; captions are the cached text states the
    UNet was trained on (``cache/text.npy``). If the UNet used the caption, the own caption's
    error would be clearly below the others'.
    """
    from huabi.models.load import load_model
    from huabi.train.cache import load_cache
    from huabi.train.unet import scaled_linear_alphas_cumprod

    started = time.time()
    cache = load_cache(args.state / "cache")
    bundle = load_model(args.model, compute_hash=False)
    unet = bundle.unet.eval()
    generator = torch.Generator().manual_seed(20261206)
    count = args.count
    items = torch.randperm(len(cache), generator=generator)[:count]
    # caption 0 of each item is its name: the evaluation's prompt; another item = the next one in this list
    own_rows = torch.tensor([cache.caption_ids[i][0] for i in items.tolist()])
    other_rows = own_rows.roll(1)
    alphas = scaled_linear_alphas_cumprod(1000, 0.00085, 0.012)
    latents = cache.latents[items] * cache.scaling_factor
    mean_latent = cache.latents.mean(dim=0) * cache.scaling_factor
    state_names = json.loads((args.state / "data" / "pixels-128.json").read_text())["names"]
    sources = [source_of(Path(state_names[i]).name) for i in items.tolist()]
    by_source = {source: torch.tensor([s == source for s in sources]) for source in ("emoji", "clipart")}
    noise = torch.randn(latents.shape, generator=generator)
    text = lambda rows: torch.from_numpy(np.ascontiguousarray(cache.text[rows.numpy()])).float()
    contexts = {"own caption": text(own_rows), "another item's caption": text(other_rows), "empty": text(torch.zeros_like(own_rows))}
    result = {}
    with torch.inference_mode():
        for t in args.timesteps:
            abar = alphas[t].float()
            noisy = abar.sqrt() * latents + (1 - abar).sqrt() * noise
            row = {}
            for label, context in contexts.items():
                errors = []
                for start in range(0, count, 32):
                    stop = start + 32
                    steps = torch.full((len(noisy[start:stop]),), t)
                    eps = unet(noisy[start:stop], steps, encoder_hidden_states=context[start:stop]).sample
                    errors.append((eps - noise[start:stop]).pow(2).mean(dim=(1, 2, 3)))
                errors = torch.cat(errors)
                row[label] = errors
            own = row["own caption"]
            # the same errors as x0 errors: x0_hat - x0 = sqrt((1 - abar) / abar) (eps - eps_hat); next to
            # what predicting the dataset's mean latent would score (the item-specific variance)
            to_x0 = float((1 - abar) / abar)
            result[str(t)] = {
                **{label: round(float(e.mean()), 5) for label, e in row.items()},
                # share of items whose own caption predicts its noise better than another item's caption
                "own beats another": round(float((own < row["another item's caption"]).float().mean()), 3),
                "x0 MSE": {label: round(to_x0 * float(e.mean()), 4) for label, e in row.items()},
                "x0 MSE of the mean latent": round(float((latents - mean_latent).pow(2).mean()), 4),
                "x0 MSE by source (own / empty / mean latent)": {
                    source: [round(to_x0 * float(own[rows].mean()), 4), round(to_x0 * float(row["empty"][rows].mean()), 4),
                             round(float((latents[rows] - mean_latent).pow(2).mean()), 4), int(rows.sum())]
                    for source, rows in by_source.items()},
            }
            print(t, json.dumps(result[str(t)]), flush=True)
    record = {"tag": args.tag, "kind": "textuse", "model": str(args.model), "items": count, "by_timestep": result, "wall_s": round(time.time() - started)}
    with open(args.work / "runs.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def cmd_ceiling(args) -> None:
    """The best a generator could score here: the subset's real images through the VAE alone
    (encode, decode), scored like a generation run (tag ``vae-ceiling``)."""
    from PIL import Image

    from huabi.eval.faithfulness import to_pixels
    from huabi.models.clip_pair import clip_pair_path, load_clip_pair
    from huabi.models.load import load_model
    from huabi.train.data import default_tokenizer

    started = time.time()
    real = load_real(args.work)
    items = real["subset"]
    bundle = load_model(args.model, compute_hash=False)
    clip = load_clip_pair(clip_pair_path(args.model), text_encoder=bundle.text_encoders[0])
    pixels = to_pixels([Image.open(args.data / real["files"][i]) for i in items], 128)
    with torch.inference_mode():
        decoded = torch.cat([bundle.vae.decode(bundle.vae.encode(pixels[s : s + 20]).latent_dist.mean).sample.clamp(-1, 1)
                             for s in range(0, len(items), 20)])
        prompts = [real["captions"][i][0] for i in items]
        scores = score_images(decoded, prompts, items, real, clip, default_tokenizer())
    psnr = float((10 * torch.log10(4.0 / (decoded - pixels).pow(2).mean(dim=(1, 2, 3)))).mean())
    record = {"tag": "vae-ceiling", "kind": "sample", "model": str(args.model), "items": "eval100", "variant": 0, "cfg": 0,
              "steps": 0, "sampler": "VAE round trip", "rescale": None, **scores, "item_ids": items, "psnr_db": round(psnr, 2),
              "wall_s": round(time.time() - started)}
    np.save(args.work / "vae-ceiling.npy", ((decoded + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy())
    with open(args.work / "runs.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k not in ("thumb_nn1", "item_ids")}))


def cmd_centre(args) -> None:
    """How the cached latents sit in the UNet's units, and the exact fix: per-channel centring folded into the VAE."""
    from PIL import Image

    from huabi.eval.faithfulness import to_pixels
    from huabi.models.load import load_model
    from huabi.train.cache import load_cache
    from huabi.train.mini_v2 import centred_vae

    cache = load_cache(args.state / "cache")
    latents = cache.latents  # unscaled posterior means
    scaled = latents * cache.scaling_factor
    mean, std = latents.mean(dim=(0, 2, 3)), latents.std(dim=(0, 2, 3))
    out = {
        "scaling_factor": cache.scaling_factor,
        "scaled latents: variance": round(float(scaled.var()), 4),
        "scaled latents: per-channel mean": [round(float(x), 3) for x in scaled.mean(dim=(0, 2, 3))],
        "scaled latents: per-channel std": [round(float(x), 3) for x in scaled.std(dim=(0, 2, 3))],
        "scaled latents: variance around the per-channel mean": round(float((scaled - scaled.mean(dim=(0, 2, 3), keepdim=True)).pow(2).mean()), 4),
        "scaled latents: variance around the dataset's mean latent": round(float((scaled - scaled.mean(dim=0)).pow(2).mean()), 4),
    }
    real = load_real(args.work)
    bundle = load_model(args.model, compute_hash=False)
    vae = bundle.vae.eval()
    centred = centred_vae(vae, mean, std)
    pixels = to_pixels([Image.open(args.data / real["files"][i]) for i in real["subset"][:20]], 128)
    with torch.inference_mode():
        z = vae.encode(pixels).latent_dist.mean
        z_new = centred.encode(pixels).latent_dist.mean
        out["centred VAE: max |latent - (z - mean) / std|"] = float((z_new - (z - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)).abs().max())
        out["centred VAE: max |decoded pixel difference|"] = float((centred.decode(z_new).sample - vae.decode(z).sample).abs().max())
    print(json.dumps(out, indent=1))


def cmd_checkenc(args) -> None:
    """Do prompts reach the UNet as the states it was trained on? The pipeline's conditioning for
    the subset's captions (variants 0-2) against the training cache's rows (fp16) for the same strings."""
    from huabi.models.load import load_model
    from huabi.pipelines.common import encode_guidance
    from huabi.train.cache import load_cache

    real = load_real(args.work)
    cache = load_cache(args.state / "cache")
    trained = torch.load(args.state / "data" / "tokens.pt", weights_only=False)["captions"]
    row_of = {caption: row for row, caption in enumerate(trained)}
    bundle = load_model(args.model, compute_hash=False)
    worst, checked, missing, differing = 0.0, 0, 0, []
    with torch.inference_mode():
        for item in real["subset"]:
            for variant in real["captions"][item][:3]:
                if variant not in row_of:
                    missing += 1
                    continue
                guidance = encode_guidance(bundle, variant, "", clip_skip=1, width_px=128, height_px=128, device=torch.device("cpu"))
                conds, _ = guidance.conditioning(1)
                context = conds[0][0].entries[0][1].context[0]
                cached = torch.from_numpy(np.array(cache.text[row_of[variant]])).float()
                if context.shape != cached.shape:
                    print(f"shape differs for {variant!r}: {tuple(context.shape)} vs {tuple(cached.shape)}")
                    continue
                difference = float((context - cached).abs().max())
                worst = max(worst, difference)
                checked += 1
                if difference > 0.01:  # fp16 storage rounds to ~1e-3
                    differing.append((variant, round(difference, 3)))
    print(json.dumps({"captions_checked": checked, "not_in_training_captions": missing, "max_abs_difference": worst,
                      "differing_over_0.01": differing}, indent=1))


# ---------------------------------------------------------------- the text tower alone


STOP = {"a", "an", "the", "of", "and", "with", "in", "on", "emoji", "clipart", "drawing"}


def words(name: str) -> set[str]:
    return {w for w in re.findall(r"[a-z0-9]+", name.lower()) if w not in STOP}


def cmd_text(args) -> None:
    """Caption -> nearest real image by the CLIP towers (no UNet): the 300 evaluation items vs
    300 other training items, per caption variant; and which names the misses go to."""
    import random

    from huabi.eval.faithfulness import clip_text_features
    from huabi.models.clip_pair import clip_pair_path, load_clip_pair
    from huabi.models.load import load_model
    from huabi.train.data import default_tokenizer

    real = load_real(args.work)
    bundle = load_model(args.model, compute_hash=False)
    clip = load_clip_pair(clip_pair_path(args.model), text_encoder=bundle.text_encoders[0])
    tokenizer = default_tokenizer()
    eval_items = real["eval_items"]
    taken = set(eval_items)
    other = sorted(random.Random(20261206).sample([i for i in range(len(real["names"])) if i not in taken], 300))
    report = {}
    with torch.inference_mode():
        for label, items in (("evaluation items", eval_items), ("other training items", other)):
            wanted = real["labels"][torch.tensor(items)]
            for variant in range(3):
                prompts = [real["captions"][i][min(variant, len(real["captions"][i]) - 1)] for i in items]
                text = clip_text_features(clip, tokenizer, prompts)
                nn = (text @ real["clip"].T).topk(10, dim=1).indices
                report[f"{label}, caption {variant}"] = retrieval(nn, wanted, real["labels"])
                if variant == 0 and label == "evaluation items":
                    misses = [(items[q], int(nn[q, 0])) for q in range(len(items)) if real["labels"][nn[q, 0]] != wanted[q]]
        # near-duplicate names among the misses: the retrieved name shares a word with the prompt
        names = real["names"]
        shared = [bool(words(names[q]) & words(names[r])) for q, r in misses]
        rng = random.Random(1)
        chance = [bool(words(names[q]) & words(names[rng.randrange(len(names))])) for q, _ in misses for _ in range(20)]
        report["misses (evaluation items, caption 0)"] = len(misses)
        report["misses whose retrieved name shares a word with the prompt"] = round(sum(shared) / max(1, len(shared)), 3)
        report["random name shares a word with the prompt (chance)"] = round(sum(chance) / max(1, len(chance)), 3)
        report["example misses"] = [(names[q], names[r]) for q, r in misses[:25]]
    print(json.dumps(report, indent=1))
    with open(args.work / "runs.jsonl", "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"tag": "text-tower", "kind": "text", **report}) + "\n")


# ---------------------------------------------------------------- confusions of a generation run


def load_run(work: Path, tag: str) -> dict:
    runs = [json.loads(line) for line in (work / "runs.jsonl").read_text().splitlines()]
    found = [r for r in runs if r.get("tag") == tag and r.get("kind") == "sample"]
    if not found:
        raise SystemExit(f"no sample run tagged {tag!r}")
    return found[-1]


def cmd_confusions(args) -> None:
    """For a run's misses: does the nearest real image's name share a word with the prompt? same source?"""
    import random

    real = load_real(args.work)
    run = load_run(args.work, args.tag)
    names, files = real["names"], real["files"]
    misses = [(i, n) for i, n in zip(run["item_ids"], run["thumb_nn1"]) if real["labels"][n] != real["labels"][i]]
    shared = sum(bool(words(names[i]) & words(names[n])) for i, n in misses)
    same_source = sum(source_of(files[i]) == source_of(files[n]) for i, n in misses)
    rng = random.Random(1)
    draws = [(i, rng.randrange(len(names))) for i, _ in misses for _ in range(50)]
    out = {
        "tag": args.tag, "misses": len(misses),
        "nearest name shares a word": round(shared / len(misses), 3),
        "chance (random real image)": round(sum(bool(words(names[i]) & words(names[r])) for i, r in draws) / len(draws), 3),
        "nearest is the same source (emoji/clipart)": round(same_source / len(misses), 3),
        "chance same source": round(sum(source_of(files[i]) == source_of(files[r]) for i, r in draws) / len(draws), 3),
    }
    # skin-tone-blind: emoji that differ only by skin tone count as the same item (half the emoji are such variants)
    from huabi.eval.faithfulness import nearest, thumbnail_features

    base = [SKIN_TONE.sub("", n).strip(" ,") for n in names]
    base_of = {b: i for i, b in enumerate(sorted(set(base)))}
    base_labels = torch.tensor([base_of[b] for b in base])
    pixels = torch.from_numpy(np.load(args.work / f"{args.tag}.npy")).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    nn = nearest(thumbnail_features(pixels), real["thumbs"], 10, metric="l2")
    items = torch.tensor(run["item_ids"])
    out["thumb (from the saved pixels)"] = retrieval(nn, real["labels"][items], real["labels"])
    out["thumb, skin-tone-blind"] = retrieval(nn, base_labels[items], base_labels)
    emoji = torch.tensor([source_of(files[i]) == "emoji" for i in run["item_ids"]])
    out["emoji thumb, skin-tone-blind"] = retrieval(nn[emoji], base_labels[items][emoji], base_labels)
    print(json.dumps(out, indent=1))


SKIN_TONE = re.compile(r"(,? ?(with )?(light|medium-light|medium|medium-dark|dark) skin tone)+")


def cmd_failures(args) -> None:
    """A grid of the first ``--count`` misses of a run: generated | its own real image | nearest real image."""
    from PIL import Image, ImageDraw

    real = load_real(args.work)
    run = load_run(args.work, args.tag)
    generated = np.load(args.work / f"{args.tag}.npy")
    folder = args.data
    rows = []
    for row, (item, nn) in enumerate(zip(run["item_ids"], run["thumb_nn1"])):
        if real["labels"][nn] != real["labels"][item] and args.source in ("all", source_of(real["files"][item])):
            rows.append((row, item, nn))
    rows = rows[: args.count]
    cell, label_h, columns = 128, 14, 2
    width = columns * 3 * cell + (columns - 1) * 8
    per_column = (len(rows) + columns - 1) // columns
    sheet = Image.new("RGB", (width, per_column * (cell + label_h)), "white")
    draw = ImageDraw.Draw(sheet)
    listing = []
    for k, (row, item, nn) in enumerate(rows):
        x0 = (k // per_column) * (3 * cell + 8)
        y0 = (k % per_column) * (cell + label_h)
        tiles = [Image.fromarray(generated[row]), Image.open(folder / real["files"][item]).convert("RGB"),
                 Image.open(folder / real["files"][nn]).convert("RGB")]
        for j, tile in enumerate(tiles):
            sheet.paste(tile.resize((cell, cell)), (x0 + j * cell, y0 + label_h))
        draw.text((x0 + 2, y0 + 1), f"{k + 1}. {real['names'][item][:22]} -> {real['names'][nn][:22]}", fill="black")
        listing.append({"n": k + 1, "prompt": real["captions"][item][0], "file": real["files"][item], "nearest": real["names"][nn]})
    sheet.save(args.out)
    print(json.dumps(listing, indent=1))


def cmd_table(args) -> None:
    for line in (args.work / "runs.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "sample":
            src = r["thumb_by_source"]
            print(f"{r['tag']:<22} {Path(r['model']).stem:<18} items={r['items']:<9} var={r['variant']:<2} cfg={r['cfg']:<5} steps={r['steps']:<3} "
                  f"rescale={r['rescale']}: thumb {100 * r['thumb']['top1']:.0f}/{100 * r['thumb']['top10']:.0f} "
                  f"own {100 * r['thumb_own_image']['top1']:.0f}/{100 * r['thumb_own_image']['top10']:.0f} "
                  f"clip-img {100 * r['clip_image']['top1']:.0f}/{100 * r['clip_image']['top10']:.0f} score {r['clip_score']:.1f} "
                  f"t2i {100 * r['text_to_image']['top1']:.0f}/{100 * r['text_to_image']['top10']:.0f} "
                  + " ".join(f"{s} {100 * v['top1']:.0f}/{100 * v['top10']:.0f} (n={v['n']})" for s, v in src.items())
                  + f"  [{r['wall_s']} s]")
        elif r["kind"] == "textuse":
            print(f"{r['tag']:<22} textuse {Path(r['model']).stem}: " + "; ".join(
                f"t={t}: " + ", ".join(f"{k} {v}" for k, v in row.items()) for t, row in r["by_timestep"].items()))


def main() -> None:
    from huabi.train.recipe import DEFAULT_DATA_DIR

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--model", type=Path, default=V2_MODEL)
    parser.add_argument("--threads", type=int, default=1)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("real")
    sample = sub.add_parser("sample")
    sample.add_argument("--tag", required=True)
    sample.add_argument("--cfg", type=float, default=7.0)
    sample.add_argument("--steps", type=int, default=20)
    sample.add_argument("--sampler", default="DPM++ 2M")
    sample.add_argument("--rescale", type=float, default=None, help="CFG rescale phi (default: off)")
    sample.add_argument("--rescale-space", choices=("eps", "x0"), default="eps")
    sample.add_argument("--variant", type=int, default=0, help="caption variant (0 = the name); -1 = empty prompt")
    sample.add_argument("--items", choices=("eval100", "random100", "eval-emoji"), default="eval100")
    textuse = sub.add_parser("textuse")
    textuse.add_argument("--tag", required=True)
    textuse.add_argument("--state", type=Path, default=V2_STATE)
    textuse.add_argument("--count", type=int, default=256)
    textuse.add_argument("--timesteps", type=int, nargs="+", default=[100, 300, 500, 700, 900])
    sub.add_parser("text")
    sub.add_parser("ceiling")
    centre = sub.add_parser("centre")
    centre.add_argument("--state", type=Path, default=V2_STATE)
    check = sub.add_parser("checkenc")
    check.add_argument("--state", type=Path, default=V2_STATE)
    conf = sub.add_parser("confusions")
    conf.add_argument("--tag", required=True)
    fail = sub.add_parser("failures")
    fail.add_argument("--tag", required=True)
    fail.add_argument("--out", type=Path, required=True)
    fail.add_argument("--count", type=int, default=20)
    fail.add_argument("--source", choices=("all", "emoji", "clipart"), default="all")
    sub.add_parser("table")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    {"real": cmd_real, "sample": cmd_sample, "textuse": cmd_textuse, "text": cmd_text, "checkenc": cmd_checkenc, "ceiling": cmd_ceiling, "centre": cmd_centre, "confusions": cmd_confusions,
     "failures": cmd_failures, "table": cmd_table}[args.command](args)


if __name__ == "__main__":
    main()
