"""normal_bae and softedge_teed: huabi vs controlnet_aux 0.0.10 on the same weights and image.

    .venv/bin/python bench/bench_normal_teed_annotators.py --size 512 --repeats 3
    .venv/bin/python bench/bench_normal_teed_annotators.py --only softedge_teed

Like ``bench_line_annotators.py`` (whose timing and weight helpers it uses): random
weights (seeded) saved in sd-webui-controlnet's file layout and loaded by huabi from a
temporary models folder; the same state dict in controlnet_aux's network, its module
files taken out of the wheel ``setup.sh --dev`` downloads.  controlnet_aux's normalbae
detector imports torchvision for one ``transforms.Normalize``: its source runs here with
that import replaced by the per-channel ``(x - mean) / std`` Normalize computes.
Reported per module: huabi's load time, the median detect time of each, their ratio,
and whether the 8-bit maps are identical.  (lineart_anime_denoise has no controlnet_aux
counterpart to time against.)
"""

from __future__ import annotations

import argparse
import glob
import importlib
import json
import sys
import tempfile
import time
import types
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_line_annotators import median_time, randomize  # noqa: E402

PACKAGE = "controlnet_aux_reference_nt"


def reference_modules(folder: Path) -> SimpleNamespace:
    """controlnet_aux's TED + TEEDdetector and NNET + NormalBaeDetector, out of the wheel."""
    wheels = sorted(glob.glob(str(Path(sys.prefix) / "huabi-reference" / "controlnet_aux-0.0.10-*.whl")))
    if not wheels:
        raise SystemExit("controlnet_aux wheel not found: run bash setup.sh --dev")
    with zipfile.ZipFile(wheels[0]) as archive:
        for name in archive.namelist():
            wanted = name in ("controlnet_aux/util.py",) or name.startswith(("controlnet_aux/teed/",
                                                                              "controlnet_aux/normalbae/nets/"))
            if wanted and name.endswith(".py"):
                target = folder / PACKAGE / name[len("controlnet_aux/"):]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(archive.read(name))
        detector_source = archive.read("controlnet_aux/normalbae/__init__.py").decode()
    (folder / PACKAGE / "__init__.py").write_text("")
    (folder / PACKAGE / "normalbae").mkdir(exist_ok=True)
    (folder / PACKAGE / "normalbae" / "__init__.py").write_text("")
    sys.path.insert(0, str(folder))
    teed = importlib.import_module(f"{PACKAGE}.teed")
    nnet = importlib.import_module(f"{PACKAGE}.normalbae.nets.NNET")
    util = importlib.import_module(f"{PACKAGE}.util")

    def normalize(mean, std):
        return lambda x: (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)

    detector = types.ModuleType(f"{PACKAGE}_normalbae_detector")
    detector.__dict__.update(NNET=nnet.NNET, HWC3=util.HWC3, resize_image=util.resize_image,
                             transforms=SimpleNamespace(Normalize=normalize))
    kept = [line for line in detector_source.splitlines()
            if not line.startswith(("import torchvision", "from huggingface_hub", "from ..util", "from .nets"))]
    exec(compile("\n".join(kept), "controlnet_aux/normalbae/__init__.py", "exec"), detector.__dict__)
    return SimpleNamespace(teed=teed, nnet=nnet, normalbae=detector)


def cases(aux: SimpleNamespace):
    """(module, file, payload saved, reference network, reference detector, call(detector, image) -> uint8 map)."""
    bae_args = SimpleNamespace(mode="client", architecture="BN", pretrained="scannet", sampling_ratio=0.4,
                               importance_ratio=0.7)
    bae = aux.nnet.NNET(bae_args)
    ted = aux.teed.TED()

    def side(image):
        return min(image.shape[:2])

    return [
        ("normal_bae", "scannet.pt", lambda state: {"model": state}, bae, aux.normalbae.NormalBaeDetector,
         lambda d, im: d(im, detect_resolution=side(im), image_resolution=side(im), output_type="np")),
        ("softedge_teed", "7_model.pth", lambda state: state, ted, aux.teed.TEEDdetector,
         lambda d, im: d(im, detect_resolution=side(im), safe_steps=2, output_type="np")[..., 0]),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (multiple of 64)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="*", help="annotator modules to run (default: all)")
    args = parser.parse_args()
    if args.size % 64:
        raise SystemExit("--size: must be a multiple of 64")
    from huabi.models.annotators import annotator_registry, find_annotator_file

    registry = annotator_registry()
    image = np.random.default_rng(0).integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    with tempfile.TemporaryDirectory() as scratch:
        aux = reference_modules(Path(scratch) / "reference")
        models = Path(scratch) / "models"
        (models / "annotators").mkdir(parents=True)
        for index, (module, file_name, payload, net, detector_class, call) in enumerate(cases(aux)):
            if args.only and module not in args.only:
                continue
            randomize(net, seed=index)
            net.eval()
            torch.save(payload(net.state_dict()), models / "annotators" / file_name)
            annotator = registry[module]
            start = time.perf_counter()
            ours_net = annotator.load({file_name: find_annotator_file(file_name, models, module=module)},
                                      torch.device("cpu"))
            load_s = time.perf_counter() - start
            detector = detector_class(net)
            with torch.inference_mode():
                ours = np.round(annotator.detect(ours_net, image, None, None) * 255).astype(np.uint8)
                ours = ours if module == "normal_bae" else ours[..., 0]
                theirs = call(detector, image)
                huabi_s = median_time(lambda: annotator.detect(ours_net, image, None, None), args.repeats)
                reference_s = median_time(lambda: call(detector, image), args.repeats)
            print(json.dumps({"module": module, "load_s": round(load_s, 3), "huabi_s": round(huabi_s, 3),
                              "controlnet_aux_s": round(reference_s, 3), "ratio": round(huabi_s / reference_s, 3),
                              "identical_map": bool(np.array_equal(ours, theirs))}), flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, "
          f"median of {args.repeats}")


if __name__ == "__main__":
    main()
