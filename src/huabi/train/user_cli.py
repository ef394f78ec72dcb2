"""``huabi train lora|dreambooth|textual-inversion|finetune DATASET_DIR [flags]``.

Every setting of :class:`~huabi.train.user_config.UserTrainConfig` is a flag in kohya's
name, kebab-cased (``--network-dim 16``, ``--max-train-steps 800``); ``--config FILE.toml``
gives the same settings (kohya spelling with ``_`` or ``-``), flags win over the file.
Re-running the same command resumes from the saved state; SIGTERM / Ctrl-C saves the state
and exits (143 / 130).
"""

from __future__ import annotations

import argparse
import signal
import sys
import types
import typing
from collections.abc import Sequence
from dataclasses import MISSING, fields
from pathlib import Path

from huabi.errors import HuabiError
from huabi.train.user_config import MODES, UserTrainConfig, read_toml_config

_HELP = {
    "model": "base checkpoint (any file huabi loads; default: the built-in huabi-mini)",
    "output": "the file to write (.safetensors)",
    "reg_data_dir": "class (regularization) images for DreamBooth prior preservation, kohya layout",
    "resolution": "base (longest) side of the buckets, a multiple of 64",
    "network_module": "lora, locon, loha, lokr or oft (kohya's networks.lora / lycoris names accepted)",
    "network_alpha": "LoRA scale alpha/dim; for OFT the Cayley constraint (0: none)",
    "mixed_precision": "no, fp16 (CUDA, with loss scaling), bf16, or auto (bf16 where the device runs it natively)",
    "num_class_images": "DreamBooth: generate class images with the base model until the class folder has this many",
    "full_weights": "DreamBooth: train the UNet itself (written as a checkpoint) instead of a LoRA",
    "ema_decay": "fine-tune: EMA decay of the UNet weights (0: no EMA); the file holds the EMA weights",
    "sample_prompts": "prompts file, one per line, kohya flags --n --w --h --d --s --l",
    "max_train_epochs": "train this many epochs (overrides --max-train-steps: epochs x ceil(batches per epoch / accumulation))",
    "cache_latents": "keep the VAE latents of every image (default: yes, unless --random-crop/--color-aug)",
    "flip_aug": "mirror each sample left-right with probability 1/2 (cached latents keep both flips)",
    "random_crop": "random instead of centred crop inside the bucket (no latent caching)",
    "color_aug": "kohya's colour augmentation: hue +-16 degrees or gamma 0.95-1.05, a third of the samples (no latent caching)",
    "use_object_template": "textual inversion: ignore captions, train on object templates ('a photo of TOKEN', ...)",
    "use_style_template": "textual inversion: ignore captions, train on style templates ('a painting in the style of TOKEN', ...)",
    "eval_prompts": "prompts file for the report's before/after CLIP score and FID (default: --sample-prompts)",
    "evaluate": "measure CLIP score / FID before and after training when a prompt set is given",
    "eval_features": "feature extractor file for the report (Inception or CLIP; default: huabi-mini's towers)",
    "eval_at_samples": "also measure the sample images at every sample point",
    "token_string": "textual inversion: the new word used in prompts (and the embedding's name)",
}


def _base_type(annotation) -> type:
    hint = annotation if not isinstance(annotation, str) else eval(annotation, {}, {})  # dataclass string annotations
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return hint


def build_parser(mode: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"huabi train {mode}", description=f"train a {mode} (kohya sd-scripts flags, kebab-case)")
    parser.add_argument("train_data_dir", nargs="?", default=None, metavar="DATASET_DIR",
                        help="kohya-style dataset folder (N_name sub-folders)")
    parser.add_argument("--config", type=Path, default=None, help="TOML file with the same settings")
    for item in fields(UserTrainConfig):
        if item.name in ("mode", "train_data_dir"):
            continue
        flag = "--" + item.name.replace("_", "-")
        kind = _base_type(item.type)
        default = item.default if item.default is not MISSING else None
        help_text = _HELP.get(item.name, "") + (f" (default {default})" if default not in (None, "") else "")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text or None)
        else:
            parser.add_argument(flag, type=kind, default=None, help=help_text or None)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser


def config_from_args(mode: str, argv: Sequence[str]) -> tuple[UserTrainConfig, argparse.Namespace]:
    args = build_parser(mode).parse_args(list(argv))
    values = read_toml_config(args.config) if args.config is not None else {}
    for item in fields(UserTrainConfig):
        value = getattr(args, item.name, None)
        if value is not None:
            values[item.name] = value
    values["mode"] = mode
    for required in ("train_data_dir", "output"):
        if not values.get(required):
            raise HuabiError(f"{'DATASET_DIR' if required == 'train_data_dir' else '--output'} is required")
    try:
        config = UserTrainConfig(**values)
    except TypeError as exc:
        raise HuabiError(f"bad settings: {exc}") from None
    config.validate()
    return config, args


def main(mode: str, argv: Sequence[str]) -> int:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if mode not in MODES:
        raise HuabiError(f"unknown training mode {mode!r}; one of {', '.join(MODES)}")
    config, args = config_from_args(mode, argv)
    import torch

    from huabi.train.user_train import TrainingStopped, UserTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    stop = {"signal": None}

    def request_stop(signum, frame) -> None:  # finish the current step, save, exit
        stop["signal"] = signum

    previous = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        trainer = UserTrainer(config, log=lambda message: print(message, file=sys.stderr, flush=True))
        result = trainer.run(should_stop=lambda: stop["signal"] is not None)
    except TrainingStopped as exc:
        print(str(exc), file=sys.stderr)
        return 130 if stop["signal"] == signal.SIGINT else 143
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(result.output)
    return 0
