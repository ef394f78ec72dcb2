"""How close the text side puts a dataset's names to each other: the nearest other name of every name.

    python scripts/text_name_crowding.py [--model FILE] [--clip FILE]
        [--data ~/.cache/huabi/data/huabi-mini-emoji-base-128] [--report FAITHFULNESS.json]
        [--prompt "a cat" ...]

For every item's first caption (the faithfulness evaluation's prompt), the cosine to the most similar
other name, two ways: the CLIP pair's projected text feature (what the judge sees) and the text
encoder's whole 77-token state sequence, flattened with the padding (what the UNet's cross-attention
reads). Prints the median and 10th/90th percentiles; with ``--report`` (a ``python -m
huabi.eval.faithfulness --json`` file) the medians over its hits (thumbnail rank 1) and misses (no
image of the name in the top 10); with ``--prompt`` the five nearest names of each prompt.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def nearest_other(features):
    """Per row, (cosine, index) of the most similar other row; rows must be L2-normalised."""
    similarity = features @ features.T
    similarity.fill_diagonal_(-2.0)
    return similarity.max(dim=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the built-in model")
    parser.add_argument("--clip", type=Path, default=None, help="CLIP pair file (default: the built-in one)")
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache/huabi/data/huabi-mini-emoji-base-128")
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--prompt", action="append", default=[])
    args = parser.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from huabi.data.build import read_metadata
    from huabi.errors import HuabiError
    from huabi.eval.faithfulness import clip_text_features
    from huabi.models.clip_pair import clip_pair_path, load_clip_pair
    from huabi.service.engine import Engine, builtin_model_path
    from huabi.train.data import default_tokenizer, tokenize_captions

    try:
        if not (args.data / "metadata.jsonl").is_file():
            raise FileNotFoundError(f"{args.data / 'metadata.jsonl'}: no such file")
        first_captions = (record["captions"][0] for record in read_metadata(args.data) if record.get("captions"))
        names = list(dict.fromkeys(first_captions))  # each name once, in file order
        items = json.loads(args.report.read_text(encoding="utf-8"))["items"] if args.report else []
        bundle = Engine(device="cpu", dtype="fp32").load(args.model)
        encoder = bundle.text_encoders[0]
        clip_path = args.clip or clip_pair_path(builtin_model_path())
        clip = load_clip_pair(clip_path, text_encoder=encoder)
    except (OSError, KeyError, json.JSONDecodeError, HuabiError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    if len(names) < 2:
        print(f"error: {args.data}: fewer than 2 names", file=sys.stderr)
        return 2
    tokenizer = default_tokenizer()
    with torch.no_grad():
        projected = clip_text_features(clip, tokenizer, names)
        states = encoder(input_ids=tokenize_captions(tokenizer, names)).last_hidden_state
    index = {name: i for i, name in enumerate(names)}
    for label, features in (("projected text", projected), ("state sequence", F.normalize(states.flatten(1).float(), dim=-1))):
        cosine, _ = nearest_other(features)
        low, mid, high = (float(cosine.quantile(q)) for q in (0.1, 0.5, 0.9))
        line = f"{label}: nearest other name's cosine, median {mid:.3f} (10th-90th percentile {low:.3f}-{high:.3f})"
        hits = [float(cosine[index[item["prompt"]]]) for item in items if item["thumbnail_rank"] == 1 and item["prompt"] in index]
        misses = [float(cosine[index[item["prompt"]]]) for item in items if item["thumbnail_rank"] is None and item["prompt"] in index]
        if hits and misses:
            line += f"; hits {torch.tensor(hits).median():.3f} ({len(hits)}), misses {torch.tensor(misses).median():.3f} ({len(misses)})"
        print(line)
    if args.prompt:
        with torch.no_grad():
            queries = clip_text_features(clip, tokenizer, args.prompt)
        for prompt, row in zip(args.prompt, queries @ projected.T):
            top = row.topk(min(5, len(names)))
            print(f"{prompt!r} -> " + ", ".join(f"{names[i]} {v:.2f}" for v, i in zip(top.values.tolist(), top.indices.tolist())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
