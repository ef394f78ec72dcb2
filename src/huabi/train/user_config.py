"""Settings of a user training run (``huabi train lora|dreambooth|textual-inversion|finetune``).

Field names are kohya sd-scripts' option names (``network_dim``, ``max_train_steps``...),
so a kohya command line or TOML translates directly: the CLI takes them in kebab-case
(``--network-dim``), a ``--config`` TOML file with either spelling.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from huabi.errors import HuabiError
from huabi.train.buckets import check_resolution

MODES = ("lora", "dreambooth", "textual-inversion", "finetune")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("AdamW", "Adafactor", "SGD")
MIXED_PRECISIONS = ("no", "fp16", "bf16", "auto")
NETWORK_MODULES = {"lora": "lora", "networks.lora": "lora", "locon": "locon", "loha": "loha", "oft": "oft",
                   "lokr": "lokr", "lycoris.lokr": "lokr",
                   "lycoris.locon": "locon", "lycoris.loha": "loha", "diag-oft": "oft", "networks.oft": "oft"}


@dataclass(frozen=True)
class UserTrainConfig:
    mode: str
    train_data_dir: str
    output: str
    model: str | None = None  # path/name; None: huabi-mini
    reg_data_dir: str | None = None
    # data
    resolution: int = 512
    enable_bucket: bool = True
    min_bucket_reso: int = 256
    bucket_no_upscale: bool = False
    max_bucket_aspect_error: float | None = None
    caption_extension: str = ".caption"
    class_tokens: str | None = None
    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    cache_latents: bool | None = None  # None: cache unless --random-crop/--color-aug need new pixels every step
    cache_latents_to_disk: bool = False
    flip_aug: bool = False
    random_crop: bool = False
    color_aug: bool = False
    cache_dir: str | None = None  # default: <output>.cache
    # loop
    max_train_steps: int = 1600
    max_train_epochs: int | None = None  # overrides max_train_steps (kohya): epochs * ceil(batches per epoch / accumulation)
    train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    seed: int = 42
    learning_rate: float = 1e-4
    unet_lr: float | None = None
    text_encoder_lr: float | None = None
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_scheduler_num_cycles: int = 1
    lr_scheduler_power: float = 1.0
    optimizer_type: str = "AdamW"
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    min_snr_gamma: float = 0.0
    noise_offset: float = 0.0
    mixed_precision: str = "no"
    gradient_checkpointing: bool = False
    device: str = "cpu"
    # network (lora, and dreambooth with a network)
    network_module: str = "lora"
    network_dim: int = 4
    network_alpha: float = 1.0
    conv_dim: int = 0
    conv_alpha: float = 1.0
    network_dropout: float = 0.0
    network_train_unet_only: bool = False
    network_train_text_encoder_only: bool = False
    # dreambooth
    prior_loss_weight: float = 1.0
    class_prompt: str | None = None
    num_class_images: int = 0  # generate class images with the base model up to this many
    full_weights: bool = False  # dreambooth: train the UNet itself instead of a LoRA
    # textual inversion
    token_string: str | None = None
    init_word: str | None = None
    num_vectors_per_token: int = 1
    use_object_template: bool = False  # textual inversion: train on template captions ("a photo of {}"...), not the files'
    use_style_template: bool = False  # the same with style templates ("a painting in the style of {}"...)
    # finetune
    train_text_encoder: bool = False
    ema_decay: float = 0.0  # finetune: 0 disables the EMA
    save_precision: str = "fp16"  # fp16, bf16 or float for the written file
    # saving, samples, resume
    save_every_n_steps: int = 0
    save_every_n_epochs: int = 0
    save_state_dir: str | None = None  # default: <output>.state
    sample_every_n_steps: int = 0
    sample_prompts: str | None = None
    sample_sampler: str = "Euler a"
    # evaluation in the training report (huabi.train.evaluation)
    eval_prompts: str | None = None  # prompts file (kohya line flags); default: the sample prompts
    evaluate: bool = True  # with a prompt set: before/after CLIP score and FID at the end of training
    eval_features: str | None = None  # extractor file (Inception/CLIP); default: huabi-mini's towers
    eval_at_samples: bool = False  # also CLIP score/FID of the sample images at every sample point
    output_name: str | None = None
    training_comment: str = ""

    def validate(self) -> None:
        if self.mode not in MODES:
            raise HuabiError(f"training mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        check_resolution(self.resolution)
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "num_vectors_per_token"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HuabiError(f"{name.replace('_', '-')} must be an integer >= 1, got {value!r}")
        if self.max_train_epochs is not None and (isinstance(self.max_train_epochs, bool) or not isinstance(self.max_train_epochs, int)
                                                  or self.max_train_epochs < 1):
            raise HuabiError(f"max-train-epochs must be an integer >= 1, got {self.max_train_epochs!r}")
        if (self.random_crop or self.color_aug) and (self.cache_latents or self.cache_latents_to_disk):
            raise HuabiError("--random-crop and --color-aug change the pixels at every step, so latents cannot be cached: "
                             "drop --cache-latents/--cache-latents-to-disk (kohya refuses the same)")
        if self.mode in ("lora",) or (self.mode == "dreambooth" and not self.full_weights):
            if isinstance(self.network_dim, bool) or not isinstance(self.network_dim, int) or self.network_dim <= 0:
                raise HuabiError(f"network-dim (rank) must be an integer > 0, got {self.network_dim!r}")
            if self.network_module not in NETWORK_MODULES:
                raise HuabiError(f"network-module must be one of {', '.join(sorted(NETWORK_MODULES))}, got {self.network_module!r}")
        for name in ("learning_rate", "unet_lr", "text_encoder_lr"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0):
                raise HuabiError(f"{name.replace('_', '-')} must be a number >= 0, got {value!r}")
        if self.lr_scheduler not in LR_SCHEDULERS:
            raise HuabiError(f"lr-scheduler must be one of {', '.join(LR_SCHEDULERS)}, got {self.lr_scheduler!r}")
        if self.optimizer_type not in OPTIMIZERS:
            raise HuabiError(f"optimizer-type must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer_type!r}")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise HuabiError(f"mixed-precision must be one of {', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}")
        for name in ("caption_dropout_rate", "network_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise HuabiError(f"{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)!r}")
        if self.save_every_n_steps < 0 or self.save_every_n_epochs < 0:
            raise HuabiError("save-every-n-steps and save-every-n-epochs must be >= 0")
        if self.keep_tokens < 0 or self.lr_warmup_steps < 0 or self.min_snr_gamma < 0 or self.noise_offset < 0:
            raise HuabiError("keep-tokens, lr-warmup-steps, min-snr-gamma and noise-offset must be >= 0")
        if self.network_train_unet_only and self.network_train_text_encoder_only:
            raise HuabiError("network-train-unet-only and network-train-text-encoder-only exclude each other")
        if self.mode == "textual-inversion" and not self.token_string:
            raise HuabiError("textual inversion needs --token-string (the placeholder word used in prompts)")
        if (self.use_object_template or self.use_style_template) and self.mode != "textual-inversion":
            raise HuabiError("--use-object-template/--use-style-template are for textual-inversion only")
        if self.use_object_template and self.use_style_template:
            raise HuabiError("--use-object-template and --use-style-template exclude each other")
        if self.mode == "dreambooth" and self.num_class_images and not self.class_prompt:
            raise HuabiError("--num-class-images needs --class-prompt to generate class images with")
        if self.mode == "dreambooth" and self.num_class_images and not self.reg_data_dir:
            raise HuabiError("--num-class-images needs --reg-data-dir (the folder generated class images go to)")
        if not 0.0 <= self.ema_decay < 1.0:
            raise HuabiError(f"ema-decay must be in [0, 1), got {self.ema_decay!r}")
        if self.save_precision not in ("fp16", "bf16", "float"):
            raise HuabiError(f"save-precision must be fp16, bf16 or float, got {self.save_precision!r}")
        if self.sample_every_n_steps and not self.sample_prompts:
            raise HuabiError("--sample-every-n-steps needs --sample-prompts FILE")
        if self.eval_at_samples and not self.sample_every_n_steps:
            raise HuabiError("--eval-at-samples needs --sample-every-n-steps and --sample-prompts")
        if Path(self.output).suffix.lower() != ".safetensors":
            raise HuabiError(f"output must be a .safetensors file, got {self.output!r}")

    # ---- derived
    @property
    def network_kind(self) -> str:
        return NETWORK_MODULES.get(self.network_module, self.network_module)

    @property
    def caches_latents(self) -> bool:
        if self.cache_latents is not None:
            return self.cache_latents or self.cache_latents_to_disk
        return self.cache_latents_to_disk or not (self.random_crop or self.color_aug)

    @property
    def uses_network(self) -> bool:
        return self.mode == "lora" or (self.mode == "dreambooth" and not self.full_weights)

    @property
    def state_dir(self) -> Path:
        return Path(self.save_state_dir) if self.save_state_dir else Path(self.output).with_suffix(".state")

    @property
    def name(self) -> str:
        return self.output_name or Path(self.output).stem

    def resume_record(self) -> dict[str, Any]:
        """Settings that must match for a resume (the ones that change the result)."""
        ignored = {"max_train_steps", "max_train_epochs", "cache_latents", "save_every_n_steps", "save_every_n_epochs", "save_state_dir", "sample_every_n_steps", "sample_prompts",
                   "sample_sampler", "eval_prompts", "evaluate", "eval_features", "eval_at_samples", "output", "output_name", "training_comment", "cache_latents_to_disk", "cache_dir",
                   "device", "num_class_images", "class_prompt"}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ignored}


FIELD_NAMES = frozenset(f.name for f in fields(UserTrainConfig))


def read_toml_config(path: str | Path) -> dict[str, Any]:
    """A kohya-style TOML file: keys with ``_`` or ``-``, at top level or in any table."""
    import tomllib

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise HuabiError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise HuabiError(f"config file {path} cannot be read: {exc}") from None
    flat: dict[str, Any] = {}

    def walk(table: dict) -> None:
        for key, value in table.items():
            if isinstance(value, dict):
                walk(value)
                continue
            name = key.replace("-", "_")
            name = {"pretrained_model_name_or_path": "model", "output_file": "output"}.get(name, name)
            if name not in FIELD_NAMES:
                raise HuabiError(f"config file {path}: unknown setting {key!r}")
            flat[name] = value

    walk(data)
    return flat
