"""OpenPose annotators (body, hands, face) as sd-webui-controlnet runs them.

Three networks, each read from sd-webui-controlnet's file:

- ``body_pose_model.pth``: CMU's body model (Cao et al., "Realtime Multi-Person 2D
  Pose Estimation using Part Affinity Fields", 2017): a VGG-19 front (10 convs)
  plus two CPM convs, then six stages of two branches, one predicting 38 part
  affinity field channels (19 limbs x (dx, dy)), the other 19 keypoint heatmaps
  (18 COCO keypoints + background).
- ``hand_pose_model.pth`` (Simon et al., 2017) and ``facenet.pth``: a VGG front
  (13 convs + one CPM conv) and six single-branch stages, 22 (hand) or 71 (face)
  heatmaps.

Post-processing follows the annotator the ControlNet openpose models were
trained on: heatmaps upsampled to the image, smoothed (Gaussian, sigma 3),
4-neighbour peaks above 0.1; limbs scored by sampling the affinity field at 10
points; people assembled greedily; hand and face boxes derived from the body's
arm and head keypoints; maps drawn on black in the standard 18-colour scheme.
The image is edge-padded to a multiple of 64 first and the map cropped back,
as the extension does.
"""

from __future__ import annotations

import colorsys
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from huabi.errors import HuabiError
from huabi.models.annotators import Annotator, read_annotator_weights
from huabi.models.convert import state_dict_mismatch

BODY_FILE = "body_pose_model.pth"
HAND_FILE = "hand_pose_model.pth"
FACE_FILE = "facenet.pth"

BODY_KEYPOINTS = 18
HAND_KEYPOINTS = 21
PAF_CHANNELS = 38
BODY_HEATMAPS = 19
HAND_HEATMAPS = 22
FACE_HEATMAPS = 71

# Limbs as (keypoint, keypoint), 0-based COCO order: nose, neck, r-shoulder, r-elbow, r-wrist,
# l-shoulder, l-elbow, l-wrist, r-hip, r-knee, r-ankle, l-hip, l-knee, l-ankle, r-eye, l-eye, r-ear, l-ear.
# The last two (shoulder-ear) are used for grouping only, never drawn.
LIMBS: tuple[tuple[int, int], ...] = (
    (1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12), (12, 13),
    (1, 0), (0, 14), (14, 16), (0, 15), (15, 17), (2, 16), (5, 17),
)
# For each limb, its (x, y) channels in the 38-channel affinity field output.
LIMB_PAF_CHANNELS: tuple[tuple[int, int], ...] = (
    (12, 13), (20, 21), (14, 15), (16, 17), (22, 23), (24, 25), (0, 1), (2, 3), (4, 5), (6, 7), (8, 9),
    (10, 11), (28, 29), (30, 31), (34, 35), (32, 33), (36, 37), (18, 19), (26, 27),
)
DRAWN_LIMBS = 17
# The standard OpenPose palette (RGB): joint i and limb i share colour i.
BODY_COLORS: tuple[tuple[int, int, int], ...] = (
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
)
# Hand skeleton: wrist (0) to each finger's four joints.
HAND_EDGES: tuple[tuple[int, int], ...] = tuple(
    (joint - 1 if joint % 4 != 1 else 0, joint) for joint in range(1, HAND_KEYPOINTS)
)

BOX_SIZE = 368  # the network's nominal input height
STRIDE = 8  # network output stride
PAD_VALUE = 128
BODY_SCALE = 0.5  # one scale: the body runs at 0.5 * 368 = 184 px image height
HAND_SCALES = (0.5, 1.0, 1.5, 2.0)  # hand crops run at 184, 368, 552 and 736 px squares
HAND_GRID = 128  # hand heatmaps are averaged on a 128 x 128 grid
FACE_INPUT = 384
PEAK_THRESHOLD = 0.1
PAF_THRESHOLD = 0.05
HAND_THRESHOLD = 0.05
FACE_THRESHOLD = 0.05
PAF_SAMPLES = 10
HEATMAP_SIGMA = 3.0
MIN_BOX = 20  # hand/face boxes smaller than this (pixels) are skipped
DRAW_EPS = 0.01  # a hand/face point at (or left of / above) this normalised coordinate was not found


# --------------------------------------------------------------------------- networks


def _conv(in_channels: int, out_channels: int, kernel: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel, stride=1, padding=kernel // 2)


class _NamedConvs(nn.Module):
    """Convolutions registered under the original file's layer names (so state-dict keys match it)."""

    def _add(self, name: str, in_channels: int, out_channels: int, kernel: int) -> None:
        self.add_module(name, _conv(in_channels, out_channels, kernel))

    def _run(self, names: Sequence[str], x: torch.Tensor, *, last_relu: bool) -> torch.Tensor:
        for index, name in enumerate(names):
            x = getattr(self, name)(x)
            if last_relu or index < len(names) - 1:
                x = torch.relu(x)
        return x


# VGG-19's first ten convolutions with a 2x2 max-pool after blocks 1-3 ("pool" entries).
_VGG_FRONT: tuple[tuple[str, int, int], ...] = (
    ("conv1_1", 3, 64), ("conv1_2", 64, 64), ("pool", 0, 0),
    ("conv2_1", 64, 128), ("conv2_2", 128, 128), ("pool", 0, 0),
    ("conv3_1", 128, 256), ("conv3_2", 256, 256), ("conv3_3", 256, 256), ("conv3_4", 256, 256), ("pool", 0, 0),
    ("conv4_1", 256, 512), ("conv4_2", 512, 512),
)


class _VggFrontMixin(_NamedConvs):
    front: tuple[tuple[str, int, int], ...]

    def _build_front(self) -> None:
        for name, c_in, c_out in self.front:
            if name != "pool":
                self._add(name, c_in, c_out, 3)

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        for name, _, _ in self.front:
            x = nn.functional.max_pool2d(x, 2, 2) if name == "pool" else torch.relu(getattr(self, name)(x))
        return x


class BodyPoseNet(_VggFrontMixin):
    """The body network: ``forward(x) -> (affinity fields [B, 38, h, w], heatmaps [B, 19, h, w])``, h = H / 8."""

    front = _VGG_FRONT + (("conv4_3_CPM", 512, 256), ("conv4_4_CPM", 256, 128))

    def __init__(self) -> None:
        super().__init__()
        self._build_front()
        self.branches = {1: PAF_CHANNELS, 2: BODY_HEATMAPS}
        for branch, out in self.branches.items():
            for index in (1, 2, 3):
                self._add(f"conv5_{index}_CPM_L{branch}", 128, 128, 3)
            self._add(f"conv5_4_CPM_L{branch}", 128, 512, 1)
            self._add(f"conv5_5_CPM_L{branch}", 512, out, 1)
        for stage in range(2, 7):
            for branch, out in self.branches.items():
                self._add(f"Mconv1_stage{stage}_L{branch}", 128 + PAF_CHANNELS + BODY_HEATMAPS, 128, 7)
                for index in (2, 3, 4, 5):
                    self._add(f"Mconv{index}_stage{stage}_L{branch}", 128, 128, 7)
                self._add(f"Mconv6_stage{stage}_L{branch}", 128, 128, 1)
                self._add(f"Mconv7_stage{stage}_L{branch}", 128, out, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self._features(x)
        names = {b: [f"conv5_{i}_CPM_L{b}" for i in range(1, 6)] for b in self.branches}
        paf = self._run(names[1], features, last_relu=False)
        heat = self._run(names[2], features, last_relu=False)
        for stage in range(2, 7):
            joined = torch.cat([paf, heat, features], dim=1)
            names = {b: [f"Mconv{i}_stage{stage}_L{b}" for i in range(1, 8)] for b in self.branches}
            paf = self._run(names[1], joined, last_relu=False)
            # The annotator the ControlNet models were trained with clamps the final heatmaps at 0
            # (a ReLU after the last stage's heatmap conv); the smoothing below sees the clamped map.
            heat = self._run(names[2], joined, last_relu=stage == 6)
        return paf, heat


class CascadeHeatmapNet(_VggFrontMixin):
    """The hand (22 maps) and face (71 maps) network: ``forward(x) -> last stage's heatmaps [B, C, H/8, W/8]``."""

    front = _VGG_FRONT + (("conv4_3", 512, 512), ("conv4_4", 512, 512), ("conv5_1", 512, 512),
                          ("conv5_2", 512, 512), ("conv5_3_CPM", 512, 128))

    def __init__(self, heatmaps: int) -> None:
        super().__init__()
        self.heatmaps = heatmaps
        self._build_front()
        self._add("conv6_1_CPM", 128, 512, 1)
        self._add("conv6_2_CPM", 512, heatmaps, 1)
        for stage in range(2, 7):
            self._add(f"Mconv1_stage{stage}", 128 + heatmaps, 128, 7)
            for index in (2, 3, 4, 5):
                self._add(f"Mconv{index}_stage{stage}", 128, 128, 7)
            self._add(f"Mconv6_stage{stage}", 128, 128, 1)
            self._add(f"Mconv7_stage{stage}", 128, heatmaps, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self._features(x)
        out = self._run(["conv6_1_CPM", "conv6_2_CPM"], features, last_relu=False)
        for stage in range(2, 7):
            out = self._run([f"Mconv{i}_stage{stage}" for i in range(1, 8)], torch.cat([out, features], dim=1),
                            last_relu=False)
        return out


def load_strict(net: nn.Module, path: Path, *, what: str) -> nn.Module:
    """Load ``path`` into ``net``: every key and shape must match, else one line naming the file (nothing loaded)."""
    tensors = read_annotator_weights(path)
    expected = net.state_dict()
    problem = state_dict_mismatch(expected, tensors, floating=True)
    if problem:
        raise HuabiError(f"{path}: not {what}: {problem}")
    # assign=True: a network built on the meta device takes the file's tensors as they are.
    net.load_state_dict({key: tensors[key].float() for key in expected}, strict=True, assign=True)
    return net.eval()


# --------------------------------------------------------------------------- image helpers


def _cv2():
    import cv2

    return cv2


def _resize(array: np.ndarray, height: float, width: float) -> np.ndarray:
    """Resize to ``int(height) x int(width)``: area filter when shrinking, Lanczos when enlarging.

    Maps with other than 1 or 3 channels are resized one channel at a time (as the
    reference annotator does, so results match it bit for bit).
    """
    cv2 = _cv2()
    in_h, in_w = array.shape[:2]
    channels = 1 if array.ndim == 2 else array.shape[2]
    if channels not in (1, 3):
        return np.stack([_resize(array[:, :, c], height, width) for c in range(channels)], axis=2)
    ratio = float(height + width) / float(in_h + in_w)
    interpolation = cv2.INTER_AREA if ratio < 1 else cv2.INTER_LANCZOS4
    return cv2.resize(array, (int(width), int(height)), interpolation=interpolation)


def _scale(array: np.ndarray, factor: float) -> np.ndarray:
    return _resize(array, array.shape[0] * factor, array.shape[1] * factor)


def _pad_to_stride(image: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Pad bottom/right with grey to a multiple of the stride; returns (padded, pad_bottom, pad_right)."""
    h, w = image.shape[:2]
    pad_bottom, pad_right = (-h) % STRIDE, (-w) % STRIDE
    padded = np.pad(image, ((0, pad_bottom), (0, pad_right), (0, 0)), constant_values=PAD_VALUE)
    return padded, pad_bottom, pad_right


def _net_input(bgr: np.ndarray, device: torch.device) -> torch.Tensor:
    x = np.ascontiguousarray(bgr.transpose(2, 0, 1)[None]).astype(np.float32) / 256 - 0.5
    return torch.from_numpy(x).to(device)


def _net_device(net: nn.Module) -> torch.device:
    return next(net.parameters()).device


def _maps_to_image(maps: torch.Tensor, padded_hw: tuple[int, int], pads: tuple[int, int],
                   out_hw: tuple[int, int]) -> np.ndarray:
    """Network maps [1, C, h, w] -> [out_h, out_w, C]: x8 upsample, padding removed, resized to the image."""
    array = maps[0].detach().float().cpu().numpy().transpose(1, 2, 0)
    array = _scale(array, STRIDE)
    array = array[: padded_hw[0] - pads[0], : padded_hw[1] - pads[1], :]
    return _resize(array, out_hw[0], out_hw[1])


def _gaussian(array: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(array, sigma=HEATMAP_SIGMA)


# --------------------------------------------------------------------------- body


@dataclass(frozen=True)
class Person:
    """One detected person: 18 body keypoints (x, y) or None, plus hands and face.

    :func:`detect_bodies` gives pixel coordinates; :func:`detect_people` normalised ones ([0, 1]).
    """

    body: tuple[tuple[float, float] | None, ...]
    score: float
    parts: int
    left_hand: np.ndarray | None = None  # [21, 2] float32, normalised, -1 = not found
    right_hand: np.ndarray | None = None
    face: np.ndarray | None = None  # [N, 2] float32, normalised, -1 = not found


def body_maps(net: BodyPoseNet, bgr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The heatmaps [H, W, 19] and affinity fields [H, W, 38] (float64) of a BGR uint8 image."""
    h, w = bgr.shape[:2]
    scale = BODY_SCALE * BOX_SIZE / h
    padded, pad_bottom, pad_right = _pad_to_stride(_resize(bgr, h * scale, w * scale))
    paf, heat = net(_net_input(padded, _net_device(net)))
    geometry = (padded.shape[:2], (pad_bottom, pad_right), (h, w))
    heatmaps = np.zeros((h, w, BODY_HEATMAPS)) + _maps_to_image(heat, *geometry)
    fields = np.zeros((h, w, PAF_CHANNELS)) + _maps_to_image(paf, *geometry)
    return heatmaps, fields


def find_peaks(heatmaps: np.ndarray) -> list[np.ndarray]:
    """Per keypoint, the smoothed heatmap's 4-neighbour local maxima above 0.1: rows (x, y, score, id)."""
    peaks, next_id = [], 0
    for part in range(BODY_KEYPOINTS):
        raw = heatmaps[:, :, part]
        smooth = _gaussian(raw)
        padded = np.pad(smooth, 1)  # zero border: an edge pixel only needs to beat its inner neighbours
        centre = padded[1:-1, 1:-1]
        is_peak = ((centre >= padded[:-2, 1:-1]) & (centre >= padded[2:, 1:-1]) & (centre >= padded[1:-1, :-2])
                   & (centre >= padded[1:-1, 2:]) & (smooth > PEAK_THRESHOLD))
        ys, xs = np.nonzero(is_peak)
        ids = np.arange(next_id, next_id + len(xs))
        peaks.append(np.stack([xs, ys, raw[ys, xs], ids], axis=1).astype(np.float64).reshape(-1, 4))
        next_id += len(xs)
    return peaks


def _limb_connections(fields: np.ndarray, starts: np.ndarray, ends: np.ndarray, image_height: int) -> np.ndarray:
    """Greedy one-to-one matching of a limb's start and end peaks by their affinity score.

    Rows: (start id, end id, score, start index, end index).
    """
    scored = []
    for i, a in enumerate(starts):
        for j, b in enumerate(ends):
            dx, dy = b[0] - a[0], b[1] - a[1]
            norm = max(0.001, math.sqrt(dx * dx + dy * dy))
            xs = np.round(np.linspace(a[0], b[0], num=PAF_SAMPLES)).astype(int)
            ys = np.round(np.linspace(a[1], b[1], num=PAF_SAMPLES)).astype(int)
            along = fields[ys, xs, 0] * (dx / norm) + fields[ys, xs, 1] * (dy / norm)
            # Long limbs relative to the image are penalised (distance prior).
            score = sum(along.tolist()) / PAF_SAMPLES + min(0.5 * image_height / norm - 1, 0)
            if np.count_nonzero(along > PAF_THRESHOLD) > 0.8 * PAF_SAMPLES and score > 0:
                scored.append((i, j, score))
    scored.sort(key=lambda item: item[2], reverse=True)
    chosen: list[tuple[float, float, float, int, int]] = []
    used_a, used_b = set(), set()
    for i, j, score in scored:
        if i in used_a or j in used_b:
            continue
        chosen.append((starts[i][3], ends[j][3], score, i, j))
        used_a.add(i)
        used_b.add(j)
        if len(chosen) >= min(len(starts), len(ends)):
            break
    return np.array(chosen, dtype=np.float64).reshape(-1, 5)


def group_people(peaks: list[np.ndarray], fields: np.ndarray, image_height: int) -> tuple[np.ndarray, np.ndarray]:
    """Assemble peaks into people along the limb tree.

    Returns ``(candidates [N, 4] (x, y, score, id), people [P, 20])``: a person's
    columns 0-17 index candidates (-1 = missing), 18 is its total score, 19 its part count.
    """
    candidates = np.concatenate(peaks, axis=0) if peaks else np.zeros((0, 4))
    people = np.zeros((0, BODY_KEYPOINTS + 2))
    for limb, ((part_a, part_b), (cx, cy)) in enumerate(zip(LIMBS, LIMB_PAF_CHANNELS)):
        starts, ends = peaks[part_a], peaks[part_b]
        if not len(starts) or not len(ends):
            continue
        connections = _limb_connections(fields[:, :, [cx, cy]], starts, ends, image_height)
        for id_a, id_b, score, _, _ in connections:
            owners = [row for row in range(len(people)) if people[row][part_a] == id_a or people[row][part_b] == id_b]
            if len(owners) == 1 or (len(owners) >= 2 and _overlap(people[owners[0]], people[owners[1]])):
                row = owners[0]
                if len(owners) >= 2 or people[row][part_b] != id_b:
                    people[row][part_b] = id_b
                    people[row][-1] += 1
                    people[row][-2] += candidates[int(id_b), 2] + score
            elif len(owners) >= 2:  # two partial people joined by this limb: merge them
                first, second = owners[0], owners[1]
                people[first][:-2] += people[second][:-2] + 1
                people[first][-2:] += people[second][-2:]
                people[first][-2] += score
                people = np.delete(people, second, axis=0)
            elif limb < DRAWN_LIMBS:  # the two shoulder-ear links never start a person
                row = -np.ones(BODY_KEYPOINTS + 2)
                row[part_a], row[part_b] = id_a, id_b
                row[-1] = 2
                row[-2] = candidates[int(id_a), 2] + candidates[int(id_b), 2] + score
                people = np.vstack([people, row])
    keep = [(person[-1] >= 4 and person[-2] / person[-1] >= 0.4) for person in people]
    return candidates, people[np.array(keep, dtype=bool)] if len(people) else people


def _overlap(first: np.ndarray, second: np.ndarray) -> bool:
    return bool(np.any((first[:-2] >= 0) & (second[:-2] >= 0)))


def detect_bodies(net: BodyPoseNet, bgr: np.ndarray) -> list[Person]:
    heatmaps, fields = body_maps(net, bgr)
    candidates, people = group_people(find_peaks(heatmaps), fields, bgr.shape[0])
    result = []
    for person in people:
        keypoints = tuple(None if index < 0 else (candidates[int(index)][0], candidates[int(index)][1])
                          for index in person[:BODY_KEYPOINTS])
        result.append(Person(body=keypoints, score=float(person[-2]), parts=int(person[-1])))
    return result


# --------------------------------------------------------------------------- hands and face


def hand_boxes(body: Sequence[tuple[float, float] | None], height: int, width: int) -> list[tuple[int, int, int, bool]]:
    """Square boxes (x, y, size, is_left) around each hand, extrapolated from shoulder, elbow and wrist.

    The box centre is a third of the forearm past the wrist; its side is 1.5 x the
    longer of the forearm and 0.9 x the upper arm (OpenPose's hand detector).
    """
    boxes = []
    for (shoulder, elbow, wrist), is_left in (((5, 6, 7), True), ((2, 3, 4), False)):
        points = [body[shoulder], body[elbow], body[wrist]]
        if any(point is None for point in points):
            continue
        (x1, y1), (x2, y2), (x3, y3) = points
        x = x3 + 0.33 * (x3 - x2)
        y = y3 + 0.33 * (y3 - y2)
        forearm = math.sqrt((x3 - x2) ** 2 + (y3 - y2) ** 2)
        upper_arm = math.sqrt((x2 - x1) ** 2 + (y2 - y1) ** 2)
        size = 1.5 * max(forearm, 0.9 * upper_arm)
        x, y = max(x - size / 2, 0), max(y - size / 2, 0)
        size = min(width - x if x + size > width else size, height - y if y + size > height else size)
        if size >= MIN_BOX:
            boxes.append((int(x), int(y), int(size), is_left))
    return boxes


def face_box(body: Sequence[tuple[float, float] | None], height: int, width: int) -> tuple[int, int, int] | None:
    """A square box (x, y, size) around the face from the nose, eyes and ears, or None."""
    nose = body[0]
    if nose is None or all(body[i] is None for i in (14, 15, 16, 17)):
        return None
    half = 0.0
    for index, factor in ((14, 3.0), (15, 3.0), (16, 1.5), (17, 1.5)):
        if body[index] is not None:
            half = max(half, factor * max(abs(nose[0] - body[index][0]), abs(nose[1] - body[index][1])))
    x, y = max(nose[0] - half, 0), max(nose[1] - half, 0)
    # Clipped against the image with the half size, as the annotator the models learned from does.
    size = min(width - x if x + half > width else 2 * half, height - y if y + half > height else 2 * half)
    return (int(x), int(y), int(size)) if size >= MIN_BOX else None


def hand_keypoints(net: CascadeHeatmapNet, crop_bgr: np.ndarray) -> np.ndarray:
    """21 hand keypoints (x, y) in crop pixels; (0, 0) = not found. Averaged over four input sizes."""
    from scipy.ndimage import label

    cv2 = _cv2()
    crop_h, crop_w = crop_bgr.shape[:2]
    blurred = cv2.GaussianBlur(crop_bgr, (0, 0), 0.8)
    average = np.zeros((HAND_GRID, HAND_GRID, HAND_HEATMAPS))
    for factor in HAND_SCALES:
        side = factor * BOX_SIZE
        padded, pad_bottom, pad_right = _pad_to_stride(_resize(blurred, side, side))
        maps = net(_net_input(padded, _net_device(net)))
        grid = _maps_to_image(maps, padded.shape[:2], (pad_bottom, pad_right), (HAND_GRID, HAND_GRID))
        average += grid / len(HAND_SCALES)
    points = np.zeros((HAND_KEYPOINTS, 2), dtype=np.int64)
    for part in range(HAND_KEYPOINTS):
        raw = average[:, :, part]
        above = _gaussian(raw) > HAND_THRESHOLD
        if not above.any():
            continue
        # Keep the blob (8-connected) with the most heatmap mass; the peak is its maximum.
        labels, count = label(above, structure=np.ones((3, 3), dtype=int))
        best = 1 + int(np.argmax([raw[labels == i].sum() for i in range(1, count + 1)]))
        y, x = np.unravel_index(int(np.argmax(np.where(labels == best, raw, 0.0))), raw.shape)
        points[part] = (int(float(x) * float(crop_w) / float(HAND_GRID)),
                        int(float(y) * float(crop_h) / float(HAND_GRID)))
    return points


def face_keypoints(net: CascadeHeatmapNet, crop_bgr: np.ndarray) -> np.ndarray:
    """Face keypoints (x, y) in crop pixels: each heatmap's maximum when above 0.05 (absent maps are skipped)."""
    crop_h, crop_w = crop_bgr.shape[:2]
    square = _resize(crop_bgr, FACE_INPUT, FACE_INPUT)
    x = torch.from_numpy(np.ascontiguousarray(square)).permute(2, 0, 1).to(_net_device(net)) / 256.0 - 0.5
    maps = net(x[None])
    maps = nn.functional.interpolate(maps.float(), (crop_h, crop_w), mode="bilinear", align_corners=True)
    maps = maps.detach().cpu().numpy()[0]
    points = []
    for heatmap in maps:
        if (heatmap > FACE_THRESHOLD).any():
            y, x_ = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
            points.append((x_, y))
    return np.array(points, dtype=np.int64).reshape(-1, 2)


def _normalise_points(points: np.ndarray, left: int, top: int, height: int, width: int) -> np.ndarray:
    """Crop pixels -> image-normalised float32 coordinates; a 0 coordinate (not found) becomes -1."""
    points = points.astype(np.float32)
    out = np.empty_like(points)
    out[:, 0] = np.where(points[:, 0] < 1e-6, -1, points[:, 0] + left) / float(width)
    out[:, 1] = np.where(points[:, 1] < 1e-6, -1, points[:, 1] + top) / float(height)
    return out


# --------------------------------------------------------------------------- drawing


def draw_people(people: Sequence[Person], height: int, width: int, *, body: bool = True, hands: bool = True,
                face: bool = True) -> np.ndarray:
    """The pose map (uint8 RGB [H, W, 3] on black): per person its body, left hand, right hand, face."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for person in people:
        if body:
            _draw_body(canvas, person.body, height, width)
        if hands:
            for hand in (person.left_hand, person.right_hand):
                if hand is not None and len(hand):
                    _draw_hand(canvas, hand, height, width)
        if face and person.face is not None and len(person.face):
            _draw_face(canvas, person.face, height, width)
    return canvas


def _draw_body(canvas: np.ndarray, keypoints: Sequence[tuple[float, float] | None], height: int, width: int) -> None:
    """Limbs as ellipses (half-width 4 px, 60% colour), then joints as radius-4 dots. Coordinates normalised."""
    cv2 = _cv2()
    for (a, b), color in zip(LIMBS[:DRAWN_LIMBS], BODY_COLORS):
        if keypoints[a] is None or keypoints[b] is None:
            continue
        xs = np.array([keypoints[a][0], keypoints[b][0]]) * float(width)
        ys = np.array([keypoints[a][1], keypoints[b][1]]) * float(height)
        length = ((ys[0] - ys[1]) ** 2 + (xs[0] - xs[1]) ** 2) ** 0.5
        angle = math.degrees(math.atan2(ys[0] - ys[1], xs[0] - xs[1]))
        polygon = cv2.ellipse2Poly((int(np.mean(xs)), int(np.mean(ys))), (int(length / 2), 4), int(angle), 0, 360, 1)
        cv2.fillConvexPoly(canvas, polygon, [int(float(c) * 0.6) for c in color])
    for point, color in zip(keypoints, BODY_COLORS):
        if point is not None:
            cv2.circle(canvas, (int(point[0] * width), int(point[1] * height)), 4, color, thickness=-1)


def _draw_hand(canvas: np.ndarray, points: np.ndarray, height: int, width: int) -> None:
    """Bones in rainbow hues (2 px), joints as blue radius-4 dots; points at <= 0.01 were not found."""
    cv2 = _cv2()
    pixels = [(int(x * width), int(y * height)) for x, y in points]
    for index, (a, b) in enumerate(HAND_EDGES):
        (x1, y1), (x2, y2) = pixels[a], pixels[b]
        if x1 > DRAW_EPS and y1 > DRAW_EPS and x2 > DRAW_EPS and y2 > DRAW_EPS:
            color = [channel * 255 for channel in colorsys.hsv_to_rgb(index / float(len(HAND_EDGES)), 1.0, 1.0)]
            cv2.line(canvas, (x1, y1), (x2, y2), color, thickness=2)
    for x, y in pixels:
        if x > DRAW_EPS and y > DRAW_EPS:
            cv2.circle(canvas, (x, y), 4, (0, 0, 255), thickness=-1)


def _draw_face(canvas: np.ndarray, points: np.ndarray, height: int, width: int) -> None:
    cv2 = _cv2()
    for x, y in points:
        x, y = int(x * width), int(y * height)
        if x > DRAW_EPS and y > DRAW_EPS:
            cv2.circle(canvas, (x, y), 3, (255, 255, 255), thickness=-1)


# --------------------------------------------------------------------------- annotators


@dataclass(frozen=True)
class OpenPoseNets:
    body: BodyPoseNet
    hand: CascadeHeatmapNet | None = None
    face: CascadeHeatmapNet | None = None


def detect_people(nets: OpenPoseNets, rgb: np.ndarray, *, hands: bool, face: bool) -> list[Person]:
    """Everyone in an RGB uint8 image, keypoints normalised to [0, 1] (hands/face when asked and nets given)."""
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])  # the networks were trained on BGR
    height, width = bgr.shape[:2]
    people = []
    for person in detect_bodies(nets.body, bgr):
        left = right = face_points = None
        if hands and nets.hand is not None:
            for x, y, size, is_left in hand_boxes(person.body, height, width):
                points = _normalise_points(hand_keypoints(nets.hand, bgr[y:y + size, x:x + size]), x, y, height, width)
                left, right = (points, right) if is_left else (left, points)
        if face and nets.face is not None:
            box = face_box(person.body, height, width)
            if box is not None:
                x, y, size = box
                crop = bgr[y:y + size, x:x + size]
                face_points = _normalise_points(face_keypoints(nets.face, crop), x, y, height, width)
        body = tuple(None if p is None else (p[0] / float(width), p[1] / float(height)) for p in person.body)
        people.append(Person(body=body, score=person.score, parts=person.parts, left_hand=left, right_hand=right,
                             face=face_points))
    return people


def pad_to_64(image: np.ndarray) -> np.ndarray:
    """Edge-pad bottom/right to multiples of 64 (the extension runs the detector on this padded image)."""
    h, w = image.shape[:2]
    return np.pad(image, ((0, (-h) % 64), (0, (-w) % 64), (0, 0)), mode="edge")


def pose_map(nets: OpenPoseNets, image: np.ndarray, *, body: bool = True, hands: bool = False,
             face: bool = False) -> np.ndarray:
    """uint8 RGB pose map of an RGB uint8 image (same size as the image)."""
    h, w = image.shape[:2]
    padded = pad_to_64(image)
    people = detect_people(nets, padded, hands=hands, face=face)
    return draw_people(people, padded.shape[0], padded.shape[1], body=body, hands=hands, face=face)[:h, :w]


def _loader(body: bool, hand: bool, face: bool):
    def load(paths: dict[str, Path], device: torch.device) -> OpenPoseNets:
        with torch.device("meta"):  # no time spent initialising weights the files replace
            body_net, hand_net, face_net = BodyPoseNet(), CascadeHeatmapNet(HAND_HEATMAPS), CascadeHeatmapNet(FACE_HEATMAPS)
        nets = OpenPoseNets(
            body=load_strict(body_net, paths[BODY_FILE], what="an OpenPose body model"),
            hand=load_strict(hand_net, paths[HAND_FILE], what="an OpenPose hand model") if hand else None,
            face=load_strict(face_net, paths[FACE_FILE], what="an OpenPose face model") if face else None,
        )
        for net in (nets.body, nets.hand, nets.face):
            if net is not None:
                net.to(device)
        return nets

    return load


def _detector(draw_body: bool, hands: bool, face: bool):
    def detect(nets: OpenPoseNets, image: np.ndarray, a: float | None, b: float | None) -> np.ndarray:
        return pose_map(nets, image, body=draw_body, hands=hands, face=face).astype(np.float32) / 255.0

    return detect


def _annotator(module: str, *, draw_body: bool, hands: bool, face: bool) -> Annotator:
    files = (BODY_FILE,) + ((HAND_FILE,) if hands else ()) + ((FACE_FILE,) if face else ())
    return Annotator(module, files, _loader(True, hands, face), _detector(draw_body, hands, face))


ANNOTATORS = (
    _annotator("openpose", draw_body=True, hands=False, face=False),
    _annotator("openpose_hand", draw_body=True, hands=True, face=False),
    _annotator("openpose_face", draw_body=True, hands=False, face=True),
    _annotator("openpose_faceonly", draw_body=False, hands=False, face=True),
    _annotator("openpose_full", draw_body=True, hands=True, face=True),
)


# --------------------------------------------------------------------------- pose JSON (A1111's pose editor)

POSE_JSON_MAX_SIDE = 16384
_JSON_PARTS = (("pose_keypoints_2d", "body", BODY_KEYPOINTS), ("hand_left_keypoints_2d", "left hand", HAND_KEYPOINTS),
               ("hand_right_keypoints_2d", "right hand", HAND_KEYPOINTS), ("face_keypoints_2d", "face", None))


def pose_map_from_json(data: object) -> np.ndarray:
    """Draw an OpenPose-format JSON (what sd-webui-controlnet and its pose editor exchange) as a pose map.

    ``{"canvas_width": W, "canvas_height": H, "people": [{"pose_keypoints_2d": [x, y, c, ...], ...}]}``
    with ``hand_left_keypoints_2d``, ``hand_right_keypoints_2d`` and ``face_keypoints_2d`` optional.
    A point with confidence ``c`` 0 is absent.  Coordinates are pixels of the canvas, or
    normalised to [0, 1] when every present coordinate is (the extension writes those).
    Returns the uint8 RGB map [H, W, 3], drawn exactly like a detected pose.
    """
    if not isinstance(data, dict):
        raise HuabiError("pose JSON: expected an object with canvas_width, canvas_height and people")
    size = []
    for key in ("canvas_height", "canvas_width"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value) \
                or not 1 <= value <= POSE_JSON_MAX_SIDE:
            raise HuabiError(f"pose JSON: {key} must be a whole number of pixels from 1 to {POSE_JSON_MAX_SIDE}, "
                             f"got {value!r}")
        size.append(int(value))
    height, width = size
    people_json = data.get("people", [])
    if not isinstance(people_json, list) or not all(isinstance(p, dict) for p in people_json):
        raise HuabiError("pose JSON: people must be a list of objects")
    parsed = []
    for index, person in enumerate(people_json):
        parts = {}
        for key, what, count in _JSON_PARTS:
            parts[what] = _json_points(person.get(key), f"pose JSON: person {index} {key}", count)
        parsed.append(parts)
    coordinates = [c for parts in parsed for points in parts.values() if points for p in points if p for c in p]
    normalised = all(0.0 <= c <= 1.0 for c in coordinates)
    scale_x, scale_y = (1.0, 1.0) if normalised else (float(width), float(height))

    def scaled(points):
        return None if points is None else [None if p is None else (p[0] / scale_x, p[1] / scale_y) for p in points]

    def as_array(points):
        if not points:
            return None
        return np.array([(-1.0, -1.0) if p is None else p for p in scaled(points)], dtype=np.float32)

    people = []
    for parts in parsed:
        body = scaled(parts["body"]) or [None] * BODY_KEYPOINTS
        people.append(Person(body=tuple(body), score=0.0, parts=sum(p is not None for p in body),
                             left_hand=as_array(parts["left hand"]), right_hand=as_array(parts["right hand"]),
                             face=as_array(parts["face"])))
    return draw_people(people, height, width)


def _json_points(values: object, what: str, count: int | None) -> list[tuple[float, float] | None] | None:
    if values is None or values == []:
        return None
    if not isinstance(values, list) or len(values) % 3 or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values):
        raise HuabiError(f"{what}: must be a flat list of finite numbers x, y, confidence (a multiple of 3)")
    if count is not None and len(values) != 3 * count:
        raise HuabiError(f"{what}: expected {count} points ({3 * count} numbers), got {len(values)} numbers")
    return [None if c <= 0 else (float(x), float(y)) for x, y, c in zip(values[0::3], values[1::3], values[2::3])]
