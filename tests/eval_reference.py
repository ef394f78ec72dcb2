"""Load the reference FID packages' own modules without torchvision.

torch-fidelity, pytorch-fid and clean-fid all declare torchvision as a dependency, and
torchvision from PyPI cannot run beside the pinned torch (it pulls its own CUDA torch),
so setup.sh installs them with ``pip install --no-deps``. Their package ``__init__``
files import torchvision, so here their *module files* are loaded directly, each under a
private package name whose ``__path__`` is the installed package folder (the package
``__init__`` never runs). Modules that import torchvision only for their data loaders get
a placeholder for those names; the code under test (feature extractor, statistics) never
touches them. What truly needs torchvision and is therefore not used:

* ``pytorch_fid.inception`` (its blocks subclass ``torchvision.models.inception``);
* ``cleanfid.inception_pytorch`` (the same) and ``cleanfid.features``;
* torch-fidelity's CLIP, VGG16 and DINOv2 extractors.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest


_PACKAGE_DIRS: dict[str, Path] = {}


def _package_dir(name: str) -> Path:
    if name not in _PACKAGE_DIRS:
        # find_spec of a top-level package locates it without running its __init__
        spec = importlib.util.find_spec(name) if name not in sys.modules else None
        if spec is None or not spec.submodule_search_locations:
            pytest.skip(f"reference package {name} not installed (bash setup.sh --dev installs it with --no-deps)")
        _PACKAGE_DIRS[name] = Path(list(spec.submodule_search_locations)[0])
    return _PACKAGE_DIRS[name]


def _placeholder(name: str, attributes: tuple[str, ...]) -> types.ModuleType:
    module = types.ModuleType(name)

    def unavailable(*args, **kwargs):
        raise RuntimeError(f"{name} needs torchvision, which is not installed beside the pinned torch")

    for attribute in attributes:
        setattr(module, attribute, unavailable)
    return module


class ReferenceLoader:
    """Loads ``package.module`` files into ``sys.modules`` under their real names (so their
    own absolute imports resolve) and removes everything it added on ``close``."""

    def __init__(self) -> None:
        self.added: list[str] = []

    def _add(self, name: str, module: types.ModuleType) -> None:
        if name not in sys.modules:
            sys.modules[name] = module
            self.added.append(name)

    def package(self, name: str) -> None:
        if name in sys.modules and name not in self.added:
            return
        package = types.ModuleType(name)
        package.__path__ = [str(_package_dir(name))]
        self._add(name, package)

    def placeholder(self, name: str, attributes: tuple[str, ...]) -> None:
        self._add(name, _placeholder(name, attributes))

    def module(self, package: str, name: str) -> types.ModuleType:
        full = f"{package}.{name}"
        if full in sys.modules:
            return sys.modules[full]
        self.package(package)
        path = _package_dir(package) / f"{name}.py"
        spec = importlib.util.spec_from_file_location(full, path)
        module = importlib.util.module_from_spec(spec)
        self._add(full, module)
        spec.loader.exec_module(module)
        return module

    def close(self) -> None:
        for name in reversed(self.added):
            sys.modules.pop(name, None)
        self.added.clear()


def torch_fidelity_modules(loader: ReferenceLoader) -> dict[str, types.ModuleType]:
    """torch-fidelity's Inception extractor and its FID/KID/IS statistics."""
    loader.package("torch_fidelity")
    # metric_* import these names from torch_fidelity.utils (which imports torchvision for its
    # dataset loaders); the statistics functions under test do not call them.
    loader.placeholder("torch_fidelity.utils", (
        "get_cacheable_input_name", "cache_lookup_one_recompute_on_miss", "extract_featuresdict_from_input_id_cached",
        "create_feature_extractor", "resolve_feature_extractor", "resolve_feature_layer_for_metric",
        "extract_featuresdict_from_input_id", "cache_lookup_group_recompute_all_on_any_miss",
    ))
    return {
        "inception": loader.module("torch_fidelity", "feature_extractor_inceptionv3"),
        "fid": loader.module("torch_fidelity", "metric_fid"),
        "kid": loader.module("torch_fidelity", "metric_kid"),
        "isc": loader.module("torch_fidelity", "metric_isc"),
        "defaults": loader.module("torch_fidelity", "defaults"),
    }


def pytorch_fid_score(loader: ReferenceLoader) -> types.ModuleType:
    """pytorch_fid.fid_score (for calculate_frechet_distance); its torchvision transforms and
    Inception imports are placeholders."""
    loader.package("pytorch_fid")
    if "torchvision" not in sys.modules:
        tv = types.ModuleType("torchvision")
        loader._add("torchvision", tv)
        loader.placeholder("torchvision.transforms", ("Compose", "ToTensor"))
        tv.transforms = sys.modules["torchvision.transforms"]
    loader.placeholder("pytorch_fid.inception", ("InceptionV3",))
    sys.modules["pytorch_fid.inception"].InceptionV3 = types.SimpleNamespace(BLOCK_INDEX_BY_DIM={2048: 3})
    return loader.module("pytorch_fid", "fid_score")


def clean_fid_modules(loader: ReferenceLoader) -> dict[str, types.ModuleType]:
    """cleanfid.resize (standalone) and cleanfid.fid (frechet_distance, kernel_distance)."""
    loader.package("cleanfid")
    loader.placeholder("cleanfid.utils", ("ResizeDataset",))
    loader.placeholder("cleanfid.features", ("build_feature_extractor", "get_reference_statistics"))
    return {"resize": loader.module("cleanfid", "resize"), "fid": loader.module("cleanfid", "fid")}
