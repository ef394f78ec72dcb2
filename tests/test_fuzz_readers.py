"""Bounded-time fuzzing of every reader of user files (issue 14).

Random and mutated safetensors, GGUF, PNG and pickle checkpoints are thrown at
each reader. Each call must either succeed or raise ``HuabiError`` with a
one-line message: any other exception is a traceback the user would see. Some
seeds are pickles whose ``__reduce__`` would create a marker file: it must
never appear.

The time per format is ``HUABI_FUZZ_SECONDS`` (default 3 s); the random
sequence is seeded (``HUABI_FUZZ_SEED``, default 14), so a failure names the
seed, the iteration and a saved copy of the input that caused it.
"""

from __future__ import annotations

import io
import os
import pickle
import random
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin

from huabi.errors import HuabiError

SECONDS = float(os.environ.get("HUABI_FUZZ_SECONDS", "3"))
SEED = int(os.environ.get("HUABI_FUZZ_SEED", "14"))
pytestmark = pytest.mark.slow  # SECONDS per format for every reader (about a minute by default); CI runs it


class _RunsCode:
    """Pickles as a call to os.system: loading it with pickle.load would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# --------------------------------------------------------------------------- seed files


def safetensors_seeds(folder: Path) -> list[bytes]:
    from safetensors.torch import save_file

    path = folder / "seed.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.randn(4, 4, 3, 3),
               "first_stage_model.decoder.conv_in.bias": torch.randn(4).half(),
               "step": torch.tensor([3], dtype=torch.int64)}, str(path), metadata={"ss_network_dim": "4"})
    lora = folder / "lora.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.randn(2, 8),
               "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.randn(8, 2),
               "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(1.0)}, str(lora))
    return [path.read_bytes(), lora.read_bytes()]


def gguf_seeds(folder: Path) -> list[bytes]:
    import gguf

    path = folder / "seed.gguf"
    writer = gguf.GGUFWriter(str(path), "sd1")
    writer.add_string("general.name", "fuzz")
    writer.add_tensor("input_blocks.0.0.weight", np.random.default_rng(0).standard_normal((8, 32)).astype(np.float32))
    writer.add_tensor("input_blocks.0.0.bias", np.zeros(32, dtype=np.float16))
    quantized = gguf.quants.quantize(np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32),
                                     gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("out.2.weight", quantized, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return [path.read_bytes()]


def png_seeds(folder: Path) -> list[bytes]:
    seeds = []
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (16, 24, 3), dtype=np.uint8))
    for text, kind in (("a cat\nSteps: 2, Sampler: Euler, Seed: 1, Size: 24x16", "tEXt"),
                       ("一只猫\nSteps: 2, Seed: 1", "iTXt"), ("a dog " * 50 + "\nSteps: 3", "zTXt")):
        info = PngImagePlugin.PngInfo()
        if kind == "zTXt":
            info.add_text("parameters", text, zip=True)
        else:
            info.add_text("parameters", text)
        buffer = io.BytesIO()
        image.save(buffer, "PNG", pnginfo=info)
        seeds.append(buffer.getvalue())
    buffer = io.BytesIO()
    image.convert("P").save(buffer, "PNG")
    seeds.append(buffer.getvalue())
    return seeds


def checkpoint_seeds(folder: Path, marker: Path) -> list[bytes]:
    seeds = []
    state = {"state_dict": {"model.diffusion_model.out.2.weight": torch.randn(4, 4), "global_step": 7}}
    for zipped in (True, False):
        buffer = io.BytesIO()
        torch.save(state, buffer, _use_new_zipfile_serialization=zipped)
        seeds.append(buffer.getvalue())
    for payload in ({"state_dict": {"w": _RunsCode(marker)}}, [_RunsCode(marker)]):
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        seeds.append(buffer.getvalue())
        seeds.append(pickle.dumps(payload, protocol=2))  # a bare pickle, not torch's format
    return seeds


# --------------------------------------------------------------------------- mutations


def mutate(data: bytes, rng: random.Random) -> bytes:
    """One to four random edits: byte flips, big-number splices, cuts, duplications, garbage."""
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.random()
        position = rng.randrange(len(buffer) + 1)
        if choice < 0.3 and buffer:
            index = rng.randrange(len(buffer))
            buffer[index] ^= 1 << rng.randrange(8)
        elif choice < 0.5 and len(buffer) >= 8:  # a length/offset/count field made huge or negative
            index = rng.randrange(len(buffer) - 7)
            value = rng.choice([0, 1, 2**31 - 1, 2**32 - 1, 2**63 - 1, rng.getrandbits(64)])
            width = rng.choice([4, 8])
            buffer[index:index + width] = value.to_bytes(8, "little")[:width]
        elif choice < 0.65:
            del buffer[position:]  # truncation
        elif choice < 0.8:
            buffer[position:position] = bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 64)))
        elif choice < 0.9 and buffer:
            start = rng.randrange(len(buffer))
            buffer[position:position] = buffer[start:start + rng.randint(1, 256)]
        else:
            end = min(len(buffer), position + rng.randint(1, 256))
            del buffer[position:end]
    return bytes(buffer)


def random_file(rng: random.Random, magic: bytes) -> bytes:
    body = bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 300)))
    return (magic if rng.random() < 0.7 else b"") + body


# --------------------------------------------------------------------------- readers


def safetensors_readers() -> dict[str, Callable[[Path], object]]:
    from huabi.models.inspect import detect_file
    from huabi.models.formats import read_safetensors_header, read_state_dict, read_state_dict_shapes, read_tensor_file
    from huabi.models.inspect import inspect_file
    from huabi.models.lora import read_lora_file

    return {
        "read_safetensors_header": read_safetensors_header,
        "read_state_dict": read_state_dict,
        "read_state_dict_shapes": read_state_dict_shapes,
        "detect_file": detect_file,
        "inspect_file": lambda path: inspect_file(path, with_hashes=True),
        "read_tensor_file": lambda path: read_tensor_file(path, "LoRA"),
        "read_lora_file": read_lora_file,
    }


def gguf_readers() -> dict[str, Callable[[Path], object]]:
    from huabi.models.formats import read_state_dict
    from huabi.models.gguf_io import read_gguf_metadata, read_gguf_packed
    from huabi.models.inspect import describe_gguf, inspect_file

    return {
        "read_state_dict": read_state_dict,
        "read_gguf_metadata": read_gguf_metadata,
        "read_gguf_packed": read_gguf_packed,
        "inspect_file": lambda path: inspect_file(path, with_hashes=False),
        "describe_gguf": describe_gguf,
    }


def png_readers() -> dict[str, Callable[[Path], object]]:
    from huabi.service.images import load_image, load_mask
    from huabi.service.pngio import read_infotext
    from huabi.service.upscale import open_image

    return {
        "read_infotext": read_infotext,
        "load_image": load_image,
        "load_mask": lambda path: load_mask(path, 16, 16),
        "upscale.open_image": open_image,
    }


def checkpoint_readers() -> dict[str, Callable[[Path], object]]:
    from huabi.models.formats import load_pickle_safely, read_state_dict
    from huabi.models.inspect import inspect_file

    return {
        "read_state_dict": read_state_dict,
        "load_pickle_safely": lambda path: load_pickle_safely(path, "embedding"),
        "inspect_file": lambda path: inspect_file(path, with_hashes=False),
    }


FORMATS = {
    "safetensors": (".safetensors", b"\x40\x00\x00\x00\x00\x00\x00\x00{", safetensors_readers),
    "gguf": (".gguf", b"GGUF\x03\x00\x00\x00", gguf_readers),
    "png": (".png", b"\x89PNG\r\n\x1a\n", png_readers),
    "ckpt": (".ckpt", b"PK\x03\x04", checkpoint_readers),
}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_readers_survive_random_and_mutated_files(kind, tmp_path):
    suffix, magic, make_readers = FORMATS[kind]
    marker = tmp_path / "CODE-RAN"
    seeds = {
        "safetensors": lambda: safetensors_seeds(tmp_path),
        "gguf": lambda: gguf_seeds(tmp_path),
        "png": lambda: png_seeds(tmp_path),
        "ckpt": lambda: checkpoint_seeds(tmp_path, marker),
    }[kind]()
    readers = make_readers()
    rng = random.Random(f"{SEED}-{kind}")
    sample = tmp_path / f"sample{suffix}"
    deadline = time.monotonic() + SECONDS
    iterations = 0
    outcomes = {"ok": 0, "error": 0}
    while iterations < 20 or time.monotonic() < deadline:
        if iterations < len(seeds):
            data = seeds[iterations]  # every seed unmutated first: they must read (or refuse) cleanly
        elif rng.random() < 0.1:
            data = random_file(rng, magic)
        else:
            data = mutate(rng.choice(seeds), rng)
        sample.write_bytes(data)
        for name, read in readers.items():
            try:
                read(sample)
                outcomes["ok"] += 1
            except HuabiError as error:
                outcomes["error"] += 1
                message = str(error)
                if "\n" in message or not message.strip():
                    pytest.fail(f"{kind} {name}: multi-line or empty error at iteration {iterations} "
                                f"(seed {SEED}): {message!r}")
            except Exception as error:  # noqa: BLE001  (any other exception is a traceback for the user)
                keep = tmp_path.parent / f"fuzz-failure-{kind}-{iterations}{suffix}"
                keep.write_bytes(data)
                pytest.fail(f"{kind} {name}: {type(error).__name__}: {str(error)[:300]} at iteration "
                            f"{iterations} (seed {SEED}); input saved as {keep}")
        iterations += 1
    assert not marker.exists(), "a pickle ran code"
    assert outcomes["error"] > 0  # the mutations did reach the error paths
    print(f"{kind}: {iterations} files, {outcomes}")
