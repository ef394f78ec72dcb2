"""A/B for huabi-mini v3's first lever: does training on centred latents help?

Two fine-tunes of the finished v2 UNet, identical except for the latents they learn:

    old       the v2 cache as trained so far (v1 VAE means x v1's scaling factor 0.26726:
              variance 1 overall, but per-channel means -1.11/-0.47/-1.74/+0.81, so the
              content's variance is only 0.112 in the UNet's units)
    centred   the same means, centred and scaled per channel: (z - mean_c) / std_c. The VAE
              that produces and decodes these is v1's with the shift/scale folded exactly into
              quant_conv / post_quant_conv (huabi.train.mini_v2.centred_vae), file
              scaling factor 1.0, so the exported file loads like any huabi-mini.
    emoji     the old latents, emoji items only (names that describe the picture; 2.5x the
              exposures per emoji item in the same steps): does recall rise with exposure?
    decay     the old latents, all items, the LR decayed by a cosine from 1.5e-4 to 1.5e-5 over
              the arm's steps (the others keep it constant): is recall held down by the
              optimiser's noise floor rather than by exposures or capacity?
    evalset   the old latents, only the 300 items the faithfulness evaluation draws (~160
              exposures per item in 1,500 steps, 30x the full set's): can this UNet store
              these names -> pictures at all? High recall = the full set is limited by
              exposures x capacity; low = the conditioning cannot tell the names apart.
              ``--extra-items N`` adds N other training items (seeded), ``--name`` keeps such
              runs apart: recall against items stored at equal exposures.

Same seed, data order, noise, timesteps, LR (constant after warm-up), steps and EMA. Each arm
is resumable (state saved every 5 minutes and on SIGTERM); exports go next to the states and
are scored with ``scripts/mini_diagnose.py sample --model FILE`` (the fixed 100 items).

    python scripts/mini_centre_ab.py train --arm old --threads 1
    python scripts/mini_centre_ab.py train --arm centred --threads 1
    python scripts/mini_centre_ab.py export --arm centred     # -> WORK/centred/huabi-mini-centred-STEP.safetensors
    python scripts/mini_centre_ab.py export --arm centred --snapshot   # the running arm's last save (EMA)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

DEFAULT_WORK = Path.home() / ".cache" / "huabi" / "diag" / "centre-ab"
V2_STATE = Path.home() / ".cache" / "huabi" / "train" / "huabi-mini-v2"


def cache_names(v2_state: Path) -> list[str]:
    """The image file of each cache row (the cache's rows follow the data stage's name list)."""
    return json.loads((v2_state / "data" / "pixels-128.json").read_text(encoding="utf-8"))["names"]


def emoji_items(v2_state: Path) -> list[int]:
    """Cache rows of the emoji images, by the same source rule the diagnosis scores with."""
    from mini_diagnose import source_of  # a sibling script: scripts/ is on the path when run

    names = cache_names(v2_state)
    return [i for i, name in enumerate(names) if source_of(Path(name).name) == "emoji"]


def evalset_items(v2_state: Path, diag_work: Path, extra: int = 0) -> list[int]:
    """Cache rows of the faithfulness evaluation's 300 items (``mini_diagnose.py real``'s list), by
    file name (the cache follows the data stage's name list, the diagnosis the folder's order),
    plus ``extra`` other rows drawn with a fixed seed."""
    import random

    from mini_diagnose import load_real

    real = load_real(diag_work)
    wanted = {real["files"][i] for i in real["eval_items"]}
    names = cache_names(v2_state)
    rows = [i for i, name in enumerate(names) if Path(name).name in wanted]
    if len(rows) != len(wanted):
        raise SystemExit(f"evalset: {len(wanted)} evaluation files but {len(rows)} cache rows match")
    taken = set(rows)
    others = [i for i in range(len(names)) if i not in taken]
    return sorted(rows + random.Random(20261207).sample(others, extra))


def items_cache(cache, rows: list[int]):
    """``cache`` restricted to ``rows`` (the text states stay whole: caption ids index them)."""
    return dataclasses.replace(cache, latents=cache.latents[rows], caption_ids=[cache.caption_ids[i] for i in rows])


def run_name(args) -> str:
    """The run's folder under --work and its exports' name: --name, else the arm."""
    return args.name or args.arm


def arm_setup(args):
    from huabi.train.cache import load_cache
    from huabi.train.mini_v2 import MiniV2Recipe, centred_cache, channel_stats

    recipe = MiniV2Recipe()
    cache = load_cache(args.v2_state / "cache")
    stats = None
    if args.arm == "centred":
        stats = channel_stats(cache.latents)
        cache = centred_cache(cache, *stats)
    elif args.arm == "emoji":
        cache = items_cache(cache, emoji_items(args.v2_state))
    elif args.arm == "evalset":
        from mini_diagnose import DEFAULT_WORK as DIAG_WORK

        cache = items_cache(cache, evalset_items(args.v2_state, DIAG_WORK, args.extra_items))
    config = dataclasses.replace(recipe.unet, steps=args.steps, ema_decay=args.ema, warmup_steps=100, seed=recipe.unet.seed + 1)
    if args.arm == "decay":
        config = dataclasses.replace(config, lr_schedule="cosine", min_lr_ratio=0.1)
    return recipe, cache, config, stats


def cmd_train(args) -> None:
    from huabi.train.common import TrainLog, atomic_torch_save, config_dict, load_torch_file
    from huabi.train.unet import train_unet

    recipe, cache, config, stats = arm_setup(args)
    out = args.work / run_name(args)
    out.mkdir(parents=True, exist_ok=True)
    log = TrainLog(out / "train.log")
    final = load_torch_file(args.v2_state / "unet" / "final.pt", what="v2 UNet weights")
    unet = recipe.unet_model.build()
    unet.load_state_dict(final["state_dict"])
    log(f"[ab] arm {args.arm}: {len(cache)} latents, scaling {cache.scaling_factor:.5f}, "
        f"scaled variance {float((cache.latents * cache.scaling_factor).var()):.4f}; {config}")
    started = time.time()
    unet, ema = train_unet(config, cache, model_config=recipe.unet_model, unet=unet, state_path=out / "state.pt", log=log)
    if ema is not None:
        ema.copy_to(unet)
    record = {"model_config": config_dict(recipe.unet_model), "state_dict": unet.state_dict()}
    if stats is not None:
        record["channel_mean"], record["channel_std"] = stats
    atomic_torch_save(record, out / "final.pt")
    log(f"[ab] arm {args.arm} done in {time.time() - started:.0f} s")


def cmd_export(args) -> None:
    from huabi.models.files import atomic_copy
    from huabi.models.load import load_model
    from huabi.models.save import save_single_file
    from huabi.train.common import load_torch_file
    from huabi.train.mini_v2 import MiniV2Recipe, mini_parts

    recipe = MiniV2Recipe()
    out = args.work / run_name(args)
    if args.snapshot:
        from huabi.train.cache import load_cache
        from huabi.train.common import ema_weights
        from huabi.train.mini_v2 import channel_stats

        state = load_torch_file(out / "state.pt", what=f"{args.arm} training state")
        weights = ema_weights(state["modules"]["unet"], state["ema"]["shadow"]) if state.get("ema") else state["modules"]["unet"]
        step = int(state["step"])
        stats = channel_stats(load_cache(args.v2_state / "cache").latents) if args.arm == "centred" else None
    else:
        final = load_torch_file(out / "final.pt", what=f"{args.arm} UNet")
        weights, step = final["state_dict"], args.steps
        stats = (final["channel_mean"], final["channel_std"]) if "channel_mean" in final else None
    base = load_model(args.v2_state / "base" / "huabi-mini-v1.safetensors", compute_hash=False)
    parts = mini_parts(base, recipe, weights, stats)
    path = out / f"huabi-mini-{run_name(args)}-{step}.safetensors"
    save_single_file(parts, path, dtype=torch.float16, metadata={"huabi.trained_by": f"scripts/mini_centre_ab.py {args.arm}"})
    atomic_copy(args.v2_state / "base" / "huabi-mini-v1-clip.safetensors", out / f"huabi-mini-{run_name(args)}-{step}-clip.safetensors")
    print(json.dumps({"out": str(path), "step": step, "size_mb": round(path.stat().st_size / 1e6, 2)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("train", "export"))
    parser.add_argument("--arm", choices=("old", "centred", "emoji", "decay", "evalset"), required=True)
    parser.add_argument("--name", help="the run's folder under --work (default: the arm)")
    parser.add_argument("--extra-items", type=int, default=0, help="evalset: this many other items too")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK)
    parser.add_argument("--v2-state", type=Path, default=V2_STATE)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--ema", type=float, default=0.995, help="EMA decay (a ~200-step window: the arms adapt fast)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--snapshot", action="store_true", help="export: the last saved training state (EMA), not final.pt")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    {"train": cmd_train, "export": cmd_export}[args.command](args)


if __name__ == "__main__":
    main()
