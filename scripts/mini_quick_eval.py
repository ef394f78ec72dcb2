"""A cheap progress check of a huabi-mini checkpoint while it trains.

    python scripts/mini_quick_eval.py [--model FILE] [--clip FILE] [--every 5] [--threads 1]

Every ``--every``-th of the 300 items (they are sorted by file name, so a stride keeps the
mix of clip-art and emoji; the first 60 would be nearly all clip-art animals) that ``python -m huabi.eval.faithfulness`` draws,
with that evaluation's seeds and settings, prompted only (no baseline, no composed
prompts): nearest real image by thumbnail and by the CLIP image tower (top-1/top-10),
CLIP score and text-to-image retrieval. The numbers are comparable between checkpoints
(same items, same seeds), not with the full 300-item table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main() -> None:
    from huabi.data.folder import CaptionedFolder
    from huabi.eval.faithfulness import (
        FaithfulnessConfig,
        clip_image_features,
        clip_score,
        clip_text_features,
        generate_images,
        nearest,
        pick_items,
        retrieval_accuracy,
        text_to_image_accuracy,
        thumbnail_features,
        to_pixels,
    )
    from huabi.models.clip_pair import load_clip_pair
    from huabi.service.engine import Engine
    from huabi.train.data import default_tokenizer
    from huabi.train.recipe import DEFAULT_DATA_DIR, clip_out_path_for, default_out_path
    from PIL import Image

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--clip", type=Path, default=None)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--every", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = args.model or default_out_path()
    clip_path = args.clip or clip_out_path_for(model)
    started = time.time()
    engine = Engine(device="cpu", dtype="fp32")
    bundle = engine.load(str(model))
    clip = load_clip_pair(clip_path, text_encoder=bundle.text_encoders[0])
    config = FaithfulnessConfig()
    items = [item for item in CaptionedFolder(args.data).items if item.captions]
    names = [item.captions[0].strip().lower() for item in items]
    label_of = {name: i for i, name in enumerate(sorted(set(names)))}
    key_labels = torch.tensor([label_of[n] for n in names])
    real = to_pixels([Image.open(item.path) for item in items], bundle.native_size_px)
    picked = pick_items(names, config.count, config.item_seed)
    positions = list(range(0, len(picked), args.every))
    chosen = [picked[p] for p in positions]
    prompts = [items[i].captions[0] for i in chosen]
    labels = [label_of[names[i]] for i in chosen]
    seeds = [config.seed + p for p in positions]  # each item keeps its seed from the full evaluation
    with torch.inference_mode():
        pixels = to_pixels(generate_images(engine, bundle, prompts, seeds, config, log=None), bundle.native_size_px)
        text = clip_text_features(clip, default_tokenizer(), prompts)
        image_clip = clip_image_features(clip, pixels)
        report = {
            "model": str(model),
            "items": len(prompts),
            "retrieval_thumbnail": retrieval_accuracy(nearest(thumbnail_features(pixels), thumbnail_features(real), 10, metric="l2"), labels, key_labels, (1, 10)),
            "retrieval_clip_image": retrieval_accuracy(nearest(image_clip, clip_image_features(clip, real), 10, metric="cosine"), labels, key_labels, (1, 10)),
            "clip_score": round(clip_score(text, image_clip), 2),
            "text_to_image": text_to_image_accuracy(text, image_clip, (1, 10)),
            "wall_s": round(time.time() - started),
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
