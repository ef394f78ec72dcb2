"""Text faithfulness of a model trained on a captioned folder: do prompts give their items?

    .venv/bin/python -m huabi.eval.faithfulness [--data DIR] [--clip FILE] [--model M]
        [--count 300] [--json OUT.json] [--grid OUT.png]

For ``count`` items drawn (seeded) from the dataset, the item's name caption is the
prompt; one image per prompt is generated (seed ``seed + i``). The same seeds with an
empty prompt are the baseline. Measured:

* retrieval against the real dataset: is an image of the same item (same name) among
  the k nearest real images? By two features: a fixed one (16x16 RGB thumbnails, L2),
  and the CLIP image tower trained alongside the model (cosine);
* the CLIP image-text encoder: mean cosine between prompt and image (CLIP score x 100
  as torchmetrics reports it, clipped at 0), and text-to-image retrieval among the
  generated set (for each prompt, is its own image among the k best?);
* paraphrased and combined prompts: their CLIP score against the baseline, and how far
  their images are from the nearest real image compared with pure noise images.

Chance level for retrieval is reported next to the numbers (the baseline measures it
with the same generator, which is the honest reference). The JSON also has one record
per prompt (``items``: the rank of the first image of its name by each feature, the
nearest name), read by ``scripts/faithfulness_by_group.py``.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from huabi.errors import HuabiError

# Prompts outside the captions: a new attribute on a known item, two items at once.
COMPOSED_PROMPTS: tuple[str, ...] = (
    "a blue apple",
    "a cat and a rocket",
    "a green heart",
    "a red car",
    "a yellow star",
    "a dog with a hat",
    "a smiling sun",
    "a house and a tree",
)


@dataclass(frozen=True)
class FaithfulnessConfig:
    count: int = 300  # prompts (dataset items) evaluated
    item_seed: int = 20251122  # which items
    seed: int = 1000  # image i uses seed + i
    steps: int = 20
    sampler: str = "DPM++ 2M"
    cfg_scale: float = 7.0
    batch_size: int = 8  # prompts encoded per batch (images per UNet batch)
    ks: tuple[int, ...] = (1, 10)

    def validate(self) -> None:
        for name in ("count", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise HuabiError(f"{name} must be >= 1, got {getattr(self, name)}")


# ---------------------------------------------------------------- features


def to_pixels(images: Sequence[Image.Image], size_px: int) -> torch.Tensor:
    """[N, 3, size, size] float in [-1, 1]."""
    from huabi.pipelines.img2img import image_to_tensor

    return torch.stack([image_to_tensor(im.convert("RGB").resize((size_px, size_px), Image.BICUBIC)) for im in images])


def thumbnail_features(pixels: torch.Tensor, side_px: int = 16) -> torch.Tensor:
    """Area-downsampled RGB, flattened: a fixed feature no model was trained on."""
    return F.interpolate(pixels, size=(side_px, side_px), mode="area").flatten(1)


@torch.inference_mode()
def clip_image_features(clip, pixels: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    from huabi.train.clip import feature_tensor, images_for_vision

    image_px = int(clip.config.vision_config.image_size)
    rows = []
    for start in range(0, len(pixels), batch_size):
        batch = images_for_vision(pixels[start : start + batch_size], image_px)
        rows.append(F.normalize(feature_tensor(clip.get_image_features(pixel_values=batch)).float(), dim=-1))
    return torch.cat(rows)


@torch.inference_mode()
def clip_text_features(clip, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    from huabi.train.clip import feature_tensor
    from huabi.train.data import tokenize_captions

    ids = tokenize_captions(tokenizer, list(prompts))
    return F.normalize(feature_tensor(clip.get_text_features(input_ids=ids)).float(), dim=-1)


def nearest(query: torch.Tensor, keys: torch.Tensor, k: int, *, metric: str) -> torch.Tensor:
    """Indices [Q, k] of the k nearest keys (metric "l2" or "cosine" on normalised rows)."""
    if metric == "cosine":
        scores = query @ keys.T
    else:
        scores = -torch.cdist(query, keys)
    return scores.topk(k, dim=1).indices


def retrieval_ranks(neighbours: torch.Tensor, query_labels: Sequence[int], key_labels: torch.Tensor) -> list[int | None]:
    """Per query, the 1-based rank of the first neighbour of its own label (None: not among the neighbours)."""
    hits = key_labels[neighbours] == torch.as_tensor(query_labels).unsqueeze(1)  # [Q, kmax]
    first = hits.float().argmax(dim=1)
    return [int(rank) + 1 if found else None for rank, found in zip(first.tolist(), hits.any(dim=1).tolist())]


def retrieval_accuracy(neighbours: torch.Tensor, query_labels: Sequence[int], key_labels: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """Fraction of queries with a key of their own label among the first k neighbours."""
    ranks = retrieval_ranks(neighbours, query_labels, key_labels)
    return {f"top{k}": sum(rank is not None and rank <= k for rank in ranks) / len(ranks) for k in ks}


def text_to_image_accuracy(text: torch.Tensor, image: torch.Tensor, ks: Sequence[int]) -> dict[str, float]:
    """For prompt i, is image i among the k images most similar to it?"""
    order = (text @ image.T).argsort(dim=1, descending=True)
    rank = (order == torch.arange(len(text)).unsqueeze(1)).float().argmax(dim=1)
    return {f"top{k}": float((rank < k).float().mean()) for k in ks}


def clip_score(text: torch.Tensor, image: torch.Tensor) -> float:
    """Mean of 100 * max(cos, 0) over matching rows (torchmetrics' CLIPScore convention)."""
    return float((100.0 * (text * image).sum(dim=1).clamp(min=0)).mean())


# ---------------------------------------------------------------- generation


def generate_images(engine, bundle, prompts: Sequence[str], seeds: Sequence[int], config: FaithfulnessConfig, *, log=print) -> list[Image.Image]:
    """One image per (prompt, seed), prompts batched through the pipeline's CFG in groups."""
    from huabi.core.request import GenerationRequest
    from huabi.pipelines.txt2img import txt2img

    # Equal prompts share a batch (the pipeline takes one prompt per batch).
    groups: dict[str, list[int]] = {}
    for index, prompt in enumerate(prompts):
        groups.setdefault(prompt, []).append(index)
    by_index: dict[int, Image.Image] = {}
    for prompt, indices in groups.items():
        for start in range(0, len(indices), config.batch_size):
            chunk = indices[start : start + config.batch_size]
            request = GenerationRequest(prompt=prompt, steps=config.steps, sampler=config.sampler, cfg_scale=config.cfg_scale, seed=int(seeds[chunk[0]]))
            result = txt2img(bundle, request, [int(seeds[i]) for i in chunk], device=engine.device)
            before = len(by_index)
            by_index.update(zip(chunk, result.images, strict=True))
            if log is not None and len(by_index) // 50 > before // 50:
                log(f"  {len(by_index)}/{len(prompts)} images")
    return [by_index[i] for i in range(len(prompts))]


# ---------------------------------------------------------------- the evaluation


def pick_items(names: Sequence[str], count: int, seed: int) -> list[int]:
    """``count`` item indices with distinct names, seeded."""
    by_name: dict[str, int] = {}
    for index, name in enumerate(names):
        by_name.setdefault(name, index)
    unique = sorted(by_name.values())
    if count > len(unique):
        raise HuabiError(f"count {count} is more than the {len(unique)} distinct item names in the dataset")
    return sorted(random.Random(seed).sample(unique, count))


def evaluate(engine, bundle, clip, tokenizer, data_dir: Path, config: FaithfulnessConfig = FaithfulnessConfig(), *, log=print) -> dict:
    from huabi.data.folder import CaptionedFolder

    config.validate()
    log = log or (lambda message: None)
    folder = CaptionedFolder(data_dir)
    items = [item for item in folder.items if item.captions]
    names = [item.captions[0].strip().lower() for item in items]
    label_of = {name: i for i, name in enumerate(sorted(set(names)))}
    key_labels = torch.tensor([label_of[n] for n in names])
    size_px = bundle.native_size_px
    log(f"reading {len(items)} real images")
    real = to_pixels([Image.open(item.path) for item in items], size_px)
    real_thumbs = thumbnail_features(real)
    real_clip = clip_image_features(clip, real)

    chosen = pick_items(names, config.count, config.item_seed)
    prompts = [items[i].captions[0] for i in chosen]
    query_labels = [label_of[names[i]] for i in chosen]
    seeds = [config.seed + i for i in range(len(chosen))]
    text = clip_text_features(clip, tokenizer, prompts)
    kmax = max(config.ks)
    report: dict = {"config": asdict(config), "dataset_images": len(items), "distinct_names": len(label_of), "model": bundle.name}

    sets = {}
    for label, set_prompts in (("prompted", prompts), ("empty prompt (baseline)", [""] * len(prompts))):
        log(f"generating {len(prompts)} images: {label}")
        pixels = to_pixels(generate_images(engine, bundle, set_prompts, seeds, config, log=log), size_px)
        sets[label] = pixels
        image_clip = clip_image_features(clip, pixels)
        by_thumbnail = nearest(thumbnail_features(pixels), real_thumbs, kmax, metric="l2")
        by_clip_image = nearest(image_clip, real_clip, kmax, metric="cosine")
        report[label] = {
            "retrieval_thumbnail": retrieval_accuracy(by_thumbnail, query_labels, key_labels, config.ks),
            "retrieval_clip_image": retrieval_accuracy(by_clip_image, query_labels, key_labels, config.ks),
            "clip_score": clip_score(text, image_clip),
            "text_to_image": text_to_image_accuracy(text, image_clip, config.ks),
        }
        log(f"  {label}: {json.dumps(report[label])}")
        if label == "prompted":  # per item, to see which names are never drawn (rank None: beyond top-kmax)
            thumb_ranks = retrieval_ranks(by_thumbnail, query_labels, key_labels)
            clip_ranks = retrieval_ranks(by_clip_image, query_labels, key_labels)
            report["items"] = [
                {"prompt": prompt, "seed": seed, "thumbnail_rank": thumb_rank, "thumbnail_nearest": names[int(row[0])],
                 "clip_image_rank": clip_rank}
                for prompt, seed, thumb_rank, clip_rank, row in zip(prompts, seeds, thumb_ranks, clip_ranks, by_thumbnail.tolist())
            ]
    # chance: a random real image of the same name among k draws, averaged over the prompts
    counts = torch.bincount(key_labels, minlength=len(label_of)).float()
    share = counts[torch.tensor(query_labels)] / len(items)
    report["chance"] = {f"top{k}": float((1 - (1 - share) ** k).mean()) for k in config.ks}
    report["composed"] = evaluate_composed(engine, bundle, clip, tokenizer, real_thumbs, config, log=log)
    return report


def evaluate_composed(engine, bundle, clip, tokenizer, real_thumbs: torch.Tensor, config: FaithfulnessConfig, *, seeds_per_prompt: int = 4, log=print) -> dict:
    """Paraphrased/combined prompts: CLIP score vs the empty prompt, and distance to real images vs noise."""
    log = log or (lambda message: None)
    prompts = [p for p in COMPOSED_PROMPTS for _ in range(seeds_per_prompt)]
    seeds = [config.seed + i for i in range(len(prompts))]
    size_px = bundle.native_size_px
    composed = to_pixels(generate_images(engine, bundle, prompts, seeds, config, log=None), size_px)
    baseline = to_pixels(generate_images(engine, bundle, [""] * len(prompts), seeds, config, log=None), size_px)
    noise = torch.rand(len(prompts), 3, size_px, size_px, generator=torch.Generator().manual_seed(config.seed)) * 2 - 1
    text = clip_text_features(clip, tokenizer, prompts)
    per_prompt = {}
    composed_clip, baseline_clip = clip_image_features(clip, composed), clip_image_features(clip, baseline)
    for i, prompt in enumerate(COMPOSED_PROMPTS):
        rows = slice(i * seeds_per_prompt, (i + 1) * seeds_per_prompt)
        per_prompt[prompt] = {"clip_score": clip_score(text[rows], composed_clip[rows]), "baseline_clip_score": clip_score(text[rows], baseline_clip[rows])}

    def nn_distance(pixels: torch.Tensor) -> float:
        return float(torch.cdist(thumbnail_features(pixels), real_thumbs).min(dim=1).values.mean())

    result = {
        "prompts": per_prompt,
        "clip_score": clip_score(text, composed_clip),
        "baseline_clip_score": clip_score(text, baseline_clip),
        "nearest_real_thumbnail_distance": {"composed": nn_distance(composed), "empty prompt": nn_distance(baseline), "uniform noise": nn_distance(noise)},
    }
    log(f"composed prompts: {json.dumps({k: v for k, v in result.items() if k != 'prompts'})}")
    result["_images"] = composed  # for the grid; dropped before JSON
    return result


def composed_grid(images: torch.Tensor, seeds_per_prompt: int = 4) -> Image.Image:
    """Rows = composed prompts (in COMPOSED_PROMPTS order), columns = seeds."""
    from huabi.pipelines.common import to_pil
    from huabi.service.engine import image_grid

    return image_grid([to_pil(image) for image in images], columns=seeds_per_prompt)


def format_report(report: dict) -> str:
    ks = report["config"]["ks"]
    lines = [
        f"model {report['model']}: {report['config']['count']} prompts (item names), {report['config']['steps']} steps "
        f"{report['config']['sampler']}, CFG {report['config']['cfg_scale']}; {report['dataset_images']} real images, {report['distinct_names']} names",
        "| | " + " | ".join(f"thumb top-{k}" for k in ks) + " | " + " | ".join(f"CLIP-img top-{k}" for k in ks)
        + " | CLIP score | " + " | ".join(f"text->img top-{k}" for k in ks) + " |",
        "|---|" + "---:|" * (3 * len(ks) + 1),
    ]
    for label in ("prompted", "empty prompt (baseline)"):
        row = report[label]
        cells = [f"{100 * row['retrieval_thumbnail'][f'top{k}']:.1f}%" for k in ks]
        cells += [f"{100 * row['retrieval_clip_image'][f'top{k}']:.1f}%" for k in ks]
        cells += [f"{row['clip_score']:.1f}"]
        cells += [f"{100 * row['text_to_image'][f'top{k}']:.1f}%" for k in ks]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| chance (random real image) | " + " | ".join(f"{100 * report['chance'][f'top{k}']:.1f}%" for k in ks) + " | | | | | |")
    composed = report["composed"]
    lines.append("")
    lines.append(f"composed prompts: CLIP score {composed['clip_score']:.1f} vs {composed['baseline_clip_score']:.1f} with the empty prompt; "
                 "distance to the nearest real thumbnail " + ", ".join(f"{k} {v:.2f}" for k, v in composed["nearest_real_thumbnail_distance"].items()))
    for prompt, row in composed["prompts"].items():
        lines.append(f"  {prompt!r}: CLIP score {row['clip_score']:.1f} (empty prompt {row['baseline_clip_score']:.1f})")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    from huabi.train.recipe import DEFAULT_DATA_DIR

    parser = argparse.ArgumentParser(prog="python -m huabi.eval.faithfulness", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help="the captioned folder the model was trained on")
    parser.add_argument("--model", default=None, help="default: the built-in model")
    parser.add_argument("--clip", type=Path, default=None, help="CLIP pair file (default: the built-in huabi-mini-clip.safetensors)")
    parser.add_argument("--count", type=int, default=FaithfulnessConfig.count)
    parser.add_argument("--steps", type=int, default=FaithfulnessConfig.steps)
    parser.add_argument("--json", type=Path, default=None, help="write the numbers here")
    parser.add_argument("--grid", type=Path, default=None, help="write the composed-prompt grid here")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        from huabi.models.clip_pair import clip_pair_path, load_clip_pair
        from huabi.service.engine import Engine, builtin_model_path
        from huabi.train.data import default_tokenizer

        if args.threads:
            torch.set_num_threads(args.threads)
        engine = Engine(device="cpu", dtype="fp32")
        bundle = engine.load(args.model)
        clip_path = args.clip or clip_pair_path(builtin_model_path())
        clip = load_clip_pair(clip_path, text_encoder=bundle.text_encoders[0])
        config = FaithfulnessConfig(count=args.count, steps=args.steps)
        report = evaluate(engine, bundle, clip, default_tokenizer(), args.data, config)
        images = report["composed"].pop("_images")
        print(format_report(report))
        if args.json is not None:
            from huabi.models.files import atomic_write_text

            atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
        if args.grid is not None:
            from huabi.models.files import atomic_path

            with atomic_path(args.grid) as temp:
                composed_grid(images).save(temp)
    except HuabiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
