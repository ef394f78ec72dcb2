"""huabi (画笔): a local, offline AI painting studio for the Stable Diffusion family.

    import huabi
    studio = huabi.Studio()
    [result] = studio.generate("a red apple", seed=7)

The names below load on first use, so ``import huabi`` stays light (no torch until needed).
"""

__version__ = "0.1.0"

_PUBLIC = {
    "Studio": "huabi.service.studio",
    "GeneratedImage": "huabi.service.engine",
    "Job": "huabi.service.engine",
    "Engine": "huabi.service.engine",
    "GenerationRequest": "huabi.core.request",
    "EditOptions": "huabi.core.request",
    "ProgressEvent": "huabi.service.progress",
    "Cancellation": "huabi.service.progress",
    "HuabiError": "huabi.errors",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'huabi' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
