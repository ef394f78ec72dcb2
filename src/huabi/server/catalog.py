"""What the models folder holds, by name, and the path-safety rule for every name a client sends.

A client names things (checkpoint, VAE, LoRA, ControlNet model, upscaler); it
never gives a path. A name with a path separator, ``..``, a leading dot or an
absolute path is refused, and a name that resolves to a file outside the models
folder (a symlink pointing out) is refused too.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from huabi.errors import HuabiError

VAE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".bin")
UPSCALER_SUFFIXES = (".pth", ".pt", ".safetensors")
CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".bin")
_EXTRA_NETWORK_TAG = re.compile(r"<([^:<>]+):([^<>]*)>")
_WILDCARD = re.compile(r"__(.+?)__")


class UnsafeName(HuabiError):
    pass


def check_name(value: object, what: str) -> str:
    """``value`` as a plain name, or UnsafeName naming the field."""
    if not isinstance(value, str) or not value.strip():
        raise HuabiError(f"{what}: must be a name, got {value!r}")
    if ("/" in value or "\\" in value or "\0" in value or value.startswith((".", "~"))
            or ".." in value or os.path.isabs(value)):
        raise UnsafeName(f"{what}: {value!r} is a path; give a name from the server's lists")
    return value


def inside(path: Path, folder: Path) -> bool:
    """True when ``path`` (symlinks resolved) lies in ``folder`` (symlinks resolved)."""
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError):
        return False
    return True


@dataclass(frozen=True)
class Entry:
    name: str  # file stem: what prompts and infotext use
    path: Path


class Catalog:
    def __init__(self, models_dir: Path, runner) -> None:
        self.models_dir = Path(models_dir)
        self.runner = runner

    def _files(self, folders: tuple[str, ...], suffixes: tuple[str, ...]) -> list[Entry]:
        entries = []
        for folder in folders:
            root = self.models_dir / folder
            if not root.is_dir():
                continue
            for path in sorted(root.rglob("*")):
                if path.suffix.lower() in suffixes and path.is_file():
                    entries.append(Entry(path.stem, path))
        return entries

    def _safe(self, entry: Entry, what: str) -> Path:
        if not inside(entry.path, self.models_dir):
            raise UnsafeName(f"{what}: {entry.name!r} points outside the models folder; refused")
        return entry.path

    # -- listings -----------------------------------------------------------------------

    def checkpoints(self) -> list[Entry]:
        return [Entry(e.name, e.path) for e in self.runner.models()]

    def vaes(self) -> list[Entry]:
        return self._files(("VAE",), VAE_SUFFIXES)

    def loras(self) -> list[Entry]:
        """The files the engine's LoRA lookup searches (``Lora/``, ``LyCORIS/``, then huabi's built-in
        LoRAs), so every listed name works in a prompt; a built-in one that a user's file of the same
        name hides is not listed."""
        from huabi.service.adapters import lora_files, lora_folders
        from huabi.service.model_files import builtin_lora_dir

        builtin = builtin_lora_dir()
        entries = [Entry(path.stem, path) for path in lora_files(lora_folders(self.models_dir))]
        users = {entry.name for entry in entries if not inside(entry.path, builtin)}
        return [entry for entry in entries if not (entry.name in users and inside(entry.path, builtin))]

    def _safe_lora(self, entry: Entry, what: str) -> Path:
        """Inside the models folder, or one of huabi's own packaged LoRAs."""
        from huabi.service.model_files import builtin_lora_dir

        if inside(entry.path, builtin_lora_dir()):
            return entry.path
        return self._safe(entry, what)

    def hypernetworks(self) -> list[Entry]:
        return self._files(("hypernetworks",), (".pt", ".safetensors"))

    def controlnets(self) -> list[Entry]:
        entries = self._files(("ControlNet",), CONTROLNET_SUFFIXES)
        root = self.models_dir / "ControlNet"
        if root.is_dir():  # diffusers-layout ControlNet folders
            entries += [Entry(p.name, p) for p in sorted(root.iterdir()) if (p / "config.json").is_file()]
        return entries

    def upscalers(self) -> list[Entry]:
        return self._files(("ESRGAN", "RealESRGAN", "upscale_models"), UPSCALER_SUFFIXES)

    def embeddings(self) -> list[Entry]:
        folder = self.runner.config.embeddings_dir
        if folder is None or not Path(folder).is_dir():
            return []
        return [Entry(p.stem, p) for p in sorted(Path(folder).rglob("*"))
                if p.suffix.lower() in (".pt", ".safetensors", ".bin") and p.is_file()]

    # -- name -> file -------------------------------------------------------------------

    def checkpoint(self, value: str, what: str = "sd_model_checkpoint") -> str:
        """A1111 title ("name.safetensors [hash]"), name, file name or short hash -> absolute path."""
        from huabi.models.hashes import model_short_hash

        title = value.strip()
        if title.endswith("]") and " [" in title:
            title = title[: title.rindex(" [")]
        check_name(title, what)
        entries = self.checkpoints()
        builtin_name = self.runner.default_model_name()
        for entry in entries:
            if title in (entry.name, entry.path.name):
                if entry.name == builtin_name and not inside(entry.path, self.models_dir):
                    return str(entry.path)  # the packaged model lives with huabi, not in the models folder
                return str(self._safe(entry, what))
        wanted = title.lower()
        if len(wanted) >= 8 and all(c in "0123456789abcdef" for c in wanted):
            for entry in entries:
                if entry.path.is_file() and model_short_hash(entry.path).startswith(wanted[:10]):
                    return str(self._safe(entry, what))
        raise HuabiError(f"{what}: no checkpoint named {value!r}; see /sdapi/v1/sd-models")

    def named_file(self, value: str, entries: list[Entry], what: str, listing: str) -> str:
        check_name(value, what)
        for entry in entries:
            if value in (entry.name, entry.path.name):
                return str(self._safe(entry, what))
        raise HuabiError(f"{what}: no file named {value!r}; see {listing}")

    def vae(self, value: str | None) -> str | None:
        if value is None or value.strip() in ("", "Automatic", "None"):
            return None
        return self.named_file(value, self.vaes(), "sd_vae", "/sdapi/v1/sd-vae")

    def controlnet(self, value: str) -> str:
        title = value.strip()
        if title.endswith("]") and " [" in title:  # sd-webui-controlnet titles: "name [hash]"
            title = title[: title.rindex(" [")]
        return self.named_file(title, self.controlnets(), "controlnet model", "/controlnet/model_list")

    def check_prompt(self, prompt: str, what: str = "prompt") -> None:
        """Extra-network tags and wildcards name files: they must be plain names inside the folders."""
        loras = None
        for kind, args in _EXTRA_NETWORK_TAG.findall(prompt):
            name = args.split(":")[0].strip()
            check_name(name, f"{what}: <{kind}:...> tag")
            if kind.lower() in ("lora", "lyco"):
                loras = self.loras() if loras is None else loras
                for entry in loras:
                    if entry.name == name:
                        self._safe_lora(entry, f"{what}: <{kind}:{name}>")
        for wildcard in _WILDCARD.findall(prompt):
            if ".." in wildcard or wildcard.startswith(("/", "\\", "~")) or os.path.isabs(wildcard):
                raise UnsafeName(f"{what}: wildcard __{wildcard}__ is a path; give a name from the wildcards folder")
