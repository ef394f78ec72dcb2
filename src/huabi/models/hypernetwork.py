"""Hypernetworks in A1111's ``.pt`` format: reading them safely, building their modules.

An A1111 hypernetwork file is a pickled dict::

    {768: [k_state, v_state], 320: [...], 640: [...], 1280: [...],   # one pair per width
     "layer_structure": [1, 2, 1], "activation_func": "linear", "is_layer_norm": False,
     "activate_output": False, "use_dropout": False, "dropout_structure": [0, 0, 0],
     "last_layer_dropout": False, "weight_initialization": "Normal", "name": ..., "step": ...}

Each pair transforms the context an attention layer reads its keys and values
from, for every attention layer whose context is that wide (cross-attention:
the text-encoder width; self-attention: the layer's own width)::

    context_k = context + mlp_k(context) * strength      (likewise for v)

with ``mlp`` a stack of ``Linear(width*s[i] -> width*s[i+1])`` for the layer
structure ``s``, each followed by the activation (not after the last one
unless ``activate_output``), an optional ``LayerNorm`` and dropout (inactive
at inference; kept so the state-dict indices line up).  The module indices
(``linear.0.weight``, ``linear.2.weight``, ...) follow from that order, so the
files' state dicts load into :class:`HypernetworkModule` unchanged.

Files are read with ``torch.load(weights_only=True)`` only: one that needs
pickled code is refused, never executed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from huabi.errors import HuabiError
from huabi.models.hashes import HashCache

HYPERNETWORK_SUFFIXES = (".pt",)  # A1111 lists *.pt in its hypernetworks folder

# A1111's activation names.  "swish" is torch's Hardswish there, kept for compatibility;
# A1111 also accepts any torch.nn activation class by its lower-case name.
_NAMED_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "linear": nn.Identity,
    "relu": nn.ReLU,
    "leakyrelu": nn.LeakyReLU,
    "elu": nn.ELU,
    "swish": nn.Hardswish,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def _activation_class(name: str) -> type[nn.Module] | None:
    if name in _NAMED_ACTIVATIONS:
        return _NAMED_ACTIVATIONS[name]
    import torch.nn.modules.activation as activations

    for attr in dir(activations):
        candidate = getattr(activations, attr)
        if (
            isinstance(candidate, type)
            and issubclass(candidate, nn.Module)
            and candidate.__module__ == activations.__name__
            and attr.lower() == name
        ):
            return candidate
    return None


@dataclass(frozen=True)
class HypernetworkStructure:
    """How each module of a hypernetwork is built (shared by all its widths)."""

    layer_structure: tuple[float, ...] = (1.0, 2.0, 1.0)
    activation_func: str | None = None
    add_layer_norm: bool = False
    activate_output: bool = False
    dropout_structure: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        structure = self.layer_structure
        if len(structure) < 2 or structure[0] != 1 or structure[-1] != 1:
            raise HuabiError(f"layer_structure: must start and end with 1, got {list(structure)}")
        if any(not isinstance(s, (int, float)) or s <= 0 for s in structure):
            raise HuabiError(f"layer_structure: every entry must be a positive number, got {list(structure)}")
        if self.activation_func not in (None, "linear") and _activation_class(self.activation_func) is None:
            raise HuabiError(f"activation_func: unknown activation {self.activation_func!r}")
        if self.dropout_structure and len(self.dropout_structure) != len(structure):
            raise HuabiError(
                f"dropout_structure: needs {len(structure)} entries like layer_structure, got {list(self.dropout_structure)}"
            )


def dropout_structure_for(layer_structure: tuple[float, ...], use_dropout: bool, last_layer_dropout: bool) -> tuple[float, ...]:
    """A1111's dropout probabilities after each layer for files without an explicit structure."""
    if not use_dropout:
        return (0.0,) * len(layer_structure)
    middle = [0.3] * (len(layer_structure) - 3)
    return (0.0, *middle, 0.3 if last_layer_dropout else 0.0, 0.0)


class HypernetworkModule(nn.Module):
    """One A1111 hypernetwork transform: ``x + mlp(x) * strength`` at one width."""

    def __init__(self, width: int, structure: HypernetworkStructure) -> None:
        super().__init__()
        sizes = structure.layer_structure
        dropouts = structure.dropout_structure or (0.0,) * len(sizes)
        layers: list[nn.Module] = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(int(width * sizes[i]), int(width * sizes[i + 1])))
            is_last = i >= len(sizes) - 2
            activation = structure.activation_func
            if activation not in (None, "linear") and (not is_last or structure.activate_output):
                layers.append(_activation_class(activation)())
            if structure.add_layer_norm:
                layers.append(nn.LayerNorm(int(width * sizes[i + 1])))
            if dropouts[i + 1] > 0:  # inactive in eval mode; present so indices match the file
                layers.append(nn.Dropout(p=float(dropouts[i + 1])))
        self.linear = nn.Sequential(*layers)
        self.width = int(width)

    def forward(self, x: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        return x + self.linear(x) * strength


@dataclass
class Hypernetwork:
    """A loaded hypernetwork: ``modules[width] = (k_module, v_module)``, in eval mode on the CPU."""

    name: str
    path: Path | None
    structure: HypernetworkStructure
    modules: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = field(repr=False)
    short_hash: str | None = None  # A1111's "Hypernet hash": first 10 hex digits of the file's SHA-256

    @property
    def widths(self) -> tuple[int, ...]:
        return tuple(sorted(self.modules))

    def to(self, device: torch.device | str) -> "Hypernetwork":
        for pair in self.modules.values():
            for module in pair:
                module.to(device)
        return self


def _fix_old_keys(state: dict) -> dict:
    """The earliest A1111 files named the two linears ``linear1``/``linear2``."""
    renames = {"linear1.weight": "linear.0.weight", "linear1.bias": "linear.0.bias",
               "linear2.weight": "linear.1.weight", "linear2.bias": "linear.1.bias"}
    return {renames.get(key, key): value for key, value in state.items()}


def _structure_from(data: dict, name: str) -> HypernetworkStructure:
    layer_structure = data.get("layer_structure") or [1, 2, 1]
    try:
        layers = tuple(float(s) for s in layer_structure)
    except (TypeError, ValueError):
        raise HuabiError(f"hypernetwork {name}: layer_structure is not a list of numbers: {layer_structure!r}") from None
    dropout = data.get("dropout_structure")
    use_dropout = bool(data.get("use_dropout", False))
    if dropout is not None:
        try:
            dropout_t = tuple(float(p) for p in dropout)
        except (TypeError, ValueError):
            raise HuabiError(f"hypernetwork {name}: dropout_structure is not a list of numbers: {dropout!r}") from None
    else:
        dropout_t = dropout_structure_for(layers, use_dropout, bool(data.get("last_layer_dropout", False)))
    activation = data.get("activation_func")
    if activation is not None and not isinstance(activation, str):
        raise HuabiError(f"hypernetwork {name}: activation_func is not a name: {activation!r}")
    try:
        return HypernetworkStructure(
            layer_structure=layers,
            activation_func=activation.lower() if activation else None,
            add_layer_norm=bool(data.get("is_layer_norm", False)),
            # A1111 reads a missing key as True (old files activated every layer).
            activate_output=bool(data.get("activate_output", True)),
            dropout_structure=dropout_t,
        )
    except HuabiError as err:
        raise HuabiError(f"hypernetwork {name}: {err}") from None


def hypernetwork_from_dict(data: dict, name: str, path: Path | None = None) -> Hypernetwork:
    """Build a hypernetwork from the dict an A1111 ``.pt`` holds (errors name ``name``)."""
    if not isinstance(data, dict):
        raise HuabiError(f"hypernetwork {name}: holds a {type(data).__name__}, not A1111's hypernetwork dict")
    structure = _structure_from(data, name)
    modules: dict[int, tuple[HypernetworkModule, HypernetworkModule]] = {}
    for width, pair in data.items():
        if not isinstance(width, int) or isinstance(width, bool):
            continue
        if width < 1 or not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise HuabiError(f"hypernetwork {name}: entry {width} must be a [k, v] pair of state dicts")
        built = []
        for which, state in zip("kv", pair):
            if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
                raise HuabiError(f"hypernetwork {name}: width {width} {which} is not a state dict of tensors")
            module = HypernetworkModule(width, structure)
            expected = module.state_dict()
            state = _fix_old_keys(state)
            if set(state) != set(expected):
                missing = sorted(set(expected) - set(state))[:3]
                extra = sorted(set(state) - set(expected))[:3]
                raise HuabiError(
                    f"hypernetwork {name}: width {width} {which} does not match layer structure "
                    f"{list(structure.layer_structure)} (missing {missing}, unexpected {extra})"
                )
            for key, tensor in state.items():
                if tuple(tensor.shape) != tuple(expected[key].shape):
                    raise HuabiError(
                        f"hypernetwork {name}: width {width} {which} {key} has shape {list(tensor.shape)}, "
                        f"expected {list(expected[key].shape)}"
                    )
            module.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
            module.eval().requires_grad_(False)
            built.append(module)
        modules[width] = (built[0], built[1])
    if not modules:
        raise HuabiError(f"hypernetwork {name}: no per-width modules found (not an A1111 hypernetwork file)")
    return Hypernetwork(name=name, path=path, structure=structure, modules=modules)


def load_hypernetwork(path: str | Path, *, cache: HashCache | None = None) -> Hypernetwork:
    """Read an A1111 hypernetwork ``.pt`` (safely) into float32 CPU modules, with its short hash."""
    path = Path(path)
    if not path.is_file():
        raise HuabiError(f"hypernetwork {path}: no such file")
    from huabi.models.formats import load_pickle_safely

    data = load_pickle_safely(path, "hypernetwork")
    # A1111 names a hypernetwork after its file (the "name" key is what it was trained as).
    network = hypernetwork_from_dict(data, path.stem, path)
    network.short_hash = (cache if cache is not None else HashCache()).short_hash(path)
    return network


def hypernetwork_dict(
    modules: dict[int, tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]],
    structure: HypernetworkStructure,
    *,
    name: str,
) -> dict:
    """The dict A1111 saves for a hypernetwork (what :func:`load_hypernetwork` reads back)."""
    data: dict = {width: [dict(k), dict(v)] for width, (k, v) in modules.items()}
    data.update(
        name=name,
        step=0,
        layer_structure=list(structure.layer_structure),
        activation_func=structure.activation_func or "linear",
        is_layer_norm=structure.add_layer_norm,
        weight_initialization="Normal",
        use_dropout=any(structure.dropout_structure),
        dropout_structure=list(structure.dropout_structure or (0.0,) * len(structure.layer_structure)),
        last_layer_dropout=bool(structure.dropout_structure and structure.dropout_structure[-2]),
        activate_output=structure.activate_output,
        sd_checkpoint=None,
        sd_checkpoint_name=None,
        optional_info=None,
    )
    return data
