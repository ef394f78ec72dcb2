"""FID, KID, Inception Score and CLIP score over folders of images (``huabi eval ...`` and Python).

    from huabi.eval import fid, kid, inception_score, clip_score, EvalOptions
    report = fid("real/", "generated/", EvalOptions(features="pt_inception-2015-12-05-6726825d.pth"))
    print(report.summary())

Every report carries the extractor's description and a sentence saying whether the
number can be compared with published ones (the default huabi-mini towers: never).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from huabi.errors import HuabiError
from huabi.eval import metrics
from huabi.eval.folders import labels_from_file, list_images, prompts_from_file, prompts_from_infotext


@dataclass(frozen=True)
class EvalOptions:
    features: str | Path | None = None  # None: huabi-mini's towers; else an Inception/CLIP file or folder
    device: str = "cpu"
    batch_size: int = 32
    cache_dir: Path | None = None
    use_cache: bool = True
    resize: str = "tf1"  # Inception only: tf1 (torch-fidelity), torch (pytorch-fid), clean (clean-fid)
    progress: bool = False
    kid_subsets: int = metrics.KID_SUBSETS
    kid_subset_size: int = metrics.KID_SUBSET_SIZE
    is_splits: int = metrics.IS_SPLITS
    seed: int = metrics.RNG_SEED
    recursive: bool = False

    def __post_init__(self) -> None:
        from huabi.eval.preprocess import INCEPTION_RESIZE_MODES

        if self.batch_size < 1:
            raise HuabiError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.resize not in INCEPTION_RESIZE_MODES:
            raise HuabiError(f"resize must be one of {', '.join(INCEPTION_RESIZE_MODES)}, got {self.resize!r}")
        if self.kid_subsets < 1 or self.kid_subset_size < 2:
            raise HuabiError(f"KID needs subsets >= 1 and subset size >= 2, got {self.kid_subsets} and {self.kid_subset_size}")
        if self.is_splits < 1:
            raise HuabiError(f"is_splits must be >= 1, got {self.is_splits}")


@dataclass(frozen=True)
class MetricReport:
    metric: str  # "FID", "KID", "IS", "CLIP score"
    value: float
    std: float | None
    sets: dict  # role -> {"folder": str, "images": int}
    extractor: dict
    note: str
    warnings: tuple[str, ...] = ()
    details: dict = field(default_factory=dict)

    def summary(self) -> str:
        sets = ", ".join(f"{role} {info['images']} images" for role, info in self.sets.items())
        spread = f" ± {self.std:.6g}" if self.std is not None else ""
        return f"{self.metric}: {self.value:.6g}{spread} ({sets}; {self.extractor['name']})"

    def to_dict(self) -> dict:
        return asdict(self)


class Session:
    """One loaded extractor and cache, reused across metrics (``compare`` computes several)."""

    def __init__(self, options: EvalOptions = EvalOptions(), *, extractor=None) -> None:
        from huabi.eval.extractors import load_extractor

        self.options = options
        self.extractor = extractor or load_extractor(options.features, device=options.device, resize=options.resize)
        self._cache = None
        if options.use_cache:
            from huabi.eval.cache import FeatureCache

            self._cache = FeatureCache(options.cache_dir)

    def close(self) -> None:
        if self._cache is not None:
            self._cache.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def vectors(self, paths: Sequence[Path], description: str) -> np.ndarray:
        from huabi.eval.features import compute_features

        return compute_features(paths, self.extractor, cache=self._cache, batch_size=self.options.batch_size,
                                progress=self.options.progress, description=description)

    def vectors_from_images(self, images: Sequence) -> np.ndarray:
        """Feature vectors of in-memory PIL images (no cache): for a trainer's before/after samples."""
        import torch

        rows = []
        for start in range(0, len(images), self.options.batch_size):
            batch = torch.stack([self.extractor.prepare(image) for image in images[start : start + self.options.batch_size]])
            rows.append(self.extractor.embed(batch))
        if not rows:
            raise HuabiError("no images given")
        return np.concatenate(rows)

    def folder(self, folder: str | Path, role: str) -> tuple[list[Path], np.ndarray]:
        paths = list_images(folder, recursive=self.options.recursive)
        return paths, self.vectors(paths, f"{role} ({Path(folder).name})")

    # ------------------------------------------------------------ metrics on feature arrays

    def _small_set_warnings(self, counts: dict[str, int], dim: int) -> list[str]:
        notes = []
        for role, count in counts.items():
            if count < dim:
                notes.append(f"{role}: {count} images < {dim} feature dimensions, so its covariance is singular and FID is "
                             f"biased upwards; use at least {dim} (published FIDs use 50,000)")
        return notes

    def fid_from_vectors(self, real: np.ndarray, gen: np.ndarray, sets: dict) -> MetricReport:
        features_real, features_gen = self.extractor.fid_features(real), self.extractor.fid_features(gen)
        notes = self._small_set_warnings({role: info["images"] for role, info in sets.items()}, features_real.shape[1])
        value = metrics.fid_from_features(features_real, features_gen)
        return MetricReport("FID", value, None, sets, self.extractor.describe(), self.extractor.note, tuple(notes),
                            {"feature_dim": int(features_real.shape[1])})

    def kid_from_vectors(self, real: np.ndarray, gen: np.ndarray, sets: dict) -> MetricReport:
        o = self.options
        result = metrics.kernel_inception_distance(self.extractor.fid_features(real), self.extractor.fid_features(gen),
                                                   subsets=o.kid_subsets, subset_size=o.kid_subset_size, seed=o.seed)
        notes = []
        if result.subset_size < o.kid_subset_size:
            notes.append(f"KID subset size reduced from {o.kid_subset_size} to {result.subset_size} (the smaller set's size)")
        return MetricReport("KID", result.mean, result.std, sets, self.extractor.describe(), self.extractor.note, tuple(notes),
                            {"subsets": result.subsets, "subset_size": result.subset_size, "kernel": "polynomial, degree 3, gamma 1/d, coef 1"})

    def is_from_vectors(self, gen: np.ndarray, sets: dict, labels: Sequence[str] | None) -> MetricReport:
        logits = self.extractor.class_logits(gen, labels)
        result = metrics.inception_score(logits, splits=self.options.is_splits, seed=self.options.seed)
        details = {"splits": result.splits, "classes": int(logits.shape[1])}
        notes = []
        if labels:
            details["labels"] = len(labels)
            notes.append(f"zero-shot classes: {len(labels)} class names through the CLIP text tower (Inception-v3's 1008 ImageNet classes are the published convention)")
        return MetricReport("IS", result.mean, result.std, sets, self.extractor.describe(), self.extractor.note, tuple(notes), details)

    def clip_score_from_vectors(self, gen: np.ndarray, prompts: Sequence[str], sets: dict) -> MetricReport:
        text = self.extractor.text_features(list(prompts))
        value = metrics.clip_score(text, gen)
        return MetricReport("CLIP score", value, None, sets, self.extractor.describe(), self.extractor.note, (),
                            {"convention": "100 * max(cos(text, image), 0), averaged (torchmetrics)"})


def _sets(**folders: tuple[str | Path, int]) -> dict:
    return {role: {"folder": str(folder), "images": count} for role, (folder, count) in folders.items()}


def fid(real: str | Path, generated: str | Path, options: EvalOptions = EvalOptions(), *, session: Session | None = None) -> MetricReport:
    real_paths, gen_paths = list_images(real, recursive=options.recursive), list_images(generated, recursive=options.recursive)
    with _session(options, session) as s:
        real_vectors, gen_vectors = s.vectors(real_paths, f"real ({Path(real).name})"), s.vectors(gen_paths, f"generated ({Path(generated).name})")
        return s.fid_from_vectors(real_vectors, gen_vectors, _sets(real=(real, len(real_paths)), generated=(generated, len(gen_paths))))


def kid(real: str | Path, generated: str | Path, options: EvalOptions = EvalOptions(), *, session: Session | None = None) -> MetricReport:
    real_paths, gen_paths = list_images(real, recursive=options.recursive), list_images(generated, recursive=options.recursive)
    with _session(options, session) as s:
        real_vectors, gen_vectors = s.vectors(real_paths, f"real ({Path(real).name})"), s.vectors(gen_paths, f"generated ({Path(generated).name})")
        return s.kid_from_vectors(real_vectors, gen_vectors, _sets(real=(real, len(real_paths)), generated=(generated, len(gen_paths))))


def inception_score(generated: str | Path, options: EvalOptions = EvalOptions(), *, labels: str | Path | Sequence[str] | None = None,
                    session: Session | None = None) -> MetricReport:
    """With a CLIP extractor, ``labels`` (a file or a list of class names) are the classes; without
    them, the distinct prompts in the images' infotext are used."""
    with _session(options, session) as s:
        paths, vectors = s.folder(generated, "generated")
        from huabi.eval.extractors import ClipExtractor

        names = None
        if isinstance(s.extractor, ClipExtractor):
            if isinstance(labels, (str, Path)):
                names = labels_from_file(labels)
            elif labels:
                names = list(dict.fromkeys(labels))
            else:
                names = list(dict.fromkeys(prompts_from_infotext(paths)))
                if len(names) < 2:
                    raise HuabiError(f"{generated}: IS with CLIP features needs >= 2 class names; the images' prompts give {len(names)} (pass --labels FILE)")
        return s.is_from_vectors(vectors, _sets(generated=(generated, len(paths))), names)


def clip_score(generated: str | Path, options: EvalOptions = EvalOptions(), *, prompts: str | Path | Sequence[str] | None = None,
               session: Session | None = None) -> MetricReport:
    """Prompts from each image's infotext, or a file (one per line, file-name order), or a list."""
    with _session(options, session) as s:
        paths = list_images(generated, recursive=options.recursive)
        if prompts is None:
            texts = prompts_from_infotext(paths)
        elif isinstance(prompts, (str, Path)):
            texts = prompts_from_file(prompts, len(paths))
        else:
            texts = list(prompts)
            if len(texts) != len(paths):
                raise HuabiError(f"{len(texts)} prompts for {len(paths)} images")
        vectors = s.vectors(paths, f"generated ({Path(generated).name})")
        return s.clip_score_from_vectors(vectors, texts, _sets(generated=(generated, len(paths))))


class _session:
    """Use the caller's session, or open (and close) one for this call."""

    def __init__(self, options: EvalOptions, session: Session | None) -> None:
        self.given = session
        self.options = options
        self.own: Session | None = None

    def __enter__(self) -> Session:
        if self.given is not None:
            return self.given
        self.own = Session(self.options)
        return self.own

    def __exit__(self, *exc) -> None:
        if self.own is not None:
            self.own.close()
