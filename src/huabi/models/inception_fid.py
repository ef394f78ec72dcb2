"""The Inception-v3 that FID, KID and the Inception Score are defined with (TensorFlow's 2015-12-05 graph).

pytorch-fid, torch-fidelity and clean-fid all use the same converted weights
(``pt_inception-2015-12-05-6726825d.pth``, 1008 classes) in a torchvision-shaped
Inception-v3 with the TensorFlow graph's differences: average pools that do not count
padding, a max pool in the last block's pool branch, batch-norm eps 1e-3, bias-free
convolutions. This module builds that network with the file's tensor names so the file
loads as is; it is only ever read from a local path, never downloaded.

Input: float pixels in [0, 255], already resized to 299x299 (``huabi.eval.preprocess``
does the resizing the way each reference does). ``forward`` returns the 2048-d pool
features and the 1008 logits without the fc bias (torch-fidelity's ``logits_unbiased``,
the Inception Score's input).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from huabi.errors import HuabiError

INPUT_PX = 299
POOL_DIM = 2048
NUM_CLASSES = 1008


class ConvBN(nn.Module):
    """conv (no bias) -> batch norm (eps 1e-3) -> ReLU; tensor names ``conv.*`` and ``bn.*``."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_no_pad(x: torch.Tensor) -> torch.Tensor:
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


def _max_pool_same(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=1, padding=1)


def _max_pool_reduce(x: torch.Tensor) -> torch.Tensor:
    return F.max_pool2d(x, 3, stride=2)


class Mixed(nn.Module):
    """An Inception block: named branches of ConvBN chains, a pool branch, concatenated.

    ``chains`` maps each branch's layer names to (in, out, kernel, stride, padding) in order;
    a layer whose name ends in ``a``/``b`` after a shared stem is a *split*: both halves read
    the stem's output and are concatenated (the 1x3 / 3x1 pairs of the last two blocks).
    ``pool`` is applied to the block input, then ``pool_conv`` (if any) follows it.
    """

    def __init__(self, chains: list[list[tuple]], pool, pool_conv: tuple | None) -> None:
        super().__init__()
        self.chains = chains
        self.pool = pool
        for chain in chains:
            for name, *spec in chain:
                self.add_module(name, ConvBN(*spec))
        self.has_pool_conv = pool_conv is not None
        if pool_conv is not None:
            self.add_module("branch_pool", ConvBN(*pool_conv))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outputs = []
        for chain in self.chains:
            y = x
            names = [name for name, *_ in chain]
            splits = [n for n in names if n.endswith(("_2a", "_2b", "_3a", "_3b"))]
            for name in names:
                if name in splits:
                    continue
                y = getattr(self, name)(y)
            if splits:
                y = torch.cat([getattr(self, name)(y) for name in splits], 1)
            outputs.append(y)
        pooled = self.pool(x)
        outputs.append(self.branch_pool(pooled) if self.has_pool_conv else pooled)
        return torch.cat(outputs, 1)


def _block_a(cin: int, pool_features: int) -> Mixed:
    return Mixed(
        [
            [("branch1x1", cin, 64, 1)],
            [("branch5x5_1", cin, 48, 1), ("branch5x5_2", 48, 64, 5, 1, 2)],
            [("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1), ("branch3x3dbl_3", 96, 96, 3, 1, 1)],
        ],
        _avg_pool_no_pad, (cin, pool_features, 1),
    )


def _block_b(cin: int) -> Mixed:
    return Mixed(
        [
            [("branch3x3", cin, 384, 3, 2)],
            [("branch3x3dbl_1", cin, 64, 1), ("branch3x3dbl_2", 64, 96, 3, 1, 1), ("branch3x3dbl_3", 96, 96, 3, 2)],
        ],
        _max_pool_reduce, None,
    )


def _block_c(cin: int, c7: int) -> Mixed:
    return Mixed(
        [
            [("branch1x1", cin, 192, 1)],
            [("branch7x7_1", cin, c7, 1), ("branch7x7_2", c7, c7, (1, 7), 1, (0, 3)), ("branch7x7_3", c7, 192, (7, 1), 1, (3, 0))],
            [("branch7x7dbl_1", cin, c7, 1), ("branch7x7dbl_2", c7, c7, (7, 1), 1, (3, 0)), ("branch7x7dbl_3", c7, c7, (1, 7), 1, (0, 3)),
             ("branch7x7dbl_4", c7, c7, (7, 1), 1, (3, 0)), ("branch7x7dbl_5", c7, 192, (1, 7), 1, (0, 3))],
        ],
        _avg_pool_no_pad, (cin, 192, 1),
    )


def _block_d(cin: int) -> Mixed:
    return Mixed(
        [
            [("branch3x3_1", cin, 192, 1), ("branch3x3_2", 192, 320, 3, 2)],
            [("branch7x7x3_1", cin, 192, 1), ("branch7x7x3_2", 192, 192, (1, 7), 1, (0, 3)),
             ("branch7x7x3_3", 192, 192, (7, 1), 1, (3, 0)), ("branch7x7x3_4", 192, 192, 3, 2)],
        ],
        _max_pool_reduce, None,
    )


def _block_e(cin: int, pool) -> Mixed:
    return Mixed(
        [
            [("branch1x1", cin, 320, 1)],
            [("branch3x3_1", cin, 384, 1), ("branch3x3_2a", 384, 384, (1, 3), 1, (0, 1)), ("branch3x3_2b", 384, 384, (3, 1), 1, (1, 0))],
            [("branch3x3dbl_1", cin, 448, 1), ("branch3x3dbl_2", 448, 384, 3, 1, 1),
             ("branch3x3dbl_3a", 384, 384, (1, 3), 1, (0, 1)), ("branch3x3dbl_3b", 384, 384, (3, 1), 1, (1, 0))],
        ],
        pool, (cin, 192, 1),
    )


class FIDInceptionV3(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = _block_a(192, 32)
        self.Mixed_5c = _block_a(256, 64)
        self.Mixed_5d = _block_a(288, 64)
        self.Mixed_6a = _block_b(288)
        self.Mixed_6b = _block_c(768, 128)
        self.Mixed_6c = _block_c(768, 160)
        self.Mixed_6d = _block_c(768, 160)
        self.Mixed_6e = _block_c(768, 192)
        self.Mixed_7a = _block_d(768)
        self.Mixed_7b = _block_e(1280, _avg_pool_no_pad)
        self.Mixed_7c = _block_e(2048, _max_pool_same)  # the TF graph max-pools here
        self.fc = nn.Linear(POOL_DIM, NUM_CLASSES)

    def forward(self, pixels_255: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, 3, 299, 299] in [0, 255] -> (pool [N, 2048], logits without bias [N, 1008])."""
        x = (pixels_255 - 128) / 128  # the TF graph's own input transform
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)
        pool = x.mean(dim=(2, 3))
        return pool, pool @ self.fc.weight.T


def looks_like_fid_inception(state_dict) -> bool:
    return "Mixed_7c.branch_pool.conv.weight" in state_dict and "Conv2d_1a_3x3.conv.weight" in state_dict


def load_fid_inception(path: str | Path, state_dict=None) -> FIDInceptionV3:
    """The FID Inception from a local ``.pth``/``.safetensors`` file, every tensor checked."""
    from huabi.models.formats import read_state_dict

    path = Path(path)
    if state_dict is None:
        state_dict, _ = read_state_dict(path)
    if not looks_like_fid_inception(state_dict):
        raise HuabiError(f"{path.name}: not an FID Inception-v3 weights file (found {len(state_dict)} tensors, e.g. {', '.join(list(state_dict)[:2])})")
    model = FIDInceptionV3()
    expected = model.state_dict()
    weights = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in expected if k not in weights and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in weights if k not in expected]
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in weights.items()
             if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or wrong:
        what = (f"missing {missing[:2]}" if missing else f"unexpected {unexpected[:2]}" if unexpected else f"shape {wrong[0]}")
        raise HuabiError(f"{path.name}: FID Inception-v3 weights do not match the architecture ({what})")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    return model.eval().requires_grad_(False)
