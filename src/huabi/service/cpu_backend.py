"""The engine's one hook into execution backends: which modules a job runs on.

``BackendChoice.job_bundle(bundle, request, ...)`` returns the bundle a job should use:
the torch bundle itself, or a copy whose UNet and VAE decoder run in OpenVINO. Jobs
that need something the converted graph cannot do run in torch, with a one-line
message naming the feature (logged as a warning on the ``huabi`` logger).
"""

from __future__ import annotations

import dataclasses
import logging
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from huabi.backends import BACKENDS, available_backends
from huabi.core.request import GenerationRequest
from huabi.errors import HuabiError
from huabi.models.bundle import ModelBundle
from huabi.models.family import ModelFamily

if TYPE_CHECKING:
    from huabi.service.backend_choice import BackendDecision

log = logging.getLogger("huabi")

BACKEND_INFOTEXT_NAMES = {"torch": "torch", "openvino": "OpenVINO", "openvino-int8": "OpenVINO int8"}
BACKEND_NAMES = ("auto", "torch", "openvino", "openvino-int8")


def openvino_unsupported(request: GenerationRequest, *, adapters_active: bool, device: torch.device,
                         on_the_fly_gguf: bool = False) -> list[str]:
    """The features of ``request`` the OpenVINO graphs cannot run (empty: it can)."""
    reasons = []
    if device.type != "cpu":
        reasons.append(f"device {device} (OpenVINO runs here on the CPU only)")
    if request.controlnets:
        reasons.append("ControlNet (extra UNet residual inputs)")
    if adapters_active:
        reasons.append("hypernetworks / IP-Adapter (attention processors)")
    if request.tile:
        reasons.append("seamless tiling (circular padding)")
    if on_the_fly_gguf:
        reasons.append("GGUF on-the-fly dequantization")
    return reasons


def recorded_precision(params: dict[str, str], device: torch.device) -> tuple[str, str]:
    """``(dtype, backend)`` names that reproduce an image on ``device`` from its infotext
    parameters, the inverse of ``device_choice.precision_infotext``: no "Dtype" is the device's
    reference precision (fp32 on a CPU, fp16 on CUDA), no "Backend" is torch. What this device
    cannot run falls back to the nearest it can: fp16 on a CPU -> fp32; OpenVINO off the CPU
    or not installed -> torch."""
    reference = "fp16" if device.type == "cuda" else "fp32"
    dtype = params.get("Dtype", "").strip().lower() or reference
    if dtype not in {"fp32", "bf16", "fp16"} or (dtype == "fp16" and device.type == "cpu"):
        dtype = reference
    by_infotext = {shown.lower(): name for name, shown in BACKEND_INFOTEXT_NAMES.items()}
    backend = by_infotext.get(params.get("Backend", "").strip().lower(), "torch")
    if device.type != "cpu" or (backend != "torch" and "openvino" not in available_backends()):
        backend = "torch"
    return dtype, backend


def parse_backend(name: str) -> tuple[str, bool]:
    """``auto``, ``torch``, ``openvino`` or ``openvino-int8`` -> (backend, int8)."""
    name = (name or "auto").strip().lower()
    if name == "openvino-int8":
        return "openvino", True
    if name != "auto" and name not in BACKENDS:
        raise HuabiError(f"backend: unknown backend {name!r}; valid: {', '.join(BACKEND_NAMES)}")
    return name, False


class BackendChoice:
    """What an engine runs jobs on; holds the OpenVINO runtime (converted graphs) if any."""

    def __init__(self, name: str, *, dtype: torch.dtype, device: torch.device | None = None,
                 cache_dir: Path | None = None, threads: int | None = None, preview: str = "cheap",
                 preview_every: int = 1, vae_decoder: str = "full", vae_tiling: bool = False) -> None:
        from huabi.service.previews import parse_decoder_spec

        self.name, self.int8 = parse_backend(name)
        self.dtype = dtype
        self.device = device or torch.device("cpu")
        self._runtime = None
        self._converted: tuple[tuple, ModelBundle, weakref.ref] | None = None
        # After a conversion the torch UNet's weights are released (service/unet_weights.py); the
        # graph key of each (bundle, LoRA set) seen is remembered so that a known set needs no weights.
        self.release_torch_weights = True
        self._weights = None  # the ReleasableUNet of the last bundle run here
        self._unet_keys: dict[tuple, tuple[weakref.ref, str]] = {}
        self.preview_spec = preview
        preview_method, _ = parse_decoder_spec(preview, "preview")
        if preview_method not in ("cheap", "taesd", "none"):
            raise HuabiError(f"preview: {preview!r} is not a preview method; valid: cheap, taesd:PATH, none")
        if not isinstance(preview_every, int) or preview_every < 1:
            raise HuabiError(f"preview every: must be a whole number of steps >= 1, got {preview_every!r}")
        self.preview_every = preview_every
        self._previewer: tuple[int, object] | None = None
        decoder_method, decoder_path = parse_decoder_spec(vae_decoder, "vae decoder")
        if decoder_method not in ("full", "taesd"):
            raise HuabiError(f"vae decoder: {vae_decoder!r}; valid: full, taesd:PATH")
        self._tiny_decoder = None
        if decoder_method == "taesd":
            from huabi.models.taesd import load_taesd

            self._tiny_decoder = load_taesd(decoder_path, device=self.device)
        self.vae_tiling = bool(vae_tiling)
        self.cache_dir, self.threads = cache_dir, threads
        # --backend auto: one decision per loaded model, forgotten when the model is unloaded
        self._auto_decisions: dict[int, tuple[weakref.ref, BackendDecision]] = {}
        if self.name == "openvino":
            if "openvino" not in available_backends():
                raise HuabiError("backend: openvino is not installed; pip install 'huabi[openvino]' "
                                 "(or use --backend torch)")
            self._start_runtime()

    def _start_runtime(self):
        if self._runtime is None:
            from huabi.backends.openvino import OpenVINORuntime
            from huabi.service.device_choice import default_cache_dir

            self._runtime = OpenVINORuntime((self.cache_dir or default_cache_dir()) / "openvino",
                                            precision="bf16" if self.dtype == torch.bfloat16 else "f32",
                                            int8=self.int8, threads=self.threads)
        return self._runtime

    def auto_decision(self, bundle) -> BackendDecision:
        """What ``--backend auto`` runs ``bundle`` on (measured once per machine, decided once per model)."""
        from huabi.service.backend_choice import cached_backend_probe, choose_backend
        from huabi.service.device_choice import read_cpu_info, recommended_threads

        self._auto_decisions = {k: v for k, v in self._auto_decisions.items() if v[0]() is not None}
        known = self._auto_decisions.get(id(bundle))
        decision = known[1] if known is not None and known[0]() is bundle else None
        if decision is None:
            unet = getattr(bundle, "unet", None)
            params = sum(param.numel() for param in unet.parameters()) if unet is not None else 0

            def probe():
                cpu = read_cpu_info()
                return cached_backend_probe(cpu, self.dtype, self.threads or recommended_threads(cpu),
                                            cache_dir=self.cache_dir)[0]

            from huabi.service.devices import available_memory_bytes

            decision = choose_backend(device=self.device, openvino_installed="openvino" in available_backends(),
                                      convertible=isinstance(bundle, ModelBundle), unet_params=params, probe=probe,
                                      free_bytes=available_memory_bytes(self.device))
            log.info("huabi: --backend auto for %s: %s", getattr(bundle, "short_hash", None) or "this model",
                     decision.reason)
            self._auto_decisions[id(bundle)] = (weakref.ref(bundle), decision)
        return decision

    @property
    def infotext_name(self) -> str:
        """The infotext name of the OpenVINO graphs this choice runs (auto runs them as ``openvino``)."""
        return BACKEND_INFOTEXT_NAMES["openvino-int8" if self.int8 else "openvino"]

    @property
    def runtime(self):
        return self._runtime

    def job_bundle(self, bundle: ModelBundle, request: GenerationRequest, *, lora_state: tuple,
                   adapters_active: bool, device: torch.device,
                   on_the_fly_gguf: bool = False, weights=None) -> tuple[ModelBundle, dict[str, str | None]]:
        """``(bundle to run, infotext keys)`` for one job: the backend's modules, then the
        VAE decoder choice (TAESD, tiles). Keys that do not apply are None (dropped).
        ``weights``: the bundle's UNet as it may be released after conversion and read back
        when torch needs it (a :class:`huabi.service.unet_weights.ReleasableUNet`; None: kept)."""
        from huabi.service.device_choice import precision_infotext
        from huabi.service.previews import with_vae

        job, backend_name = self._backend_bundle(bundle, request, lora_state=lora_state,
                                                 adapters_active=adapters_active, device=device,
                                                 on_the_fly_gguf=on_the_fly_gguf, weights=self._kept_weights(weights))
        job = with_vae(job, tiny_decoder=self._tiny_decoder, tiled=self.vae_tiling)
        infotext = precision_infotext(device, self.dtype, backend_name)
        infotext["VAE Decoder"] = f"TAESD ({self._tiny_decoder.name})" if self._tiny_decoder is not None else None
        return job, infotext

    def previewer(self, bundle: ModelBundle):
        """The live-preview maker for ``bundle`` (None with ``preview="none"``); TAESD loaded once."""
        from huabi.service.previews import make_previewer

        if self.preview_spec.strip().lower() == "none":
            return None
        if self._previewer is None or self._previewer[0] != bundle.family:
            self._previewer = (bundle.family, make_previewer(self.preview_spec, bundle))
        return self._previewer[1]

    def preview_due(self, done: int, total: int) -> bool:
        return done % self.preview_every == 0 or done == total

    def need_torch_unet(self, weights) -> None:
        """Make the torch UNet's weights resident now (read back if a conversion released them)."""
        weights = self._kept_weights(weights)
        if weights is not None:
            weights.ensure_resident()

    def _kept_weights(self, weights):
        """One ReleasableUNet per bundle: it remembers the file it released the weights of."""
        if weights is None:
            return None
        if self._weights is not None and self._weights.bundle is weights.bundle:
            return self._weights
        self._weights = weights
        return weights

    def _backend_bundle(self, bundle: ModelBundle, request: GenerationRequest, *, lora_state: tuple,
                        adapters_active: bool, device: torch.device, on_the_fly_gguf: bool,
                        weights=None) -> tuple[ModelBundle, str]:
        if self.name == "auto":
            if self.auto_decision(bundle).backend == "torch":
                return bundle, "torch"
            if lora_state:
                # Each LoRA set is its own graph: ~30 s of conversion and ~3.5 GB of disk (IR + compiled
                # blob) at SD1.5 size, for a 1.3x faster step. auto keeps LoRA jobs in torch; asking for
                # --backend openvino converts them.
                log.info("huabi: note: --backend auto runs jobs with LoRAs in torch (--backend openvino converts "
                         "each LoRA set)")
                if weights is not None:
                    weights.ensure_resident()
                return bundle, "torch"
            self._start_runtime()
        if self._runtime is None:
            return bundle, "torch"
        # asked for explicitly, a fallback is worth a warning; under auto it is routine
        note = log.info if self.name == "auto" else log.warning
        if not isinstance(bundle, ModelBundle):  # SD3/FLUX transformers: no OpenVINO conversion (yet)
            note("huabi: note: OpenVINO cannot run SD3/FLUX; this job runs in torch")
            return bundle, "torch"
        reasons = openvino_unsupported(request, adapters_active=adapters_active, device=device,
                                       on_the_fly_gguf=on_the_fly_gguf)
        if reasons:
            note("huabi: note: OpenVINO cannot run %s; this job runs in torch", "; ".join(reasons))
            if weights is not None:
                weights.ensure_resident()
            return bundle, "torch"
        key = (id(bundle), id(bundle.unet), lora_state)
        if self._converted is not None and self._converted[0] == key and self._converted[2]() is bundle:
            converted = self._converted[1]
        else:
            self._converted = None
            unet_key = self._known_unet_key(bundle, lora_state)
            if unet_key is None and weights is not None:
                weights.ensure_resident()  # a new LoRA set: its merged weights decide the graph
            converted = convert_bundle(self._runtime, bundle, unet_key=unet_key)
            self._unet_keys[(id(bundle), id(bundle.unet), lora_state)] = (weakref.ref(bundle), converted.unet.graph_key)
            self._converted = (key, converted, weakref.ref(bundle))
        if weights is not None and self.release_torch_weights:
            weights.release()
        return converted, self.infotext_name

    def _known_unet_key(self, bundle: ModelBundle, lora_state: tuple) -> str | None:
        """The graph key this bundle's UNet had with ``lora_state`` before, if its graph is still usable."""
        self._unet_keys = {k: v for k, v in self._unet_keys.items() if v[0]() is not None}  # drop unloaded models
        known = self._unet_keys.get((id(bundle), id(bundle.unet), lora_state))
        if known is None or known[0]() is not bundle or not self._runtime.has_graph(known[1]):
            return None
        return known[1]


def convert_bundle(runtime, bundle: ModelBundle, *, unet_key: str | None = None) -> ModelBundle:
    """A copy of ``bundle`` whose UNet and VAE decoder run in OpenVINO (text encoders: torch).
    ``unet_key``: the UNet graph's key when known (then its torch weights are not read)."""
    config = bundle.unet.config
    pooled = time_ids = None
    if bundle.family in (ModelFamily.SDXL, ModelFamily.SDXL_REFINER):
        time_ids = 6 if bundle.family is ModelFamily.SDXL else 5
        pooled = int(config.projection_class_embeddings_input_dim) - time_ids * int(config.addition_time_embed_dim)
    unet = runtime.unet(bundle.unet, bundle.short_hash, context_width=int(config.cross_attention_dim),
                        pooled_width=pooled, time_ids=time_ids, key=unet_key)
    vae = runtime.vae(bundle.vae, bundle.vae_short_hash or bundle.short_hash)
    return dataclasses.replace(bundle, unet=unet, vae=vae)


def lora_state_key(loras) -> tuple:
    """What identifies the LoRA set merged into the weights (files, sizes, dates, strengths)."""
    state = []
    for use in loras.uses:
        stat = Path(use.path).stat()
        state.append((str(use.path), stat.st_size, stat.st_mtime_ns, use.te_weight, use.unet_weight, use.dyn_dim))
    return tuple(state)
