"""Aspect-ratio bucketing, as seed 000 (questions 31-32) describes it. Pure functions, no I/O.

1. Bucket design. The base resolution ``R`` (``--resolution``) is the longest side. Keeping
   the height at ``R``, the width starts at ``R`` and steps down by 64 while it is larger than
   the dataset's smallest width; every step is a bucket ``(width, R)``. The same with the
   width kept at ``R`` and the height stepping down gives ``(R, height)`` buckets. ``(R, R)``
   is added last. "The dataset's smallest width" is read in the bucket's frame: an image of
   ``w x h`` with ``w < h`` is ``R * w / h`` wide once its height is ``R`` (an image's raw
   pixel count says nothing about which bucket shape it needs). ``min_side`` (kohya's
   ``--min-bucket-reso``) is a floor: no bucket side goes below it.
2. Assignment. Each image goes to the bucket whose aspect ratio (width / height) is nearest
   (the first one in table order on a tie); it is scaled to *cover* the bucket and centre-cropped.
   With ``no_upscale`` an image smaller than its bucket keeps its own size (each side rounded
   down to a multiple of 64, at least 64) in a bucket of its own size instead of being enlarged.
   Optionally an image whose aspect error is above ``max_aspect_error`` is dropped (the seed:
   "if even the nearest bucket is far off, drop the image").
3. Batches. Buckets with fewer images than the batch size give their images to the shared
   "remaining" bucket, trained at the base resolution ``(R, R)``. Every epoch each bucket's
   items are shuffled and cut into batches (a last, shorter batch is kept); batches are then
   drawn bucket by bucket with probability proportional to the items the bucket has left,
   so small buckets are not used up early and big ones left for the end.

Everything random is a pure function of ``(seed, epoch)``, so the batch at a given step is
known without replaying earlier steps (exact resume).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from huabi.errors import HuabiError

BUCKET_STEP_PX = 64


@dataclass(frozen=True)
class Bucket:
    width_px: int
    height_px: int

    @property
    def aspect(self) -> float:
        return self.width_px / self.height_px

    def __str__(self) -> str:
        return f"{self.width_px}x{self.height_px}"


def check_resolution(resolution_px: int) -> None:
    if isinstance(resolution_px, bool) or not isinstance(resolution_px, int) or resolution_px < BUCKET_STEP_PX:
        raise HuabiError(f"resolution must be an integer >= {BUCKET_STEP_PX}, got {resolution_px!r}")
    if resolution_px % BUCKET_STEP_PX:
        raise HuabiError(f"resolution must be a multiple of {BUCKET_STEP_PX}, got {resolution_px}")


def smallest_sides(sizes: Sequence[tuple[int, int]], resolution_px: int) -> tuple[float, float]:
    """(smallest width of tall images, smallest height of wide images) once the long side is R."""
    min_width = min_height = float(resolution_px)
    for width, height in sizes:
        if width < height:
            min_width = min(min_width, resolution_px * width / height)
        elif height < width:
            min_height = min(min_height, resolution_px * height / width)
    return min_width, min_height


def design_buckets(resolution_px: int, min_width: float, min_height: float, *, min_side: int = BUCKET_STEP_PX) -> list[Bucket]:
    """The seed's bucket table: ``(w, R)`` for the shrinking widths, ``(R, h)``, then ``(R, R)``."""
    check_resolution(resolution_px)
    if min_side < BUCKET_STEP_PX or min_side % BUCKET_STEP_PX:
        raise HuabiError(f"min bucket side must be a multiple of {BUCKET_STEP_PX} and >= {BUCKET_STEP_PX}, got {min_side}")

    def shrinking(smallest: float) -> list[int]:
        sides, side = [], resolution_px
        while side > smallest and side - BUCKET_STEP_PX >= min_side:
            side -= BUCKET_STEP_PX
            sides.append(side)
        return sorted(sides)

    tall = [Bucket(w, resolution_px) for w in shrinking(min_width)]
    wide = [Bucket(resolution_px, h) for h in shrinking(min_height)]
    return [*tall, *wide, Bucket(resolution_px, resolution_px)]


def nearest_bucket(width: int, height: int, buckets: Sequence[Bucket]) -> int:
    """Index of the bucket of nearest aspect ratio (argmin |bucket aspect - image aspect|)."""
    aspect = width / height
    errors = [abs(bucket.aspect - aspect) for bucket in buckets]
    return errors.index(min(errors))


def cover_and_crop(width: int, height: int, bucket: Bucket) -> tuple[tuple[int, int], tuple[int, int, int, int]]:
    """Scale so the image covers the bucket, then the centred crop box: ((w, h), (left, top, right, bottom))."""
    scale = max(bucket.width_px / width, bucket.height_px / height)
    resized_w = max(bucket.width_px, round(width * scale))
    resized_h = max(bucket.height_px, round(height * scale))
    left = (resized_w - bucket.width_px) // 2
    top = (resized_h - bucket.height_px) // 2
    return (resized_w, resized_h), (left, top, left + bucket.width_px, top + bucket.height_px)


def own_size_bucket(width: int, height: int) -> Bucket:
    """``no_upscale``: the image's own size, each side rounded down to 64 (at least 64)."""
    def down(side: int) -> int:
        return max(BUCKET_STEP_PX, side // BUCKET_STEP_PX * BUCKET_STEP_PX)

    return Bucket(down(width), down(height))


@dataclass(frozen=True)
class BucketPlan:
    """Which bucket every dataset entry trains in, and the batches of each epoch."""

    resolution_px: int
    batch_size: int
    buckets: tuple[Bucket, ...]  # the designed table (+ own-size buckets with no_upscale)
    bucket_of: tuple[int, ...]  # per entry: index into ``buckets`` it was assigned to
    train_bucket_of: tuple[int, ...]  # per entry: where it trains (-1: the remaining bucket at R x R)
    repeats: tuple[int, ...]  # per entry: copies per epoch (kohya's N_ folder prefix)
    dropped: tuple[int, ...] = ()  # entries dropped for a too large aspect error
    _members: dict = field(default_factory=dict, compare=False, repr=False)

    @property
    def remaining_bucket(self) -> Bucket:
        return Bucket(self.resolution_px, self.resolution_px)

    def training_bucket(self, entry: int) -> Bucket:
        index = self.train_bucket_of[entry]
        return self.remaining_bucket if index < 0 else self.buckets[index]

    def members(self) -> dict[int, list[int]]:
        """Training bucket index (-1: remaining) -> entry indices repeated by their repeat count."""
        if not self._members:
            for entry, index in enumerate(self.train_bucket_of):
                if entry in self.dropped:
                    continue
                self._members.setdefault(index, []).extend([entry] * self.repeats[entry])
        return self._members

    def batches_per_epoch(self) -> int:
        return sum(math.ceil(len(items) / self.batch_size) for items in self.members().values())

    def epoch_batches(self, epoch: int, seed: int) -> list[list[int]]:
        """The batches (entry indices) of ``epoch`` in training order."""
        generator = torch.Generator().manual_seed(seed * 1_000_033 + epoch * 7 + 11)
        queues: list[list[list[int]]] = []
        for index in sorted(self.members()):
            items = self.members()[index]
            order = torch.randperm(len(items), generator=generator).tolist()
            shuffled = [items[i] for i in order]
            queues.append([shuffled[start:start + self.batch_size] for start in range(0, len(shuffled), self.batch_size)])
        left = [sum(len(batch) for batch in queue) for queue in queues]
        out: list[list[int]] = []
        while any(left):
            pick = int(torch.multinomial(torch.tensor(left, dtype=torch.float64), 1, generator=generator))
            batch = queues[pick].pop(0)
            left[pick] -= len(batch)
            out.append(batch)
        return out

    def table(self) -> str:
        """The printed bucket table: index, size, aspect, images (entries), with repeats."""
        counts: dict[int, tuple[int, int]] = {}
        for entry, index in enumerate(self.train_bucket_of):
            if entry in self.dropped:
                continue
            images, with_repeats = counts.get(index, (0, 0))
            counts[index] = (images + 1, with_repeats + self.repeats[entry])
        lines = ["bucket  size        aspect  images  with repeats"]
        for index, bucket in enumerate(self.buckets):
            if bucket == self.remaining_bucket and index not in counts:
                continue  # trained together with the remaining bucket (same size)
            images, with_repeats = counts.get(index, (0, 0))
            lines.append(f"{index:>6}  {str(bucket):<10}  {bucket.aspect:6.3f}  {images:>6}  {with_repeats:>12}")
        if -1 in counts:
            images, with_repeats = counts[-1]
            lines.append(f"remain  {str(self.remaining_bucket):<10}  {1.0:6.3f}  {images:>6}  {with_repeats:>12}"
                         f"  (the {self.remaining_bucket} bucket + buckets with fewer than {self.batch_size})")
        if self.dropped:
            lines.append(f"dropped {len(self.dropped)} image(s): aspect ratio too far from every bucket")
        return "\n".join(lines)


def plan_buckets(
    sizes: Sequence[tuple[int, int]],
    repeats: Sequence[int],
    *,
    resolution_px: int,
    batch_size: int,
    min_side: int = BUCKET_STEP_PX,
    no_upscale: bool = False,
    max_aspect_error: float | None = None,
    enabled: bool = True,
) -> BucketPlan:
    """Assign every image (``sizes`` = (width, height) per entry) to a bucket.

    ``enabled=False`` trains everything at ``R x R`` (cover + centre crop), as without
    kohya's ``--enable-bucket``.
    """
    check_resolution(resolution_px)
    if not sizes:
        raise HuabiError("no images to put in buckets")
    if enabled:
        buckets = design_buckets(resolution_px, *smallest_sides(sizes, resolution_px), min_side=min_side)
    else:
        buckets = [Bucket(resolution_px, resolution_px)]
    bucket_of, dropped = [], []
    for entry, (width, height) in enumerate(sizes):
        index = nearest_bucket(width, height, buckets)
        bucket = buckets[index]
        if max_aspect_error is not None and abs(bucket.aspect - width / height) > max_aspect_error:
            dropped.append(entry)
        if no_upscale and (width < bucket.width_px or height < bucket.height_px):
            own = own_size_bucket(width, height)
            if own not in buckets:
                buckets.append(own)
            index = buckets.index(own)
        bucket_of.append(index)
    if len(dropped) == len(sizes):
        raise HuabiError("no images in any bucket: every image's aspect ratio is too far from the buckets")
    counts: dict[int, int] = {}
    for entry, index in enumerate(bucket_of):
        if entry not in dropped:
            counts[index] = counts.get(index, 0) + repeats[entry]
    full_square = buckets.index(Bucket(resolution_px, resolution_px))
    # (with no_upscale nothing moves: the remaining bucket would enlarge small images)
    train_bucket_of = tuple(
        index if no_upscale or counts.get(index, 0) >= batch_size else -1 for index in bucket_of
    )
    # The R x R bucket and the remaining bucket are the same size: train them together.
    train_bucket_of = tuple(-1 if index == full_square else index for index in train_bucket_of)
    return BucketPlan(
        resolution_px=resolution_px, batch_size=batch_size, buckets=tuple(buckets), bucket_of=tuple(bucket_of),
        train_bucket_of=train_bucket_of, repeats=tuple(int(r) for r in repeats), dropped=tuple(dropped),
    )
