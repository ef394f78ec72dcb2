"""Train huabi-mini's VAE alone, with changes to its recipe, to see what brings colours back.

    PYTHONPATH=src .venv/bin/python scripts/vae_probe.py --state DIR [--steps 3000] [--chroma-weight W]
        [--norm-groups G] [--latent-channels C] [--data DIR] [--threads 1]

Runs ``huabi.train.recipe``'s VAE stage (v1's model and loss, from scratch) with ``--steps`` and the
chroma term of ``VAETrainConfig``; resumable (state every 5 minutes and on SIGTERM; re-run the same
command), and its log gives PSNR and per-hue fidelity at every save. The finished ``DIR/vae/final.pt``
is what ``python -m huabi.train mini-v2 --init-vae`` takes. ``scripts/vae_colour.py --vae`` measures
it (or the running ``DIR/vae/state.pt``) on more images.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main() -> int:
    import torch

    from huabi.errors import HuabiError
    from huabi.train.__main__ import install_stop_handlers
    from huabi.train.common import TrainingStopped
    from huabi.train.recipe import DEFAULT_DATA_DIR, MiniRecipe, RecipeRun, is_done, stage_vae

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--chroma-weight", type=float, default=0.0)
    parser.add_argument("--latent-channels", type=int, default=None, help="latent channels (v1: 4)")
    parser.add_argument("--norm-groups", type=int, default=None,
                        help="GroupNorm groups of the autoencoder (v1: 32, i.e. one channel per group at its 32-wide level)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    stop = install_stop_handlers()
    run = RecipeRun(data_dir=args.data, state_dir=args.state, out_path=args.state / "unused.safetensors",
                    clip_out_path=args.state / "unused-clip.safetensors", should_stop=lambda: stop["requested"])
    try:
        overrides = {"vae": {"steps": args.steps, "chroma_weight": args.chroma_weight}}
        model = {"norm_num_groups": args.norm_groups, "latent_channels": args.latent_channels}
        if any(value is not None for value in model.values()):
            overrides["vae_model"] = {name: value for name, value in model.items() if value is not None}
        recipe = MiniRecipe().with_overrides(**overrides)
        recipe.vae.validate()
        if is_done(args.state, "vae"):
            print(f"{args.state / 'vae' / 'final.pt'} is finished")
            return 0
        stage_vae(run, recipe)
    except TrainingStopped as exc:
        run.log(f"[vae-probe] {exc}")
        return 143
    except HuabiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(args.state / "vae" / "final.pt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
