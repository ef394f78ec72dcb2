"""Line/edge annotators: huabi vs controlnet_aux 0.0.10 (lllyasviel's code) on the same weights and image.

    .venv/bin/python bench/bench_line_annotators.py --size 512 --repeats 3
    .venv/bin/python bench/bench_line_annotators.py --only mlsd softedge_hed

For each annotator: random weights (seeded) in sd-webui-controlnet's file layout, loaded by
huabi from a temporary models folder; the same state dict in controlnet_aux's network (its
module files taken out of the wheel ``setup.sh --dev`` downloads into ``<venv>/huabi-reference``).
Both run on one RGB image of ``--size`` x ``--size`` (a multiple of 64, so neither pads nor
resizes) in one process.  Reported: huabi's load time, the median detect time of each over
``--repeats`` runs after one warm-up, their ratio, and whether the 8-bit maps are identical.
"""

from __future__ import annotations

import argparse
import functools
import glob
import importlib
import json
import statistics
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

PACKAGE = "controlnet_aux_reference"
FILES = ("util.py", "hed/__init__.py", "lineart/__init__.py", "lineart_anime/__init__.py", "mlsd/__init__.py",
         "mlsd/utils.py", "mlsd/models/__init__.py", "mlsd/models/mbv2_mlsd_large.py", "pidi/__init__.py",
         "pidi/model.py")


def reference_package(folder: Path):
    wheels = sorted(glob.glob(str(Path(sys.prefix) / "huabi-reference" / "controlnet_aux-0.0.10-*.whl")))
    if not wheels:
        raise SystemExit("controlnet_aux wheel not found: run bash setup.sh --dev")
    with zipfile.ZipFile(wheels[0]) as archive:
        for name in FILES:
            target = folder / PACKAGE / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(f"controlnet_aux/{name}"))
    (folder / PACKAGE / "__init__.py").write_text("")
    sys.path.insert(0, str(folder))
    return lambda name: importlib.import_module(f"{PACKAGE}.{name}")


def randomize(net: torch.nn.Module, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in net.state_dict().items():
            if tensor.is_floating_point():
                scale = 1.0 if "running_var" in name else 0.05
                tensor.copy_(torch.rand(tensor.shape, generator=generator) * scale + (0.5 if "running_var" in name else 0))


def cases(aux):
    """(module, file, reference network, reference call(image) -> uint8 map)."""
    hed = aux("hed").ControlNetHED_Apache2()
    lineart = aux("lineart").Generator(3, 1, 3)
    norm = functools.partial(torch.nn.InstanceNorm2d, affine=False, track_running_stats=False)
    anime = aux("lineart_anime").UnetGenerator(3, 1, 8, 64, norm_layer=norm, use_dropout=False)
    mlsd = aux("mlsd.models.mbv2_mlsd_large").MobileV2_MLSD_Large()
    pidi = aux("pidi.model").pidinet()

    def grey(result):
        return result[..., 0] if result.ndim == 3 else result

    def side(image):
        return min(image.shape[:2])

    return [
        ("softedge_hed", "ControlNetHED.pth", hed, lambda d, im: grey(d(im, detect_resolution=side(im), image_resolution=side(im), output_type="np")),
         aux("hed").HEDdetector),
        ("lineart_realistic", "sk_model.pth", lineart,
         lambda d, im: grey(d(im, detect_resolution=side(im), image_resolution=side(im), output_type="np")),
         lambda net: aux("lineart").LineartDetector(net, net)),
        ("lineart_anime", "netG.pth", anime, lambda d, im: grey(d(im, detect_resolution=side(im), image_resolution=side(im), output_type="np")),
         aux("lineart_anime").LineartAnimeDetector),
        ("mlsd", "mlsd_large_512_fp32.pth", mlsd,
         lambda d, im: grey(d(im, thr_v=0.1, thr_d=0.1, detect_resolution=side(im), image_resolution=side(im), output_type="np")),
         aux("mlsd").MLSDdetector),
        ("softedge_pidinet", "table5_pidinet.pth", pidi,
         lambda d, im: grey(d(im, detect_resolution=side(im), image_resolution=side(im), output_type="np")),
         aux("pidi").PidiNetDetector),
    ]


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


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
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
    results = []
    with tempfile.TemporaryDirectory() as scratch:
        aux = reference_package(Path(scratch) / "reference")
        models = Path(scratch) / "models"
        (models / "annotators").mkdir(parents=True)
        for index, (module, file_name, net, call, detector_class) in enumerate(cases(aux)):
            if args.only and module not in args.only:
                continue
            randomize(net, seed=index)
            net.eval()
            torch.save(net.state_dict(), models / "annotators" / file_name)
            annotator = registry[module]
            start = time.perf_counter()
            ours_net = annotator.load({file_name: find_annotator_file(file_name, models, module=module)},
                                      torch.device("cpu"))
            load_s = time.perf_counter() - start
            detector = detector_class(net)
            with torch.inference_mode():
                ours_map = np.round(annotator.detect(ours_net, image, 0.1, 0.1)[..., 0] * 255).astype(np.uint8)
                theirs_map = call(detector, image)
                huabi_s = median_time(lambda: annotator.detect(ours_net, image, 0.1, 0.1), args.repeats)
                reference_s = median_time(lambda: call(detector, image), args.repeats)
            results.append({"module": module, "load_s": round(load_s, 3), "huabi_s": round(huabi_s, 3),
                            "controlnet_aux_s": round(reference_s, 3), "ratio": round(huabi_s / reference_s, 3),
                            "identical_map": bool(np.array_equal(ours_map, theirs_map))})
            print(json.dumps(results[-1]), flush=True)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.size}x{args.size}, "
          f"median of {args.repeats}")


if __name__ == "__main__":
    main()
