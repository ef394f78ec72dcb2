"""What the image-making commands share: their common flags, the progress bar, flags -> request fields.

No business logic here (that is :mod:`huabi.service.requests`); nothing heavy is imported at parse time.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from huabi.errors import HuabiError  # noqa: F401 -- raised by the parsers these helpers call


def add_sampling_options(parser: argparse.ArgumentParser, *, size_help: str,
                         seed_help: str = "-1 for random (the chosen seed is recorded)") -> None:
    """The sampling flags every image-making command shares (generate, edit, xyz)."""
    from huabi.core.names import SAMPLER_NAMES, SCHEDULE_NAMES

    parser.add_argument("--steps", type=int, metavar="N", help="sampling steps, 1..1000 (default 20)")
    parser.add_argument("--cfg", dest="cfg_scale", type=float, metavar="SCALE",
                        help="CFG scale: how closely to follow the prompt, 0..100 (default 7)")
    parser.add_argument("--sampler", metavar="NAME",
                        help=f"sampler as A1111 spells it (default DPM++ 2M): {', '.join(SAMPLER_NAMES)}")
    parser.add_argument("--schedule", metavar="TYPE",
                        help=f"schedule type (default Automatic: the sampler's own): {', '.join(SCHEDULE_NAMES)}")
    parser.add_argument("--seed", type=int, help=seed_help)
    parser.add_argument("--size", help=size_help)


def add_refiner_options(parser: argparse.ArgumentParser) -> None:
    """The SDXL refiner flags (generate, edit)."""
    parser.add_argument("--refiner", metavar="MODEL",
                        help="SDXL refiner (path, or name/hash in the models folder) that takes over from the base")
    parser.add_argument("--refiner-switch-at", type=float, metavar="F",
                        help="fraction of the steps after which the refiner takes over, above 0 to 1 (default 0.8)")


def add_attention_adapter_options(parser: argparse.ArgumentParser) -> None:
    """Hypernetwork and IP-Adapter flags (generate, edit)."""
    parser.add_argument("--hypernet", dest="hypernetwork", metavar="NAME|PATH",
                        help="A1111 hypernetwork (.pt) from the models folder's hypernetworks/ "
                             "(or use <hypernet:NAME:STRENGTH> in the prompt)")
    parser.add_argument("--hypernet-strength", dest="hypernetwork_strength", type=float, metavar="S",
                        help="hypernetwork strength (default 1)")
    parser.add_argument("--ip-adapter", metavar="NAME|PATH",
                        help="IP-Adapter model (image prompt) from the models folder's ipadapter/ or ControlNet/")
    parser.add_argument("--ip-image", metavar="IMAGE", help="the image prompt for --ip-adapter")
    parser.add_argument("--ip-weight", type=float, metavar="W", help="IP-Adapter weight, 0..3 (default 1)")
    parser.add_argument("--ip-image-encoder", metavar="NAME|PATH",
                        help="CLIP image encoder (default: the first in clip_vision/ that fits the adapter)")


IMAGE_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


def output_folder(text: str) -> Path:
    """``--out`` of the image commands: a folder. An image file name is refused, since the images go
    inside it as NNNNN-SEED.png (``--out apple.png`` used to make a folder called apple.png)."""
    path = Path(text)
    if path.suffix.lower() in IMAGE_FILE_SUFFIXES and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file name; --out takes a folder, and the images are saved in it as NNNNN-SEED.png")
    return path


def add_output_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=output_folder, default=Path("outputs"), help="output folder (default: ./outputs)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", help="checkpoint path, or a name/hash in the models folder (default: built-in)")
    parser.add_argument("--vae", help="a separate VAE file that replaces the checkpoint's")
    parser.add_argument("--base", type=Path, metavar="CHECKPOINT",
                        help="for a GGUF UNet --model: the checkpoint (path, name or hash) that supplies "
                             "text encoders and VAE")
    parser.add_argument("--gguf-on-the-fly", action="store_true",
                        help="keep a GGUF UNet's quantized weights packed and dequantize each at use "
                             "(less memory, a little slower; not with LoRAs)")
    parser.add_argument("--models-dir", type=Path, help="models folder (default: $HUABI_MODELS_DIR or ~/huabi/models)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, fp32, fp16 (CUDA), bf16")
    parser.add_argument("--backend", default="auto",
                        help="auto (default: OpenVINO for full-size models on a CPU where it measured faster, "
                             "else torch), torch, openvino, openvino-int8 (CPU; int8 needs pip install 'huabi[openvino]')")
    parser.add_argument("--vae-decoder", default="full", metavar="full|taesd:PATH",
                        help="final decode: the model's VAE (default) or a TAESD/TAESDXL file (fast, less detail)")
    parser.add_argument("--vae-tiling", action="store_true",
                        help="decode/encode images larger than 512 px in overlapping tiles (less memory)")


def parse_size(text: str) -> tuple[int, int]:
    from huabi.service.requests import parse_size as parse

    return parse(text)


def request_values(args: argparse.Namespace) -> dict:
    """The GenerationRequest fields given as flags (argparse dests are the field names; None: not given)."""
    from huabi.service.requests import REQUEST_FIELDS, with_sizes

    values = {name: getattr(args, name, None) for name in REQUEST_FIELDS if name != "prompt"}
    return with_sizes(values, size=getattr(args, "size", None), hires_resize=getattr(args, "hires_resize", None),
                      seed_resize_from=getattr(args, "seed_resize_from", None))


def use_recorded_precision(args: argparse.Namespace, infotext: str, image) -> None:
    """With ``--from``, ``--dtype auto`` and ``--backend auto`` mean "as the image was made": its
    recorded Dtype/Backend (none recorded: fp32 and torch on a CPU), so the same seed gives the same
    picture on this machine, not the one this machine's fastest path would draw. Explicit values win."""
    from huabi.core.infotext import parse_infotext
    from huabi.service.cpu_backend import recorded_precision
    from huabi.service.devices import resolve_device

    if args.dtype != "auto" and getattr(args, "backend", "auto") != "auto":
        return
    dtype, backend = recorded_precision(parse_infotext(infotext).params, resolve_device(args.device))
    chosen = []
    if args.dtype == "auto":
        args.dtype = dtype
        chosen.append(f"--dtype {dtype}")
    if getattr(args, "backend", "auto") == "auto":
        args.backend = backend
        chosen.append(f"--backend {backend}")
    print(f"huabi: note: {image}: {' '.join(chosen)} as the image was made (give them to choose otherwise)",
          file=sys.stderr)


def make_studio(args: argparse.Namespace):
    from huabi.cli.flow_options import text_encoder_files
    from huabi.service.studio import Studio

    return Studio(models_dir=args.models_dir, device=args.device, dtype=args.dtype,
                  embeddings_dir=getattr(args, "embeddings_dir", None), base_model=getattr(args, "base", None),
                  gguf_on_the_fly=getattr(args, "gguf_on_the_fly", False), backend=getattr(args, "backend", "auto"),
                  vae_decoder=getattr(args, "vae_decoder", "full"), vae_tiling=getattr(args, "vae_tiling", False),
                  text_encoder_files=text_encoder_files(args))


def gallery_recorder():
    """Records each image the command writes into the server's gallery (the default data dir's,
    when it exists; see :mod:`huabi.service.gallery`). Close it when the command ends."""
    from huabi.service.gallery import GalleryRecorder, existing_gallery

    return GalleryRecorder(existing_gallery())


def keep_and_record(saved: list, recorder) -> Callable:
    """An ``on_saved`` callback: remember the image (Ctrl-C prints what was kept) and record it in the gallery."""
    def on_saved(result) -> None:
        saved.append(result)
        recorder(result)

    return on_saved


def print_saved_paths(results) -> None:
    """The paths of the images saved so far (Ctrl-C in a batch keeps them and says so)."""
    for result in results:
        if result.path is not None:
            print(result.path, flush=True)


class ProgressBar:
    """A tqdm bar on stderr, created lazily so --quiet costs nothing."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._bar = None

    def update(self, event, total: int | None = None) -> None:
        """A :class:`ProgressEvent` (or the older ``done, total`` pair)."""
        if not self.enabled:
            return
        done, total = (event, total) if total is not None else (event.step, event.total)
        if self._bar is None:
            from tqdm import tqdm

            # The clock starts at the first reported step, so the first rate shown is a real one
            # (not "110376 step/s" from one step over the microseconds since the bar was made).
            self._bar = tqdm(total=total, initial=done, unit="step", file=sys.stderr, dynamic_ncols=True)
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
