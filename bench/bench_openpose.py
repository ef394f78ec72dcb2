"""OpenPose annotator speed: huabi vs controlnet_aux 0.0.10's open_pose code, same weights, same run.

    .venv/bin/python bench/bench_openpose.py --repeats 3

Random weights of the real architectures (He-scaled, seeded) in the released files' key
layout; the reference is loaded from the controlnet_aux wheel as the tests do
(``bash setup.sh --dev`` downloads it). Three stages, each timed as the median of
``--repeats`` runs after one warm-up:

1. body: a 512x512 input through the body network, upsampling, peak search and grouping
   (random weights "find" random peaks: the grouping has real work to do),
2. hand: one 160x160 crop through the hand network at its four sizes + peak search,
3. face: one 160x160 crop through the face network + peak search.

Prints seconds per stage for both and huabi's time as a ratio of the reference's.

Measured 2026-12-06 with --repeats 1, OMP_NUM_THREADS=1, on a shared, loaded 2-core machine:
body 6.7 s vs 11.5 s (0.58), hand 57.4 s vs 59.4 s (0.97), face 7.9 s vs 8.0 s (0.98). The hand
network at its four input sizes (184..736 px squares) dominates openpose_hand/openpose_full.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from huabi.models.annotators import openpose as op  # noqa: E402
from test_annotator_openpose import _file_state_dict, _randomise, _wheel, load_reference  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    times = []
    with torch.inference_mode():
        fn()  # warm-up
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    wheel = _wheel()
    if wheel is None:
        print("controlnet_aux wheel not found: bash setup.sh --dev (or HUABI_CONTROLNET_AUX_WHEEL)", file=sys.stderr)
        return 2
    print(f"torch threads: {torch.get_num_threads()} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')})")
    with tempfile.TemporaryDirectory() as tmp:
        ref = load_reference(wheel, Path(tmp) / "reference_open_pose_bench")
        files = {}
        for name, net, strip, seed in ((op.BODY_FILE, ref.model.bodypose_model(), True, 1),
                                       (op.HAND_FILE, ref.model.handpose_model(), True, 2),
                                       (op.FACE_FILE, ref.FaceNet(), False, 3)):
            files[name] = Path(tmp) / name
            torch.save(_file_state_dict(_randomise(net, seed), strip_block=strip), files[name])
        body = op.load_strict(op.BodyPoseNet(), files[op.BODY_FILE], what="body")
        hand = op.load_strict(op.CascadeHeatmapNet(op.HAND_HEATMAPS), files[op.HAND_FILE], what="hand")
        face = op.load_strict(op.CascadeHeatmapNet(op.FACE_HEATMAPS), files[op.FACE_FILE], what="face")
        ref_body, ref_hand = ref.body.Body(str(files[op.BODY_FILE])), ref.Hand(str(files[op.HAND_FILE]))
        ref_face = ref.Face(str(files[op.FACE_FILE]))
        rng = np.random.default_rng(0)
        image = rng.integers(0, 256, (512, 512, 3), dtype=np.uint8)
        crop = np.ascontiguousarray(image[100:260, 100:260])
        stages = {
            "body 512x512": (lambda: _body_once(body, image), lambda: ref_body(image)),
            "hand 160x160 crop": (lambda: op.hand_keypoints(hand, crop), lambda: ref_hand(crop)),
            "face 160x160 crop": (lambda: op.face_keypoints(face, crop),
                                  lambda: ref_face.compute_peaks_from_heatmaps(ref_face(crop))),
        }
        print(f"{'stage':<20} {'huabi s':>9} {'reference s':>12} {'ratio':>7}")
        for name, (ours, theirs) in stages.items():
            t_ours = _median_seconds(ours, args.repeats)
            t_ref = _median_seconds(theirs, args.repeats)
            print(f"{name:<20} {t_ours:>9.3f} {t_ref:>12.3f} {t_ours / t_ref:>7.2f}")
    return 0


def _body_once(net, image):
    heatmaps, fields = op.body_maps(net, image)
    return op.group_people(op.find_peaks(heatmaps), fields, image.shape[0])


if __name__ == "__main__":
    sys.exit(main())
