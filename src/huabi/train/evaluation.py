"""Evaluation numbers for a training run's report: CLIP score and FID, before and after.

At the end of training (and, with ``--eval-at-samples``, at every sample point) the trainer
renders a fixed prompt set (``--eval-prompts FILE``, else the ``--sample-prompts`` file; kohya's
per-line flags) with the base model ("before") and with the trained result ("after"), at the
same seeds, and measures both sets through :mod:`huabi.eval`'s API:

* CLIP score of each image against its own prompt (prompt text without ``<lora:...>``);
* FID of the rendered images against the training images, when both sets hold at least
  ``MIN_FID_IMAGES`` images (fewer makes FID mostly noise; the number is then left out and
  the report says why). Extra warnings of the metric (singular covariance below the feature
  dimension) are kept in the report.

The default extractor is huabi-mini's own CLIP towers (``--eval-features`` picks an Inception
or CLIP file): such numbers compare runs with each other, not with published ones; every report
carries that sentence.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

MIN_FID_IMAGES = 10


def measure(session, images: Sequence[Path], prompts: Sequence[str], training_images: Sequence[Path],
            training_vectors=None) -> dict:
    """CLIP score of ``images`` against ``prompts`` and (with enough images) FID against the training set."""
    vectors = session.vectors(list(images), "evaluation images")
    sets = {"generated": {"folder": str(Path(images[0]).parent), "images": len(images)}}
    clip = session.clip_score_from_vectors(vectors, list(prompts), sets)
    out: dict = {"images": len(images), "clip_score": round(float(clip.value), 6)}
    if min(len(images), len(training_images)) < MIN_FID_IMAGES:
        out["fid_vs_training_images"] = None
        out["fid_skipped"] = (f"FID needs at least {MIN_FID_IMAGES} images on each side "
                              f"({len(images)} rendered, {len(training_images)} training images)")
        return out
    if training_vectors is None:
        training_vectors = session.vectors(list(training_images), "training images")
    report = session.fid_from_vectors(training_vectors, vectors, {
        "training": {"folder": str(Path(training_images[0]).parent), "images": len(training_images)}, **sets})
    out["fid_vs_training_images"] = round(float(report.value), 6)
    if report.warnings:
        out["fid_warnings"] = list(report.warnings)
    return out


def summary_line(before: dict, after: dict) -> str:
    """One printed line: ``eval: CLIP score 41.2 -> 55.3, FID vs training images 0.91 -> 0.52``."""
    text = f"eval ({after['images']} images): CLIP score {before['clip_score']:.4g} -> {after['clip_score']:.4g}"
    if after.get("fid_vs_training_images") is not None and before.get("fid_vs_training_images") is not None:
        text += f", FID vs training images {before['fid_vs_training_images']:.4g} -> {after['fid_vs_training_images']:.4g}"
    elif after.get("fid_skipped"):
        text += f" (no FID: {after['fid_skipped']})"
    return text + " (before -> after)"
