"""Which names a model never draws: a faithfulness JSON's per-item ranks, broken down by emoji group.

    python scripts/faithfulness_by_group.py docs/eval/huabi-mini-faithfulness-emoji-base.json \
        [--data ~/.cache/huabi/data/huabi-mini-emoji-base-128] [--misses 20]

Reads the ``items`` of a ``python -m huabi.eval.faithfulness --json`` report (prompt, thumbnail rank of the
first image of the prompted name, nearest name) and the dataset's ``metadata.jsonl`` (each item's CLDR
group and subgroup), and prints per group the number of prompts and the thumbnail top-1/top-10, then the
misses (not in the top 10) with what was drawn instead. Items without a group (clip-art) count as "(none)".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def group_of_prompt(data_dir: Path) -> dict[str, str]:
    """First caption (the evaluation's prompt) -> the item's group, from the dataset's metadata."""
    from huabi.data.build import read_metadata

    if not (data_dir / "metadata.jsonl").is_file():
        raise FileNotFoundError(f"{data_dir / 'metadata.jsonl'}: no such file")
    groups: dict[str, str] = {}
    for record in read_metadata(data_dir):
        if record.get("captions"):
            groups.setdefault(record["captions"][0], record.get("group") or "(none)")
    return groups


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("report", type=Path)
    parser.add_argument("--data", type=Path, default=Path.home() / ".cache/huabi/data/huabi-mini-emoji-base-128")
    parser.add_argument("--misses", type=int, default=20, help="how many misses to list")
    args = parser.parse_args(argv)
    try:
        items = json.loads(args.report.read_text(encoding="utf-8"))["items"]
        groups = group_of_prompt(args.data)
    except (OSError, KeyError, json.JSONDecodeError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    by_group: dict[str, list[dict]] = defaultdict(list)
    for item in items:
        by_group[groups.get(item["prompt"], "(none)")].append(item)
    print("| group | prompts | thumb top-1 | thumb top-10 |\n|---|---:|---:|---:|")
    for group, rows in sorted(by_group.items(), key=lambda entry: -len(entry[1])):
        top1 = sum(row["thumbnail_rank"] == 1 for row in rows) / len(rows)
        top10 = sum(row["thumbnail_rank"] is not None for row in rows) / len(rows)
        print(f"| {group} | {len(rows)} | {100 * top1:.1f}% | {100 * top10:.1f}% |")
    misses = [item for item in items if item["thumbnail_rank"] is None]
    print(f"\n{len(misses)} of {len(items)} prompts have no image of their name among the 10 nearest; the first {min(args.misses, len(misses))}:")
    for item in misses[: args.misses]:
        print(f"  {item['prompt']!r} ({groups.get(item['prompt'], '(none)')}) -> nearest {item['thumbnail_nearest']!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
