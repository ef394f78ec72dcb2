"""``python -m huabi.train mini [--data DIR] [--state DIR] [--out FILE] [--stage STAGE]``
and ``python -m huabi.train lora|dreambooth|textual-inversion|finetune DATASET_DIR ...``.

``mini`` runs (or resumes) the huabi-mini recipe; safe to re-run at any time. See
docs/training.md. The user-training commands are in ``huabi.train.user_cli``.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from huabi.errors import HuabiError


def build_parser(prog: str = "python -m huabi.train") -> argparse.ArgumentParser:
    from huabi.train.recipe import DEFAULT_DATA_DIR, DEFAULT_STATE_DIR, STAGES

    parser = argparse.ArgumentParser(prog=prog, description="huabi's training recipes", allow_abbrev=False)
    sub = parser.add_subparsers(dest="command", required=True)
    for mode in ("lora", "dreambooth", "textual-inversion", "finetune"):  # parsed by huabi.train.user_cli
        sub.add_parser(mode, help=f"train a {mode} on your images (kohya flags; huabi train {mode} --help)", add_help=False)
    mini = sub.add_parser("mini", help="train (or resume) the built-in huabi-mini model")
    mini.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help=f"captioned image folder (default {DEFAULT_DATA_DIR})")
    mini.add_argument("--state", type=Path, default=DEFAULT_STATE_DIR, help=f"state dir outside the repo (default {DEFAULT_STATE_DIR})")
    mini.add_argument("--out", type=Path, default=None, help="exported checkpoint (default src/huabi/assets/models/huabi-mini.safetensors)")
    mini.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    mini.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    mini.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    mini.add_argument("--repo-log", type=Path, default=None, help="copy train.log here when a stage finishes")
    mini.add_argument("--force-export", action="store_true", help="re-run export even if it is marked done")
    mini.add_argument(
        "--snapshot", action="store_true",
        help="only export the model with the UNet's last saved state (EMA) of a UNet stage still in progress",
    )
    mini.add_argument(
        "--steps", action="append", default=[], metavar="STAGE=N",
        help="override a stage's step count (e.g. unet=200 for a trial run in a scratch state dir)",
    )
    v2 = sub.add_parser("mini-v2", help="train (or resume) huabi-mini v2, warm-started from the shipped v1 files")
    from huabi.train.mini_v2 import DEFAULT_V2_STATE_DIR, V2_STAGES

    v2.add_argument("--data", type=Path, default=DEFAULT_DATA_DIR, help=f"captioned image folder (default {DEFAULT_DATA_DIR})")
    v2.add_argument("--state", type=Path, default=DEFAULT_V2_STATE_DIR, help=f"state dir outside the repo (default {DEFAULT_V2_STATE_DIR})")
    v2.add_argument("--out", type=Path, default=None, help="exported checkpoint (default src/huabi/assets/models/huabi-mini.safetensors)")
    v2.add_argument("--base-model", type=Path, default=None, help="the v1 checkpoint to start from (default: the shipped one)")
    v2.add_argument("--stage", choices=(*V2_STAGES, "all"), default="all")
    v2.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    v2.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    v2.add_argument("--repo-log", type=Path, default=None, help="copy train.log here when a stage finishes")
    v2.add_argument("--force-export", action="store_true", help="re-run export even if it is marked done")
    v2.add_argument("--snapshot", action="store_true", help="only export the model with the UNet stage's last saved state (EMA) to --out")
    v2.add_argument("--steps", action="append", default=[], metavar="unet=N", help="the UNet stage's step count (extends a finished stage)")
    v2.add_argument("--recipe", choices=("v2", "v3", "v4", "v4-long", "centred"), default="v2",
                    help="v3: v2's UNet (--init-unet) continued on the emoji world; v4: v3 on a new VAE's latents (--init-vae); "
                         "v4-long: a trained v4 UNet (--init-unet, e.g. the shipped huabi-mini.safetensors) continued; "
                         "centred: centred latents, long cosine run (docs/training.md)")
    v2.add_argument("--init-unet", type=Path, default=None, metavar="STATE",
                    help="start the UNet stage from these weights (a torch file with 'state_dict' of the v2 layout, "
                         "or a huabi-mini .safetensors checkpoint: its UNet) instead of v1")
    v2.add_argument("--init-vae", type=Path, default=None, metavar="FILE",
                    help="encode and export with this VAE instead of v1's (a VAE stage's final.pt, e.g. from "
                         "`huabi.train mini --stage vae`); taken by the cache stage, latent scale re-estimated")
    return parser


def install_stop_handlers() -> dict:
    """Ctrl-C (SIGINT) and SIGTERM both mean: finish the current step, save, exit.

    Returns the flag dict the training loop polls. A second Ctrl-C aborts at
    once (KeyboardInterrupt), for when saving itself is the thing to stop.
    """
    stop = {"requested": False}

    def request_stop(signum, frame) -> None:
        if stop["requested"] and signum == signal.SIGINT:
            raise KeyboardInterrupt
        stop["requested"] = True
        stop["signal"] = int(signum)
        name = signal.Signals(signum).name
        print(f"huabi train: {name}: saving after this step (Ctrl-C again to abort without saving)",
              file=sys.stderr, flush=True)

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    return stop


def main(argv: Sequence[str] | None = None, *, prog: str = "python -m huabi.train") -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    from huabi.train.user_config import MODES

    if argv and argv[0] in MODES:  # user training: lora, dreambooth, textual-inversion, finetune
        from huabi.train.user_cli import main as user_main

        try:
            return user_main(argv[0], argv[1:])
        except HuabiError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    args = build_parser(prog).parse_args(argv)
    try:
        import torch

        from huabi.train.common import TrainingStopped
        from huabi.train.recipe import STAGES, MiniRecipe, RecipeRun, clip_out_path_for, default_out_path, run_recipe

        if args.threads:
            torch.set_num_threads(args.threads)
        if args.command == "mini-v2":
            return _main_v2(args)
        recipe = MiniRecipe()
        overrides: dict[str, dict] = {}
        for item in args.steps:
            stage, _, count = item.partition("=")
            if stage not in ("vae", "clip", "unet") or not count.isdigit() or int(count) < 1:
                raise HuabiError(f"--steps expects vae=N, clip=N or unet=N with N >= 1, got {item!r}")
            overrides[stage] = {"steps": int(count)}
        if overrides:
            recipe = recipe.with_overrides(**overrides)
        out = args.out if args.out is not None else default_out_path()
        stop = install_stop_handlers()
        run = RecipeRun(
            data_dir=args.data,
            state_dir=args.state,
            out_path=out,
            clip_out_path=clip_out_path_for(out),
            device=torch.device(args.device),
            repo_log=args.repo_log,
            should_stop=lambda: stop["requested"],
        )
        if args.snapshot:
            from huabi.train.recipe import export_snapshot

            summary = export_snapshot(run, recipe)
            print(f"{summary['out']} ({summary['size_mb']} MB)")
            return 0
        stages = STAGES if args.stage == "all" else (args.stage,)
        try:
            run_recipe(run, recipe, stages, force_export=args.force_export)
        except TrainingStopped as exc:
            run.log(f"[recipe] {exc}")
            return 128 + stop.get("signal", signal.SIGTERM)  # 130 after Ctrl-C, 143 after SIGTERM
        except BaseException as exc:
            run.log(f"[recipe] stopped: {type(exc).__name__}: {exc}")
            raise
    except HuabiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _main_v2(args) -> int:
    import torch

    from huabi.train.common import TrainingStopped
    from huabi.train.mini_v2 import RECIPES, V2_STAGES, run_v2, write_v2_export
    from huabi.train.recipe import RecipeRun, clip_out_path_for, default_out_path

    recipe = RECIPES[args.recipe]
    for item in args.steps:
        stage, _, count = item.partition("=")
        if stage != "unet" or not count.isdigit() or int(count) < 1:
            raise HuabiError(f"--steps expects unet=N with N >= 1 (v2 trains only the UNet), got {item!r}")
        recipe = recipe.with_overrides(unet={"steps": int(count)})
    out = args.out if args.out is not None else default_out_path()
    stop = {"requested": False}
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.update(requested=True))
    run = RecipeRun(
        data_dir=args.data, state_dir=args.state, out_path=out, clip_out_path=clip_out_path_for(out),
        device=torch.device(args.device), repo_log=args.repo_log, should_stop=lambda: stop["requested"],
    )
    if args.snapshot:
        summary = write_v2_export(run, recipe, snapshot=True)
        print(f"{summary['out']} ({summary['size_mb']} MB, UNet step {summary['unet_step']})")
        return 0
    stages = V2_STAGES if args.stage == "all" else (args.stage,)
    try:
        run_v2(run, recipe, stages, base_model=args.base_model, force_export=args.force_export, init_unet=args.init_unet, init_vae=args.init_vae)
    except TrainingStopped as exc:
        run.log(f"[recipe] {exc}")
        return 143
    except BaseException as exc:
        run.log(f"[recipe] stopped: {type(exc).__name__}: {exc}")
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
