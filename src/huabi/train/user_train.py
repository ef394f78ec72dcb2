"""One training loop for user training: LoRA/LyCORIS, DreamBooth, textual inversion, fine-tune.

Per run: (1) load the base model; (2) scan the kohya-style dataset (and the class-image
folder, generating class images with the base model when it has too few); (3) put images
in aspect-ratio buckets and print the table; (4) cache latents (memory or disk, keyed by
the image bytes, bucket and VAE weights) and, when the text encoders are frozen, their
outputs (keyed by caption and encoder weights); (5) build what is trained (a network of
adapters, new token embeddings, or the UNet itself); (6) train with resume; (7) write the
result in the format the ecosystem reads.

Exact resume: everything random in optimizer step ``k`` (batch, caption shuffle/dropout,
timesteps, noise, network dropout) comes from generators seeded by ``(seed, k)``, and the
batch order is a pure function of ``(seed, epoch)`` (``BucketPlan.epoch_batches``), so a
run stopped (SIGTERM/SIGINT: state saved at once) or killed (resumes from the last
``--save-every-n-steps`` state) and resumed gives the weights of an uninterrupted run.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from huabi.errors import HuabiError
from huabi.models.family import ModelFamily, Prediction
from huabi.train.augment import Augmentation, color_augment, crop_offsets, draw_flip
from huabi.train.buckets import BucketPlan, cover_and_crop, plan_buckets
from huabi.train.common import EMA, atomic_torch_save, autocast, load_torch_file, resolve_precision, step_generator
from huabi.train.dataset import Dataset, DatasetEntry, file_digest, process_caption, scan_dataset
from huabi.train.networks import Network, NetworkConfig, find_targets
from huabi.train.user_config import UserTrainConfig

STATE_FORMAT = "huabi-user-train-1"
CAPTION_SALT, NOISE_SALT, AUGMENT_SALT = 11, 13, 17

# Textual inversion's template captions (the idea of the TI paper and of kohya's / diffusers'
# --use_object_template / learnable_property; huabi's own wording): the new word in many
# contexts, so that it works inside prompts and not only alone.
OBJECT_TEMPLATES = (
    "a photo of {}", "a picture of {}", "an image of {}", "a drawing of {}", "a rendering of {}", "a close-up photo of {}",
    "a bright photo of {}", "a dark photo of {}", "a cropped photo of {}", "a good photo of {}", "a photo of the {}",
    "a photo of one {}", "a small {}", "a large {}", "the {}", "a {}",
)
STYLE_TEMPLATES = (
    "a painting in the style of {}", "a picture in the style of {}", "a drawing in the style of {}",
    "a rendering in the style of {}", "an illustration in the style of {}", "art in the style of {}",
    "a photo in the style of {}", "a pattern in the style of {}", "a small painting in the style of {}",
    "a large painting in the style of {}", "a bright picture in the style of {}", "a dark picture in the style of {}",
    "a cropped picture in the style of {}", "the style of {}", "{} style", "in the style of {}",
)


# ---------------------------------------------------------------- small pure pieces


class LRLambda:
    """diffusers/kohya LR schedules as a multiplier of the base LR (picklable for the state file)."""

    def __init__(self, kind: str, warmup: int, total: int, cycles: int = 1, power: float = 1.0) -> None:
        self.kind, self.warmup, self.total, self.cycles, self.power = kind, int(warmup), int(total), int(cycles), float(power)

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return 1.0
        if step < self.warmup:
            return step / max(1, self.warmup)
        if self.kind == "constant_with_warmup":
            return 1.0
        progress = (step - self.warmup) / max(1, self.total - self.warmup)
        if self.kind == "linear":
            return max(0.0, 1.0 - progress)
        if self.kind == "cosine":
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))
        if self.kind == "cosine_with_restarts":
            if progress >= 1.0:
                return 0.0
            return max(0.0, 0.5 * (1.0 + math.cos(math.pi * ((self.cycles * progress) % 1.0))))
        if self.kind == "polynomial":
            return max(0.0, 1.0 - progress) ** self.power
        raise HuabiError(f"unknown lr scheduler {self.kind!r}")


def min_snr_weight(alphas_cumprod_t: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023): min(SNR, g)/SNR for eps, min(SNR, g)/(SNR+1) for v."""
    if gamma <= 0:
        return torch.ones_like(alphas_cumprod_t)
    snr = alphas_cumprod_t / (1.0 - alphas_cumprod_t)
    return snr.clamp(max=gamma) / (snr + 1.0 if prediction is Prediction.V else snr)


def resolve_mixed_precision(name: str, device: torch.device) -> str:
    """kohya's names ('no', 'fp16', 'bf16', 'auto') as a loop precision; 'auto' as
    :func:`huabi.train.common.resolve_precision` decides it for this device."""
    if name != "auto":
        return {"no": "fp32"}.get(name, name)
    return resolve_precision("auto", device)[0]


def module_digest(module: torch.nn.Module) -> str:
    """SHA-256 over a module's weights (names, shapes, bytes): cache keys change with the weights."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_pixels(entry: DatasetEntry, width_px: int, height_px: int, *, generator: torch.Generator | None = None,
                augmentation: Augmentation = Augmentation(), flip: bool = False) -> tuple[torch.Tensor, tuple[int, int]]:
    """[3, H, W] in [-1, 1] scaled to cover the bucket and cropped, and (crop top, crop left).

    kohya's order: resize to cover, crop (centred, or random with ``augmentation.random_crop``),
    colour augmentation, then the mirror image when ``flip``; a flipped sample's crop left is
    measured from the other edge (what the mirrored picture shows). Random draws come from
    ``generator`` (needed with random crop or colour augmentation).
    """
    import numpy as np
    from PIL import Image

    from huabi.train.buckets import Bucket

    with Image.open(entry.path) as image:
        image = image.convert("RGB")
        (resized_w, resized_h), _box = cover_and_crop(image.width, image.height, Bucket(width_px, height_px))
        image = image.resize((resized_w, resized_h), Image.Resampling.LANCZOS)
        left, top = crop_offsets(resized_w, resized_h, width_px, height_px, generator if augmentation.random_crop else None)
        array = np.asarray(image.crop((left, top, left + width_px, top + height_px)), dtype=np.uint8)
    if augmentation.color:
        array = color_augment(array, generator)
    if flip:
        array = array[:, ::-1]
        left = resized_w - left - width_px
    pixels = torch.from_numpy(np.ascontiguousarray(array).astype(np.float32)).permute(2, 0, 1).div(127.5).sub(1.0)
    return pixels, (top, left)


# ---------------------------------------------------------------- caches


class LatentCache:
    """VAE latent means per (image bytes, bucket, VAE weights); in memory, optionally on disk."""

    def __init__(self, vae: torch.nn.Module, vae_digest: str, disk_dir: Path | None, device: torch.device) -> None:
        self.vae, self.vae_digest, self.device = vae, vae_digest, device
        self.disk_dir = disk_dir / "latents" / vae_digest[:16] if disk_dir is not None else None
        self.memory: dict[str, torch.Tensor] = {}
        self.hits = self.misses = 0

    def key(self, entry: DatasetEntry, width_px: int, height_px: int, flipped: bool = False) -> str:
        return f"{file_digest(entry.path)[:32]}_{width_px}x{height_px}" + ("_flip" if flipped else "")

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """The VAE posterior mean of one image [3, H, W] (fp32, CPU): cached or not, the same numbers."""
        dtype = next(self.vae.parameters()).dtype
        return self.vae.encode(pixels[None].to(self.device, dtype)).latent_dist.mean[0].float().cpu()

    @torch.no_grad()
    def get(self, entry: DatasetEntry, width_px: int, height_px: int, flipped: bool = False) -> torch.Tensor:
        key = self.key(entry, width_px, height_px, flipped)
        if key in self.memory:
            return self.memory[key]
        path = self.disk_dir / f"{key}.pt" if self.disk_dir is not None else None
        if path is not None and path.exists():
            latent = load_torch_file(path, what="latent cache file")
            self.hits += 1
        else:
            pixels, _crop = load_pixels(entry, width_px, height_px, flip=flipped)
            latent = self.encode(pixels)
            self.misses += 1
            if path is not None:
                atomic_torch_save(latent, path)
        self.memory[key] = latent
        return latent


class TextCache:
    """Frozen text encoders' outputs per caption (keyed with the encoders' weight digest)."""

    def __init__(self, encode: Callable[[list[str]], tuple[torch.Tensor, torch.Tensor | None]], digest: str) -> None:
        self.encode, self.digest = encode, digest
        self.memory: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def key(self, caption: str) -> str:
        return hashlib.sha256(f"{self.digest}\n{caption}".encode()).hexdigest()

    @torch.no_grad()
    def get(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        missing = [c for c in dict.fromkeys(captions) if self.key(c) not in self.memory]
        if missing:
            context, pooled = self.encode(missing)
            for i, caption in enumerate(missing):
                self.memory[self.key(caption)] = (context[i].cpu(), None if pooled is None else pooled[i].cpu())
        rows = [self.memory[self.key(c)] for c in captions]
        context = torch.stack([r[0] for r in rows])
        pooled = torch.stack([r[1] for r in rows]) if rows[0][1] is not None else None
        return context, pooled


def encode_captions(bundle, captions: Sequence[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The family's conditioning of plain captions: [B, 77, width] (SDXL: both encoders) and pooled."""
    from huabi.core.conditioning import FAMILY_ENCODER_RULES, run_text_encoder  # the layer rules inference uses

    states, pooled = [], None
    rules = FAMILY_ENCODER_RULES[bundle.family]
    for encoder, tokenizer, (rule, want_pooled) in zip(bundle.text_encoders, bundle.tokenizers, rules):
        ids = tokenizer(list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        hidden, pool = run_text_encoder(encoder, ids.to(device), rule, 1, want_pooled)
        states.append(hidden)
        if want_pooled:
            pooled = pool
    return torch.cat(states, dim=-1), pooled


# ---------------------------------------------------------------- the run


@dataclass
class RunResult:
    output: Path
    steps: int
    losses: list[float] = field(default_factory=list)
    plan: BucketPlan | None = None
    dataset: Dataset | None = None
    eval: dict | None = None  # before/after CLIP score and FID (huabi.train.evaluation)
    report: Path | None = None  # <output>.report.json


class TrainingStopped(Exception):
    def __init__(self, step: int, state: Path) -> None:
        super().__init__(f"training stopped at step {step}; state saved in {state}, re-run the same command to resume")
        self.step = step


def builtin_model() -> Path:
    from huabi.train.recipe import default_out_path

    return default_out_path()


def load_base_model(model: str | None, device: torch.device):
    from huabi.models.load import load_model

    path = Path(model).expanduser() if model else builtin_model()
    if not path.exists():
        raise HuabiError(f"base model {path} does not exist")
    try:
        return path, load_model(path, device=device, compute_hash=False)
    except HuabiError as exc:
        raise HuabiError(f"base model {path} cannot be loaded: {exc}") from None
    except Exception as exc:  # a corrupt or foreign file: say so in one line
        raise HuabiError(f"base model {path} cannot be loaded: {type(exc).__name__}: {exc}") from None


def reg_repeats(dataset: Dataset) -> list[int]:
    """Per entry repeats; class images are cycled so that as many are seen as training images (kohya)."""
    train_total = sum(e.repeats for e in dataset.entries if not e.is_reg)
    reg = [i for i, e in enumerate(dataset.entries) if e.is_reg]
    repeats = [e.repeats for e in dataset.entries]
    for order, index in enumerate(reg):
        repeats[index] = train_total // len(reg) + (1 if order < train_total % len(reg) else 0)
    return repeats


def ensure_class_images(config: UserTrainConfig, model_path: Path, log: Callable[[str], None]) -> None:
    """DreamBooth: fill ``reg_data_dir`` up to ``num_class_images`` with images of ``class_prompt``."""
    from huabi.train.dataset import IMAGE_SUFFIXES
    from huabi.train.samples import SamplePrompt, generate_with_engine

    folder = Path(config.reg_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = [p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    missing = config.num_class_images - len(have)
    if missing <= 0:
        return
    log(f"generating {missing} class image(s) of {config.class_prompt!r} with the base model into {folder}")
    prompts = [SamplePrompt(config.class_prompt, seed=config.seed + 100_000 + len(have) + i, steps=20)
               for i in range(missing)]
    with tempfile.TemporaryDirectory() as tmp:
        made = generate_with_engine(model_path, prompts, Path(tmp), device=config.device, default_size_px=config.resolution)
        for i, path in enumerate(made):
            shutil.move(str(path), folder / f"class_{len(have) + i:05d}.png")
            (folder / f"class_{len(have) + i:05d}.caption").write_text(config.class_prompt, encoding="utf-8")


class UserTrainer:
    """Holds everything of one run; ``run()`` trains (resuming when a state exists) and writes the output."""

    def __init__(self, config: UserTrainConfig, *, log: Callable[[str], None] = print, progress: bool = True) -> None:
        config.validate()
        self.config = config
        self.log = log
        self.progress = progress
        self.device = torch.device(config.device)
        self.precision = resolve_mixed_precision(config.mixed_precision, self.device)
        self.eval_result: dict | None = None
        self.sample_evals: list[dict] = []

    # -- setup ---------------------------------------------------------------

    def setup(self) -> None:
        config = self.config
        self.model_path, self.bundle = load_base_model(config.model, self.device)
        if self.bundle.family in (ModelFamily.SDXL_REFINER,):
            raise HuabiError("base model: the SDXL refiner cannot be trained here; use an SDXL base model")
        if config.mode == "dreambooth" and config.num_class_images:
            ensure_class_images(config, self.model_path, self.log)
        self.dataset = scan_dataset(config.train_data_dir, reg_dir=config.reg_data_dir if config.mode == "dreambooth" or config.reg_data_dir else None,
                                    caption_extension=config.caption_extension, class_tokens=config.class_tokens)
        self.log(f"dataset: {self.dataset.summary()}")
        for skipped in self.dataset.skipped[:5]:
            self.log(f"  skipped (unreadable): {skipped}")
        self.repeats = reg_repeats(self.dataset)
        self.plan = plan_buckets(
            [(e.width_px, e.height_px) for e in self.dataset.entries], self.repeats,
            resolution_px=config.resolution, batch_size=config.train_batch_size,
            min_side=min(config.min_bucket_reso, config.resolution), no_upscale=config.bucket_no_upscale,
            max_aspect_error=config.max_bucket_aspect_error, enabled=config.enable_bucket,
        )
        self.log("buckets:\n" + self.plan.table())
        self.batches_per_epoch = self.plan.batches_per_epoch()
        # kohya: an epoch is every batch once; gradient accumulation windows end with the epoch
        # (the last optimizer step of an epoch may take fewer micro-batches)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / config.gradient_accumulation_steps)
        self.max_steps = (config.max_train_epochs * self.steps_per_epoch if config.max_train_epochs is not None
                          else config.max_train_steps)
        if config.max_train_epochs is not None:
            self.log(f"{config.max_train_epochs} epoch(s) x {self.steps_per_epoch} step(s) per epoch "
                     f"({self.batches_per_epoch} batch(es), accumulation {config.gradient_accumulation_steps}): "
                     f"{self.max_steps} steps (overrides --max-train-steps)")
        self.augmentation = Augmentation(flip=config.flip_aug, random_crop=config.random_crop, color=config.color_aug)
        for module in (self.bundle.unet, self.bundle.vae, *self.bundle.text_encoders):
            module.requires_grad_(False)
            module.eval()
        cache_dir = Path(config.cache_dir) if config.cache_dir else Path(config.output).with_suffix(".cache")
        self.latents = LatentCache(self.bundle.vae, module_digest(self.bundle.vae),
                                   cache_dir if config.cache_latents_to_disk else None, self.device)
        self._cache_all_latents()
        self.alphas_cumprod = self.bundle.alphas_cumprod.double().cpu()
        self._build_trainable()

    def _cache_all_latents(self) -> None:
        started = time.monotonic()
        self.crops: dict[int, tuple[int, int, int]] = {}  # entry -> centred crop (top, left) and resized width
        for index, entry in enumerate(self.dataset.entries):
            if index in self.plan.dropped:
                continue
            bucket = self.plan.training_bucket(index)
            if self.config.caches_latents:
                self.latents.get(entry, bucket.width_px, bucket.height_px)
                if self.augmentation.flip:  # kohya caches the mirrored image's latent too
                    self.latents.get(entry, bucket.width_px, bucket.height_px, flipped=True)
            (size, box) = cover_and_crop(entry.width_px, entry.height_px, bucket)
            self.crops[index] = (box[1], box[0], size[0])
        if not self.config.caches_latents:
            self.log("latents: not cached (random crop / colour augmentation encode each sample when it is used)")
            return
        self.log(f"latents: {self.latents.misses} encoded, {self.latents.hits} from the disk cache "
                 f"({time.monotonic() - started:.1f} s)")

    def _build_trainable(self) -> None:
        config, bundle = self.config, self.bundle
        self.network: Network | None = None
        self.embedding_rows: list[tuple[torch.nn.Embedding, list[int]]] = []
        self.ema: EMA | None = None
        unet_lr = config.unet_lr if config.unet_lr is not None else config.learning_rate
        text_lr = config.text_encoder_lr if config.text_encoder_lr is not None else config.learning_rate
        weight_decay = config.weight_decay
        train_text = False
        if config.uses_network:
            kind = config.network_kind
            net_config = NetworkConfig(
                kind="lora" if kind == "locon" else kind, dim=config.network_dim, alpha=config.network_alpha,
                conv_dim=config.conv_dim or (config.network_dim if kind == "locon" else 0),
                conv_alpha=config.conv_alpha if config.conv_dim else (config.network_alpha if kind == "locon" else config.conv_alpha),
                dropout=config.network_dropout, train_unet=not config.network_train_text_encoder_only,
                train_text_encoder=not config.network_train_unet_only,
            )
            self.network_config = net_config
            torch.manual_seed(config.seed)  # the adapters' initial weights are part of the result
            self.network = Network(find_targets(bundle.unet, bundle.text_encoders, bundle.family, net_config), net_config)
            self.network.attach()
            groups = self.network.parameter_groups(unet_lr, text_lr)
            self.trainable: dict[str, torch.nn.Module] = {"network": self.network}
            train_text = net_config.train_text_encoder
            self.log(f"network: {config.network_kind}, {len(self.network.adapters)} modules, "
                     f"{sum(p.numel() for p in self.network.parameters()):,} parameters")
        elif config.mode == "textual-inversion":
            groups = self._build_embeddings(text_lr if config.text_encoder_lr is not None else config.learning_rate)
            weight_decay = 0.0  # decay would pull the untouched rows' Adam state nowhere, but shrink ours
            train_text = True
        else:  # finetune, dreambooth with full weights
            bundle.unet.requires_grad_(True)
            self.trainable = {"unet": bundle.unet}
            groups = [{"params": list(bundle.unet.parameters()), "lr": unet_lr}]
            if config.train_text_encoder:
                for index, encoder in enumerate(bundle.text_encoders):
                    encoder.requires_grad_(True)
                    self.trainable[f"te{index}"] = encoder
                    groups.append({"params": list(encoder.parameters()), "lr": text_lr})
                train_text = True
            if config.ema_decay > 0:
                self.ema = EMA(bundle.unet, config.ema_decay)
        self.train_text = train_text
        if config.gradient_checkpointing:
            bundle.unet.enable_gradient_checkpointing()
            if train_text:
                for encoder in bundle.text_encoders:
                    encoder.gradient_checkpointing_enable()
        for module in self.trainable.values():
            module.train()
        if train_text:
            for encoder in bundle.text_encoders:
                encoder.train()
        if config.gradient_checkpointing:
            bundle.unet.train()  # diffusers checkpoints only in training mode; SD UNets have no dropout
        self.params = [p for group in groups for p in group["params"]]
        if config.optimizer_type == "AdamW":
            self.optimizer: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=config.learning_rate, weight_decay=weight_decay)
        elif config.optimizer_type == "Adafactor":
            self.optimizer = torch.optim.Adafactor(groups, lr=config.learning_rate, weight_decay=weight_decay)
        else:
            self.optimizer = torch.optim.SGD(groups, lr=config.learning_rate, momentum=0.9, weight_decay=weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, LRLambda(
            config.lr_scheduler, config.lr_warmup_steps, self.max_steps, config.lr_scheduler_num_cycles,
            config.lr_scheduler_power))
        self.scaler = torch.amp.GradScaler("cuda") if self.precision == "fp16" and self.device.type == "cuda" else None
        self.text_cache = None
        if not train_text:
            digest = hashlib.sha256("".join(module_digest(e) for e in bundle.text_encoders).encode()).hexdigest()
            self.text_cache = TextCache(lambda captions: encode_captions(bundle, captions, self.device), digest)

    def _build_embeddings(self, lr: float) -> list[dict]:
        """Textual inversion: new tokens (``token``, ``token_1``...) with trainable rows only."""
        config, bundle = self.config, self.bundle
        count = config.num_vectors_per_token
        self.ti_tokens = [config.token_string] + [f"{config.token_string}_{i}" for i in range(1, count)]
        bundle.tokenizers = [copy.deepcopy(t) for t in bundle.tokenizers]  # never change a shared tokenizer
        params, self.trainable = [], {}
        for index, (encoder, tokenizer) in enumerate(zip(bundle.text_encoders, bundle.tokenizers)):
            vocabulary = tokenizer.get_vocab()
            if any(t in vocabulary or f"{t}</w>" in vocabulary for t in self.ti_tokens):
                raise HuabiError(f"token-string {config.token_string!r} is already a token of the tokenizer; pick a new word")
            added = tokenizer.add_tokens(self.ti_tokens)
            if added != count:
                raise HuabiError(f"token-string {config.token_string!r} is already a token of the tokenizer; pick a new word")
            encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
            embedding = encoder.get_input_embeddings()
            rows = tokenizer.convert_tokens_to_ids(self.ti_tokens)
            with torch.no_grad():
                if config.init_word:
                    init_ids = tokenizer(config.init_word, add_special_tokens=False).input_ids
                    if not init_ids:
                        raise HuabiError(f"init-word {config.init_word!r} gives no tokens")
                    for j, row in enumerate(rows):
                        embedding.weight[row] = embedding.weight[init_ids[j % len(init_ids)]]
                else:
                    generator = torch.Generator().manual_seed(config.seed)
                    std = float(embedding.weight.std())
                    for row in rows:
                        embedding.weight[row] = torch.randn(embedding.weight.shape[1], generator=generator).to(embedding.weight) * std
            embedding.weight.requires_grad_(True)
            mask = torch.zeros(embedding.weight.shape[0], 1, device=embedding.weight.device)
            mask[rows] = 1.0
            embedding.weight.register_hook(lambda grad, mask=mask: grad * mask)  # only the new rows learn
            self.embedding_rows.append((embedding, rows))
            self.trainable[f"te{index}_embedding"] = embedding
            params.append(embedding.weight)
        return [{"params": params, "lr": lr}]

    # -- one step ------------------------------------------------------------

    def micro_steps_of(self, step: int) -> range:
        """Global micro-batch indices of optimizer step ``step`` (0-based); they never cross an epoch's end."""
        epoch, within = divmod(step, self.steps_per_epoch)
        accumulate = self.config.gradient_accumulation_steps
        first = within * accumulate
        return range(epoch * self.batches_per_epoch + first,
                     epoch * self.batches_per_epoch + min(first + accumulate, self.batches_per_epoch))

    def batch_entries(self, micro_step: int) -> list[int]:
        epoch, offset = divmod(micro_step, self.batches_per_epoch)
        if getattr(self, "_epoch_cache", (None,))[0] != epoch:
            self._epoch_cache = (epoch, self.plan.epoch_batches(epoch, self.config.seed))
        return self._epoch_cache[1][offset]

    def caption_for(self, entry: DatasetEntry, generator: torch.Generator) -> str:
        config = self.config
        caption = entry.caption
        if config.mode == "textual-inversion":
            if config.use_object_template or config.use_style_template:  # kohya: templates replace the captions
                templates = OBJECT_TEMPLATES if config.use_object_template else STYLE_TEMPLATES
                caption = templates[int(torch.randint(0, len(templates), (), generator=generator))].format(config.token_string)
            if config.token_string not in caption:
                caption = f"{config.token_string}, {caption}" if caption else config.token_string
            caption = caption.replace(config.token_string, " ".join(self.ti_tokens))
        return process_caption(caption, generator, shuffle=config.shuffle_caption, keep_tokens=config.keep_tokens,
                               dropout_rate=config.caption_dropout_rate)

    def batch_latents(self, entries: Sequence[int], bucket, generator: torch.Generator) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """Unscaled latents [B, C, h, w] of the batch and each sample's crop (top, left), augmented.

        Per sample, in order: the flip draw (with --flip-aug), then the crop and colour draws
        (uncached path). Cached and uncached paths give the same latents for the same draws.
        """
        out, crops = [], []
        for i in entries:
            entry = self.dataset.entries[i]
            flipped = draw_flip(generator) if self.augmentation.flip else False
            if self.config.caches_latents:
                out.append(self.latents.get(entry, bucket.width_px, bucket.height_px, flipped=flipped))
                top, left, resized_w = self.crops[i]
                crops.append((top, resized_w - left - bucket.width_px if flipped else left))
            else:
                pixels, crop = load_pixels(entry, bucket.width_px, bucket.height_px, generator=generator,
                                           augmentation=self.augmentation, flip=flipped)
                out.append(self.latents.encode(pixels))
                crops.append(crop)
        return torch.stack(out), crops

    def micro_loss(self, micro_step: int) -> tuple[torch.Tensor, dict[str, float]]:
        config, bundle, device = self.config, self.bundle, self.device
        entries = self.batch_entries(micro_step)
        generator = step_generator(config.seed, CAPTION_SALT, micro_step)
        captions = [self.caption_for(self.dataset.entries[i], generator) for i in entries]
        noise_gen = step_generator(config.seed, NOISE_SALT, micro_step)
        torch.manual_seed(config.seed * 1_000_003 + micro_step)  # network dropout
        bucket = self.plan.training_bucket(entries[0])
        latents, crops = self.batch_latents(entries, bucket, step_generator(config.seed, AUGMENT_SALT, micro_step))
        latents = latents * bundle.latent_scaling_factor
        batch = latents.shape[0]
        timesteps = torch.randint(0, len(self.alphas_cumprod), (batch,), generator=noise_gen)
        noise = torch.randn(latents.shape, generator=noise_gen)
        if config.noise_offset > 0:
            noise = noise + config.noise_offset * torch.randn((batch, latents.shape[1], 1, 1), generator=noise_gen)
        abar = self.alphas_cumprod[timesteps].float()
        shape = (-1, 1, 1, 1)
        noisy = abar.sqrt().view(shape) * latents + (1 - abar).sqrt().view(shape) * noise
        target = (abar.sqrt().view(shape) * noise - (1 - abar).sqrt().view(shape) * latents
                  if bundle.prediction is Prediction.V else noise)
        with autocast(device, self.precision):
            if self.text_cache is not None:
                context, pooled = self.text_cache.get(captions)
                context = context.to(device)
                pooled = pooled.to(device) if pooled is not None else None
            else:
                context, pooled = encode_captions(bundle, captions, device)
            added = None
            if bundle.family is ModelFamily.SDXL:
                rows = []
                for i, (top, left) in zip(entries, crops):
                    entry = self.dataset.entries[i]
                    rows.append([entry.height_px, entry.width_px, top, left, bucket.height_px, bucket.width_px])
                added = {"text_embeds": pooled, "time_ids": torch.tensor(rows, dtype=torch.float32, device=device)}
            prediction = bundle.unet(noisy.to(device), timesteps.to(device), encoder_hidden_states=context,
                                     added_cond_kwargs=added).sample.float()
        per_sample = (prediction - target.to(device)).pow(2).mean(dim=(1, 2, 3))
        weights = min_snr_weight(abar, config.min_snr_gamma, bundle.prediction).to(device)
        is_reg = torch.tensor([self.dataset.entries[i].is_reg for i in entries], device=device)
        weights = weights * torch.where(is_reg, config.prior_loss_weight, 1.0)
        loss = (weights * per_sample).mean()
        return loss, {"loss": float(loss.detach())}

    # -- state ---------------------------------------------------------------

    @property
    def state_path(self) -> Path:
        return self.config.state_dir / "state.pt"

    def save_state(self, step: int) -> None:
        atomic_torch_save({
            "format": STATE_FORMAT, "step": step, "config": self.config.resume_record(),
            "modules": {name: module.state_dict() for name, module in self.trainable.items()},
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
        }, self.state_path)

    def load_state(self) -> int:
        state = load_torch_file(self.state_path, what="resume state")
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise HuabiError(f"resume state {self.state_path} is not a huabi user-training state")
        saved, now = state["config"], self.config.resume_record()
        changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
        if changed:
            key = changed[0]
            raise HuabiError(f"resume state {self.state_path} was made with a different config: {key.replace('_', '-')}="
                             f"{saved.get(key)!r}, now {now.get(key)!r}; use the same settings or another --save-state-dir")
        for name, module in self.trainable.items():
            module.load_state_dict(state["modules"][name])
        self.optimizer.load_state_dict(state["optimizer"])
        shape = dict(vars(self.scheduler.lr_lambdas[0]))
        self.scheduler.load_state_dict(state["scheduler"])
        vars(self.scheduler.lr_lambdas[0]).update(shape)  # this run's total steps
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state.get("ema"):
            self.ema.load_state_dict(state["ema"])
        return int(state["step"])

    # -- loop ----------------------------------------------------------------

    def train(self, *, should_stop: Callable[[], bool] | None = None, on_step: Callable[[int, float], None] | None = None,
              on_save: Callable[[int], None] | None = None) -> list[float]:
        config = self.config
        step = 0
        if self.state_path.exists():
            step = self.load_state()
            self.log(f"resumed from {self.state_path} at step {step}/{self.max_steps}")
        losses: list[float] = []
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.max_steps, initial=step, desc=config.mode, unit="step", dynamic_ncols=True)
        try:
            while step < self.max_steps:
                total = 0.0
                micro_steps = self.micro_steps_of(step)
                for micro_step in micro_steps:
                    loss, _metrics = self.micro_loss(micro_step)
                    scaled = loss / len(micro_steps)
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
                    total += float(loss.detach()) / len(micro_steps)
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                if config.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, config.max_grad_norm)
                if self.scaler is not None:
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                else:
                    self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                if self.ema is not None:
                    self.ema.update(self.bundle.unet)
                step += 1
                losses.append(total)
                if bar is not None:
                    bar.set_postfix(loss=f"{total:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.2e}", refresh=False)
                    bar.update(1)
                if on_step is not None:
                    on_step(step, total)
                due = bool(config.save_every_n_steps and step % config.save_every_n_steps == 0)
                if config.save_every_n_epochs and step % self.steps_per_epoch == 0:  # an epoch ended with this step
                    due = due or (step // self.steps_per_epoch) % config.save_every_n_epochs == 0
                if due or step == self.max_steps:
                    self.save_state(step)
                    if due and step < self.max_steps:
                        self.write_output(Path(config.output).with_name(f"{Path(config.output).stem}-step{step:06d}.safetensors"), step)
                    if on_save is not None:
                        on_save(step)
                if config.sample_every_n_steps and step % config.sample_every_n_steps == 0:
                    self.sample(step)
                if should_stop is not None and should_stop() and step < self.max_steps:
                    self.save_state(step)
                    raise TrainingStopped(step, self.state_path)
        finally:
            if bar is not None:
                bar.close()
        self.final_step = step
        return losses

    # -- outputs -------------------------------------------------------------

    def metadata(self, step: int) -> dict[str, str]:
        from huabi.models.train_outputs import BASE_MODEL_VERSION, modelspec_metadata

        config, dataset, plan, bundle = self.config, self.dataset, self.plan, self.bundle
        now = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
        counts: dict[str, dict[str, Any]] = {}
        for index, bucket in enumerate(plan.buckets):
            members = [i for i, b in enumerate(plan.train_bucket_of) if b == index and i not in plan.dropped]
            counts[str(index)] = {"resolution": [bucket.width_px, bucket.height_px], "count": sum(self.repeats[i] for i in members)}
        remaining = [i for i, b in enumerate(plan.train_bucket_of) if b == -1 and i not in plan.dropped]
        if remaining:
            counts["remaining"] = {"resolution": [config.resolution, config.resolution], "count": sum(self.repeats[i] for i in remaining)}
        errors = [abs(plan.buckets[plan.bucket_of[i]].aspect - e.width_px / e.height_px) for i, e in enumerate(dataset.entries)]
        dirs = {}
        for entry, repeats in zip(dataset.entries, self.repeats):
            if not entry.is_reg:
                item = dirs.setdefault(entry.group, {"n_repeats": entry.repeats, "img_count": 0})
                item["img_count"] += 1
        reg_dirs = {}
        for entry in dataset.entries:
            if entry.is_reg:
                item = reg_dirs.setdefault(entry.group, {"n_repeats": entry.repeats, "img_count": 0})
                item["img_count"] += 1
        model_hash = None
        try:
            from huabi.models.hashes import model_short_hash

            model_hash = model_short_hash(self.model_path) if self.model_path.is_file() else None
        except Exception:  # hashing is informative only
            model_hash = None
        if config.uses_network:
            module = {"lora": "networks.lora", "locon": "networks.lora", "loha": "lycoris.kohya", "lokr": "lycoris.kohya",
                      "oft": "lycoris.kohya"}[config.network_kind]
            args = {"algo": {"loha": "loha", "lokr": "lokr", "oft": "diag-oft", "locon": "locon", "lora": "lora"}[config.network_kind]}
            if self.network_config.conv_dim:
                args.update(conv_dim=str(self.network_config.conv_dim), conv_alpha=str(self.network_config.conv_alpha))
            if config.network_kind == "oft":
                args["constraint"] = str(config.network_alpha)
        train_images = sum(not e.is_reg for e in dataset.entries)
        meta = {
            "ss_session_id": str(config.seed), "ss_training_started_at": str(int(self.started_at)),
            "ss_training_finished_at": str(int(time.time())), "ss_output_name": config.name,
            "ss_learning_rate": str(config.learning_rate), "ss_unet_lr": str(config.unet_lr if config.unet_lr is not None else config.learning_rate),
            "ss_text_encoder_lr": str(config.text_encoder_lr if config.text_encoder_lr is not None else config.learning_rate),
            "ss_num_train_images": str(sum(r for e, r in zip(dataset.entries, self.repeats) if not e.is_reg)),
            "ss_num_reg_images": str(sum(e.is_reg for e in dataset.entries)),
            "ss_num_batches_per_epoch": str(self.batches_per_epoch),
            "ss_num_epochs": str(math.ceil(self.max_steps / self.steps_per_epoch)),
            "ss_epoch": str(step // self.steps_per_epoch),
            "ss_steps": str(step), "ss_max_train_steps": str(self.max_steps),
            "ss_cache_latents": str(config.caches_latents), "ss_flip_aug": str(config.flip_aug),
            "ss_random_crop": str(config.random_crop), "ss_color_aug": str(config.color_aug),
            "ss_batch_size_per_device": str(config.train_batch_size),
            "ss_total_batch_size": str(config.train_batch_size * config.gradient_accumulation_steps),
            "ss_gradient_accumulation_steps": str(config.gradient_accumulation_steps),
            "ss_gradient_checkpointing": str(config.gradient_checkpointing),
            "ss_lr_warmup_steps": str(config.lr_warmup_steps), "ss_lr_scheduler": config.lr_scheduler,
            "ss_optimizer": f"torch.optim.{config.optimizer_type}",
            "ss_mixed_precision": {"fp32": "no"}.get(self.precision, self.precision), "ss_full_fp16": "False",
            "ss_v2": str(bundle.family is ModelFamily.SD2), "ss_base_model_version": BASE_MODEL_VERSION.get(bundle.family, bundle.family.value),
            "ss_sd_model_name": self.model_path.name, "ss_sd_model_hash": model_hash or "", "ss_new_sd_model_hash": model_hash or "",
            "ss_clip_skip": "None", "ss_resolution": f"({config.resolution}, {config.resolution})", "ss_seed": str(config.seed),
            "ss_noise_offset": str(config.noise_offset) if config.noise_offset else "None",
            "ss_min_snr_gamma": str(config.min_snr_gamma) if config.min_snr_gamma else "None",
            "ss_caption_dropout_rate": str(config.caption_dropout_rate), "ss_shuffle_caption": str(config.shuffle_caption),
            "ss_keep_tokens": str(config.keep_tokens), "ss_enable_bucket": str(config.enable_bucket),
            "ss_min_bucket_reso": str(min(config.min_bucket_reso, config.resolution)), "ss_max_bucket_reso": str(config.resolution),
            "ss_bucket_no_upscale": str(config.bucket_no_upscale),
            "ss_bucket_info": json.dumps({"buckets": counts, "mean_img_ar_error": sum(errors) / max(1, len(errors))}),
            "ss_tag_frequency": json.dumps(dataset.tag_frequency(), ensure_ascii=False),
            "ss_dataset_dirs": json.dumps(dirs, ensure_ascii=False), "ss_reg_dataset_dirs": json.dumps(reg_dirs, ensure_ascii=False),
            "ss_prior_loss_weight": str(config.prior_loss_weight), "ss_caption_extension": config.caption_extension,
            "ss_training_comment": config.training_comment, "ss_num_train_images_unique": str(train_images),
            "ss_huabi_mode": config.mode,
        }
        if self.eval_result is not None:
            meta["huabi_eval"] = json.dumps(self.eval_result, ensure_ascii=False)
        if config.uses_network:
            meta.update({"ss_network_module": module, "ss_network_dim": str(config.network_dim),
                         "ss_network_alpha": str(config.network_alpha), "ss_network_dropout": str(config.network_dropout),
                         "ss_network_args": json.dumps(args)})
        kind = {"lora": "lora", "dreambooth": "lora" if config.uses_network else "", "textual-inversion": "textual-inversion"}.get(config.mode, "")
        if kind:
            meta.update(modelspec_metadata(bundle.family, kind=kind, title=config.name, resolution_px=config.resolution, date=now,
                                           prediction="v" if bundle.prediction is Prediction.V else "epsilon",
                                           description=config.training_comment))
        return meta

    def embedding_vectors(self) -> list[torch.Tensor]:
        return [embedding.weight[rows].detach().float().cpu() for embedding, rows in self.embedding_rows]

    def write_output(self, path: Path, step: int) -> Path:
        from huabi.models.train_outputs import write_embedding_file, write_lora_file

        config = self.config
        if self.network is not None:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": None}[config.save_precision]
            return write_lora_file(path, self.network.file_tensors(dtype), self.metadata(step))
        if config.mode == "textual-inversion":
            return write_embedding_file(path, self.embedding_vectors(), self.bundle.family,
                                        {"name": config.token_string, "step": str(step), "sd_checkpoint_name": self.model_path.stem,
                                         "huabi.init_word": config.init_word or "",
                                         **({"huabi_eval": json.dumps(self.eval_result)} if self.eval_result else {})})
        return self.write_checkpoint(path, step)

    def write_checkpoint(self, path: Path, step: int) -> Path:
        """Fine-tune: the whole model as one original-layout file, with the EMA weights when kept."""
        from huabi.models.save import save_single_file

        unet = self.bundle.unet
        backup = None
        if self.ema is not None:
            backup = {k: v.detach().clone() for k, v in unet.state_dict().items()}
            self.ema.copy_to(unet)
        try:
            dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "float": None}[self.config.save_precision]
            meta = {"huabi.training": json.dumps({"mode": self.config.mode, "steps": step, "ema_decay": self.config.ema_decay,
                                                  "base": self.model_path.name, "learning_rate": self.config.learning_rate,
                                                  "eval": self.eval_result})}
            return save_single_file(self.bundle, path, dtype=dtype, metadata=meta)
        finally:
            if backup is not None:
                unet.load_state_dict(backup)

    # -- samples -------------------------------------------------------------

    def render(self, prompts, out_dir: Path, names: Sequence[str], step: int, *, trained: bool = True) -> list[Path]:
        """PNGs of ``prompts`` from the current result (``trained``) or the base model, moved to ``out_dir/names``."""
        from huabi.train.samples import generate_with_engine

        config = self.config
        with tempfile.TemporaryDirectory() as tmp:
            tmp_dir = Path(tmp)
            model, embeddings = self.model_path, None
            if not trained:
                pass
            elif self.network is not None:
                self.write_output(tmp_dir / "Lora" / f"{config.name}.safetensors", step)
                prompts = [type(p)(**{**p.__dict__, "prompt": f"{p.prompt} <lora:{config.name}:1>"}) for p in prompts]
            elif config.mode == "textual-inversion":
                embeddings = tmp_dir / "embeddings"
                self.write_output(embeddings / f"{config.token_string}.safetensors", step)
            else:
                model = self.write_output(tmp_dir / f"{config.name}.safetensors", step)
            paths = generate_with_engine(model, prompts, tmp_dir / "out", device=config.device, models_dir=tmp_dir,
                                         embeddings_dir=embeddings, sampler=config.sample_sampler, default_seed=config.seed)
            out_dir.mkdir(parents=True, exist_ok=True)
            placed = []
            for path, name in zip(paths, names):
                shutil.move(str(path), out_dir / name)
                placed.append(out_dir / name)
        return placed

    def sample(self, step: int) -> None:
        from huabi.train.samples import read_prompts_file

        config = self.config
        prompts = read_prompts_file(config.sample_prompts)
        out_dir = Path(config.output).parent / "sample"
        paths = self.render(prompts, out_dir, [f"{config.name}_{step:06d}_{i:02d}.png" for i in range(len(prompts))], step)
        self.log(f"step {step}: {len(paths)} sample image(s) in {out_dir}")
        if config.eval_at_samples:
            from huabi.train.evaluation import measure

            numbers = measure(self.eval_session(), paths, [p.prompt for p in prompts], self.training_images())
            self.sample_evals.append({"step": step, **numbers})
            fid = numbers.get("fid_vs_training_images")
            self.log(f"step {step}: CLIP score {numbers['clip_score']:.4g}" + (f", FID vs training images {fid:.4g}" if fid is not None else ""))

    # -- evaluation ----------------------------------------------------------

    def eval_session(self):
        if getattr(self, "_eval_session", None) is None:
            from huabi.eval.api import EvalOptions, Session

            self._eval_session = Session(EvalOptions(features=self.config.eval_features, device=self.config.device))
        return self._eval_session

    def training_images(self) -> list[Path]:
        return list(dict.fromkeys(e.path for e in self.dataset.entries if not e.is_reg))

    def evaluate(self, step: int) -> dict | None:
        """Before/after CLIP score and FID on the evaluation prompts (None without a prompt set)."""
        from huabi.train.evaluation import MIN_FID_IMAGES, measure, summary_line
        from huabi.train.samples import read_prompts_file

        config = self.config
        prompt_file = config.eval_prompts or config.sample_prompts
        if not config.evaluate or not prompt_file:
            return None
        prompts = read_prompts_file(prompt_file)
        texts = [p.prompt for p in prompts]
        out_dir = Path(config.output).parent / "eval" / config.name
        names = [f"{i:03d}.png" for i in range(len(prompts))]
        session = self.eval_session()
        training = self.training_images()
        training_vectors = None
        if min(len(prompts), len(training)) >= MIN_FID_IMAGES:
            training_vectors = session.vectors(training, "training images")
        before = measure(session, self.render(prompts, out_dir / "before", names, step, trained=False), texts, training,
                         training_vectors)
        after = measure(session, self.render(prompts, out_dir / "after", names, step), texts, training, training_vectors)
        extractor = session.extractor
        result = {"prompts": str(prompt_file), "step": step, "images": str(out_dir), "before": before, "after": after,
                  "extractor": extractor.describe(), "note": extractor.note}
        if self.sample_evals:
            result["at_samples"] = self.sample_evals
        self.log(summary_line(before, after))
        self.log(f"eval: {extractor.note}")
        return result

    def write_report(self, path: Path, losses: Sequence[float]) -> Path:
        from huabi.train.common import atomic_write_text

        config = self.config
        report = {"output": str(config.output), "mode": config.mode, "steps": self.final_step, "max_steps": self.max_steps,
                  "epochs": round(self.final_step / self.steps_per_epoch, 4),
                  "loss_first_10": sum(losses[:10]) / max(1, len(losses[:10])) if losses else None,
                  "loss_last_10": sum(losses[-10:]) / max(1, len(losses[-10:])) if losses else None,
                  "eval": self.eval_result}
        atomic_write_text(path, json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        return path

    # -- everything ----------------------------------------------------------

    def run(self, *, should_stop: Callable[[], bool] | None = None, on_step=None, on_save=None) -> RunResult:
        self.started_at = time.time()
        self.setup()
        try:
            losses = self.train(should_stop=should_stop, on_step=on_step, on_save=on_save)
            self.eval_result = self.evaluate(self.final_step)
        finally:
            if getattr(self, "_eval_session", None) is not None:
                self._eval_session.close()
                self._eval_session = None
        path = self.write_output(Path(self.config.output), self.final_step)
        self.log(f"wrote {path}")
        report = self.write_report(Path(self.config.output).with_suffix(".report.json"), losses)
        self.log(f"training report: {report}")
        return RunResult(output=path, steps=self.final_step, losses=losses, plan=self.plan, dataset=self.dataset,
                         eval=self.eval_result, report=report)


def train_user(config: UserTrainConfig, **kwargs) -> RunResult:
    log = kwargs.pop("log", print)
    progress = kwargs.pop("progress", True)
    return UserTrainer(config, log=log, progress=progress).run(**kwargs)
