"""Progress as a stream of events, and the handle that stops a job (A1111's Interrupt / Skip).

Every job reports through one callback that receives :class:`ProgressEvent` values; the CLI's
progress bar, a server's ``/progress`` and live previews all read the same dataclass. The
sampler's latest denoised latent rides along (``latent``) and :meth:`ProgressEvent.preview`
turns it into a small image only when someone asks (a cheap latent-to-RGB projection, no VAE).

:class:`Cancellation` is thread-safe (a server calls it from another thread while the job runs):
``interrupt()`` stops after the current sampling step and runs no further batches; ``skip()``
finishes the current batch early (its images are decoded and saved as they are) and goes on
with the next one. This is A1111's behaviour for its two buttons.
"""

from __future__ import annotations

import threading

from huabi.core.progress import PHASES, ProgressCallback, ProgressEvent, StopSampling

__all__ = ["PHASES", "Cancellation", "ProgressCallback", "ProgressEvent", "StopSampling"]


class Cancellation:
    """A handle to stop a running job: ``interrupt()`` (stop, no more batches) or ``skip()``
    (end the current batch early, continue with the next). Reusable: :meth:`reset` clears it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interrupted = False
        self._skipped = False

    def interrupt(self) -> None:
        with self._lock:
            self._interrupted = True

    def skip(self) -> None:
        with self._lock:
            self._skipped = True

    @property
    def interrupted(self) -> bool:
        with self._lock:
            return self._interrupted

    @property
    def skipped(self) -> bool:
        with self._lock:
            return self._skipped

    def take_skip(self) -> bool:
        """True once per ``skip()``: the batch loop consumes it when the skipped batch ends."""
        with self._lock:
            skipped, self._skipped = self._skipped, False
            return skipped

    def reset(self) -> None:
        with self._lock:
            self._interrupted = False
            self._skipped = False

    def should_stop(self) -> bool:
        with self._lock:
            return self._interrupted or self._skipped
