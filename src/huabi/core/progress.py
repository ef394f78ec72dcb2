"""Progress events of sampling (pure data): what a step callback receives, and the signal that stops a loop.

The service adds the job-wide view (step counts over every batch) and the cancellation handle;
see :mod:`huabi.service.progress`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

PHASES = ("first pass", "hires", "refiner")


@dataclass(frozen=True)
class ProgressEvent:
    """One sampling step of a job.

    ``step``/``total`` count sampling steps over the whole job (every batch, both hires passes);
    ``batch``/``batch_count`` say which batch; ``phase`` is ``"first pass"``, ``"hires"`` (the
    second pass of the hires fix) or ``"refiner"`` (after the SDXL refiner took over).
    ``latent`` is the current denoised latent [B, C, h, w] (float32; None when not known).
    """

    step: int
    total: int
    phase: str = "first pass"
    batch: int = 0
    batch_count: int = 1
    latent: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.phase not in PHASES:
            raise ValueError(f"progress: unknown phase {self.phase!r}; valid: {', '.join(PHASES)}")

    @property
    def fraction(self) -> float:
        return self.step / self.total if self.total else 1.0

    def preview(self, index: int = 0) -> Image.Image | None:
        """A quick RGB look at image ``index``'s current latent (A1111's "Approx cheap"), or None."""
        if self.latent is None:
            return None
        from huabi.core.preview import latent_preview

        return latent_preview(self.latent[index])


ProgressCallback = Callable[[ProgressEvent], None]


class StopSampling(Exception):  # noqa: N818 -- a signal, not an error
    """Raised from a step callback to end the current denoise loop early (caught by the pipelines)."""
