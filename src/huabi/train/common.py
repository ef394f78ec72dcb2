"""What every training stage shares: resumable state, seeded data order, precision, EMA, logging.

The loop is built so that an interrupted run resumes *exactly*:

* all randomness of step ``k`` (batch order, crops, caption choice, dropout,
  timesteps, noise) comes from a CPU generator seeded from ``(seed, salt, k)``
  (``step_generator``), so it does not depend on what ran before;
* the data order is a pure function of ``(seed, step)`` (``DataOrder``): epoch
  ``e`` is a seeded permutation, sample position ``k * batch + j`` walks the
  concatenated epochs;
* the state file holds models, EMA, optimizer, LR scheduler, torch RNG states and
  the step, written atomically (temp file + ``os.replace``) every
  ``save_every_s`` seconds / ``save_every_steps`` steps and at the end.

So "N steps straight" and "k steps, crash, resume to N" give identical weights.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import torch

from huabi.errors import HuabiError
from huabi.models.files import atomic_torch_save, atomic_write_text  # noqa: F401 -- the stages' writers

STATE_FORMAT_VERSION = 1
PRECISIONS = ("fp32", "bf16", "fp16", "auto")  # auto: resolved per machine by resolve_precision
LR_SCHEDULES = ("constant", "cosine")


# ---------------------------------------------------------------- validation


def check_positive(name: str, value: Any, *, allow_zero: bool = False) -> None:
    """Raise a HuabiError naming ``name`` unless ``value`` is a positive (or zero) number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise HuabiError(f"{name} must be a number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise HuabiError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def check_fraction(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise HuabiError(f"{name} must be in [0, 1), got {value!r}")


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise HuabiError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


@dataclass(frozen=True)
class LoopConfig:
    """How a stage's loop runs (shared by every stage config)."""

    steps: int
    batch_size: int
    lr: float
    seed: int = 0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # or "cosine" (decays to lr * min_lr_ratio after warm-up)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    precision: str = "fp32"  # autocast dtype; bf16 pays off only on CPUs/GPUs with native bf16
    save_every_s: float = 300.0
    save_every_steps: int = 0  # 0: time-based only
    log_every_steps: int = 25

    def validate(self) -> None:
        for name in ("steps", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise HuabiError(f"{name} must be an integer >= 1, got {value!r}")
        check_positive("lr", self.lr)
        check_positive("warmup_steps", self.warmup_steps, allow_zero=True)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_fraction("min_lr_ratio", self.min_lr_ratio)
        check_positive("weight_decay", self.weight_decay, allow_zero=True)
        check_positive("max_grad_norm", self.max_grad_norm, allow_zero=True)
        check_choice("precision", self.precision, PRECISIONS)
        check_positive("save_every_s", self.save_every_s, allow_zero=True)
        check_positive("save_every_steps", self.save_every_steps, allow_zero=True)
        check_positive("log_every_steps", self.log_every_steps)


# ---------------------------------------------------------------- randomness and data order


def step_generator(seed: int, salt: int, step: int) -> torch.Generator:
    """A CPU generator for everything random in one step; same numbers on any device."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed((seed * 1_000_003 + salt * 7_919 + step) % (2**63))
    return generator


class DataOrder:
    """Seeded epoch permutations: which dataset items make up the batch of a given step."""

    def __init__(self, n_items: int, batch_size: int, seed: int) -> None:
        if n_items < 1:
            raise HuabiError("the training set is empty")
        self.n_items = n_items
        self.batch_size = batch_size
        self.seed = seed
        self._epoch: int | None = None
        self._perm: torch.Tensor | None = None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator(device="cpu").manual_seed(self.seed * 65_537 + epoch)
            self._perm = torch.randperm(self.n_items, generator=generator)
            self._epoch = epoch
        assert self._perm is not None
        return self._perm

    def batch(self, step: int) -> torch.Tensor:
        """Item indices of the batch at ``step`` (int64, length ``batch_size``)."""
        out = torch.empty(self.batch_size, dtype=torch.int64)
        for j in range(self.batch_size):
            position = step * self.batch_size + j
            epoch, offset = divmod(position, self.n_items)
            out[j] = self.permutation(epoch)[offset]
        return out


# ---------------------------------------------------------------- precision


def resolve_precision(precision: str, device: torch.device | str) -> tuple[str, str]:
    """``(precision, why)``: ``auto`` becomes what runs fastest on ``device``, the others stay.

    CUDA: bf16 where supported, else fp16. CPU: the choice ``--dtype auto`` makes for inference
    (:func:`huabi.service.device_choice.auto_dtype`): bf16 with AMX, or with AVX512-BF16 where a
    measured probe shows it faster; fp32 without native bf16, where bf16 is emulated and slower
    (measured on an AVX2-only Zen 3: a VAE training step 3.8 s fp32, 93 s bf16). A recipe says
    ``auto`` rather than the answer of the machine it was tuned on; its state keeps ``auto``, so a
    run can resume on another kind of machine."""
    check_choice("precision", precision, PRECISIONS)
    if precision != "auto":
        return precision, "as configured"
    device = torch.device(device)
    if device.type == "cuda":
        return ("bf16", "CUDA with bf16") if torch.cuda.is_bf16_supported() else ("fp16", "CUDA without bf16")
    from huabi.service.device_choice import auto_dtype

    choice = auto_dtype(device)
    return ("bf16" if choice.dtype == torch.bfloat16 else "fp32"), choice.reason


def loop_precision(name: str, precision: str, device: torch.device | str, log: Callable[[str], None]) -> str:
    """A training loop's precision, resolved once; an ``auto`` answer is logged with its reason."""
    resolved, why = resolve_precision(precision, device)
    if precision == "auto":
        log(f"[{name}] precision auto -> {resolved} ({why})")
    return resolved


def autocast(device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes: weights stay fp32, matmuls/convs run in ``precision``."""
    check_choice("precision", precision, PRECISIONS)
    if precision == "auto":
        raise HuabiError("precision 'auto' must be resolved (resolve_precision) before autocast")
    device_type = torch.device(device).type
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device_type, dtype=dtype)


# ---------------------------------------------------------------- LR schedule and EMA


class LRShape:
    """Multiplier on the base LR: linear warm-up, then constant or cosine down to ``min_ratio``."""

    def __init__(self, kind: str, warmup_steps: int, total_steps: int, min_ratio: float) -> None:
        self.kind = kind
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.kind == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(params, config: LoopConfig) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, betas=(0.9, 0.999))
    shape = LRShape(config.lr_schedule, config.warmup_steps, config.steps, config.min_lr_ratio)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, shape)


def ema_weights(state_dict: Mapping[str, torch.Tensor], shadow: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` with the averaged ``shadow`` weights in place (in each weight's dtype)."""
    return {k: (shadow[k].to(v.dtype) if k in shadow else v) for k, v in state_dict.items()}


class EMA:
    """Exponential moving average of a module's floating-point weights (kept in fp32).

    The decay ramps up as ``min(decay, (1 + n) / (10 + n))`` so early averages are not
    dominated by the random initialisation.
    """

    def __init__(self, module: torch.nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self.updates = 0
        self.shadow = {k: v.detach().float().clone() for k, v in module.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in module.state_dict().items():
            if key in self.shadow:
                self.shadow[key].lerp_(value.detach().float(), 1.0 - decay)

    def copy_to(self, module: torch.nn.Module) -> None:
        module.load_state_dict(ema_weights(module.state_dict(), self.shadow))

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.decay = float(state["decay"])
        self.updates = int(state["updates"])
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}


# ---------------------------------------------------------------- files and logs


def load_torch_file(path: Path, *, what: str) -> Any:
    """Load a state file written by ``atomic_torch_save`` (tensors and plain data only)."""
    try:
        return torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise HuabiError(f"{what} {path} does not exist") from None
    except Exception as exc:  # corrupt/truncated pickle, wrong file
        raise HuabiError(f"{what} {path} cannot be read: {type(exc).__name__}: {exc}") from exc


class TrainLog:
    """Timestamped lines to stderr and (appended, flushed) to a log file."""

    def __init__(self, path: Path | None = None, *, echo: bool = True) -> None:
        self.path = Path(path) if path is not None else None
        self.echo = echo
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        if self.echo:
            print(line, file=sys.stderr, flush=True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(line + "\n")


def config_dict(config: Any) -> dict[str, Any]:
    """A plain, comparable dict of a (possibly nested) frozen dataclass config."""
    raw = asdict(config) if is_dataclass(config) else dict(config)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in raw.items()}


# ---------------------------------------------------------------- the loop


@dataclass
class LoopParts:
    """The trainable things a stage hands to ``run_loop`` (all saved and restored)."""

    modules: dict[str, torch.nn.Module]
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    ema: EMA | None = None
    ema_of: str | None = None  # name in ``modules`` the EMA tracks


class TrainingStopped(Exception):
    """Raised by ``run_loop`` after it saved its state because ``should_stop()`` said so."""

    def __init__(self, name: str, step: int) -> None:
        super().__init__(f"{name} stopped at step {step}; state saved, re-run to resume")
        self.step = step


StepFn = Callable[[int], dict[str, float]]  # does forward + backward for step k, returns metrics
HookFn = Callable[[int, dict[str, float]], None]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_loop_state(path: Path, parts: LoopParts, step: int, config: Mapping[str, Any], extra: Mapping[str, Any] | None = None) -> None:
    atomic_torch_save(
        {
            "format": STATE_FORMAT_VERSION,
            "step": step,
            "config": dict(config),
            "modules": {name: module.state_dict() for name, module in parts.modules.items()},
            "optimizer": parts.optimizer.state_dict(),
            "scheduler": parts.scheduler.state_dict(),
            "ema": parts.ema.state_dict() if parts.ema is not None else None,
            "rng": _rng_state(),
            "extra": dict(extra or {}),
        },
        path,
    )


def load_loop_state(path: Path, parts: LoopParts, config: Mapping[str, Any]) -> int:
    """Restore everything from ``path`` into ``parts``; returns the step to continue from."""
    state = load_torch_file(path, what="training state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT_VERSION:
        raise HuabiError(f"training state {path} is not a huabi state file (format {STATE_FORMAT_VERSION})")
    saved = state["config"]
    # a setting newer than the state file is unchanged when it is off (new options default to off)
    saved = {**{k: v for k, v in config.items() if k not in saved and not v}, **saved}
    changed = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k) and k not in _RESUMABLE_CHANGES)
    if changed:
        first = changed[0]
        raise HuabiError(
            f"training state {path} was made with {first}={saved.get(first)!r}, now {first}={config.get(first)!r}; "
            f"use a fresh state dir or the same settings"
        )
    for name, module in parts.modules.items():
        module.load_state_dict(state["modules"][name])
    parts.optimizer.load_state_dict(state["optimizer"])
    # keep this run's LR curve (its total may differ when ``steps`` was changed to extend/shorten a run)
    # (LambdaLR.load_state_dict overwrites the lambdas' attributes in place, so put ours back)
    shapes = [dict(vars(fn)) for fn in parts.scheduler.lr_lambdas]
    parts.scheduler.load_state_dict(state["scheduler"])
    for fn, attributes in zip(parts.scheduler.lr_lambdas, shapes):
        vars(fn).update(attributes)
    if parts.ema is not None and state["ema"] is not None:
        parts.ema.load_state_dict(state["ema"])
    _set_rng_state(state["rng"])
    return int(state["step"])


# Settings that may differ between the interrupted and the resumed run. The intervals do not
# change the result; a changed ``steps`` extends or shortens the run (the LR curve is
# recomputed for the new total from the resumed step on).
_RESUMABLE_CHANGES = frozenset({"save_every_s", "save_every_steps", "log_every_steps", "steps"})


def run_loop(
    *,
    name: str,
    parts: LoopParts,
    config: LoopConfig,
    config_record: Mapping[str, Any],
    step_fn: StepFn,
    state_path: Path | None,
    log: Callable[[str], None],
    on_step: HookFn | None = None,
    on_save: Callable[[int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> int:
    """Train ``parts`` for ``config.steps`` steps, resuming from ``state_path`` if it exists.

    ``step_fn(k)`` computes the loss of step ``k`` and calls ``backward``; the loop clips
    gradients, steps the optimizer and scheduler, updates the EMA, logs, and saves.
    ``on_step`` runs after each finished step (tests use it to simulate a crash);
    ``on_save`` runs after each save (e.g. validation). ``should_stop`` is polled between
    steps (e.g. set by a SIGTERM handler): when true the state is saved and
    ``TrainingStopped`` raised, so a polite stop loses nothing. Returns the final step.
    """
    step = 0
    if state_path is not None and Path(state_path).exists():
        step = load_loop_state(Path(state_path), parts, config_record)
        log(f"[{name}] resumed from {state_path} at step {step}/{config.steps}")
    params = [p for group in parts.optimizer.param_groups for p in group["params"]]
    last_save = time.monotonic()
    window_start, window_steps = time.monotonic(), 0
    sums: dict[str, float] = {}
    for module in parts.modules.values():
        module.train()
    while step < config.steps:
        metrics = step_fn(step)
        if config.max_grad_norm > 0:
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        parts.optimizer.step()
        parts.scheduler.step()
        parts.optimizer.zero_grad(set_to_none=True)
        if parts.ema is not None and parts.ema_of is not None:
            parts.ema.update(parts.modules[parts.ema_of])
        step += 1
        window_steps += 1
        for key, value in metrics.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        if step % config.log_every_steps == 0 or step == config.steps:
            elapsed = time.monotonic() - window_start
            per_step = elapsed / max(1, window_steps)
            eta_min = per_step * (config.steps - step) / 60
            shown = " ".join(f"{k} {v / window_steps:.5f}" for k, v in sums.items())
            lr = parts.optimizer.param_groups[0]["lr"]
            log(f"[{name}] step {step}/{config.steps} {shown} lr {lr:.3g} {per_step:.3f} s/step eta {eta_min:.1f} min")
            window_start, window_steps, sums = time.monotonic(), 0, {}
        if on_step is not None:
            on_step(step, metrics)
        due_time = config.save_every_s > 0 and time.monotonic() - last_save >= config.save_every_s
        due_steps = config.save_every_steps > 0 and step % config.save_every_steps == 0
        if state_path is not None and (due_time or due_steps or step == config.steps):
            save_loop_state(Path(state_path), parts, step, config_record)
            last_save = time.monotonic()
            if on_save is not None:
                on_save(step)
        if should_stop is not None and should_stop() and step < config.steps:
            if state_path is not None:
                save_loop_state(Path(state_path), parts, step, config_record)
            log(f"[{name}] stop requested: state saved at step {step}/{config.steps}")
            raise TrainingStopped(name, step)
    for module in parts.modules.values():
        module.eval()
    return step


def iter_chunks(n: int, chunk: int) -> Iterator[tuple[int, int]]:
    for start in range(0, n, chunk):
        yield start, min(n, start + chunk)
