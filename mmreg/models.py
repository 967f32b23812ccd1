"""Trained models: where they live, their model cards, saving and safe loading.

A model is a folder ``<name>/`` holding ``model.pt`` (a PyTorch ``state_dict``, loaded with
``weights_only=True``) and ``model.json`` (its model card, :class:`ModelCard`): method,
architecture arguments, network spacing and size multiple, intensity normalisation, whether it
predicts a stationary velocity (diffeomorphic) or a displacement, training data and recipe,
benchmark numbers, and the SHA-256 of ``model.pt``.

Models are found, per method, in two places (the first wins on a name clash):

* user models: ``$MMREG_MODELS/<method>/<name>`` (default ``~/.mmreg/models``), where
  ``mmreg train`` and the Slicer training module put fine-tuned models;
* shipped models: ``$MMREG_SHIPPED_MODELS/<method>/<name>`` (default ``Resources/Models`` of
  the repository / extension).

A model can also be named by its folder path. Loading refuses, with the file and the fix in
the message (:class:`mmreg.errors.WeightsError`): a missing folder or file, a checksum mismatch
(corrupted or edited weights), a card of another method, weights that do not fit the
architecture of the card.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from .errors import WeightsError

FORMAT_VERSION = 1
WEIGHTS_FILE, CARD_FILE = "model.pt", "model.json"


def shipped_model_root() -> Path:
    """Folder of the shipped models: ``$MMREG_SHIPPED_MODELS`` or ``<repository>/Resources/Models``."""
    env = os.environ.get("MMREG_SHIPPED_MODELS")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1] / "Resources" / "Models"


def user_model_root() -> Path:
    """Folder of the user's (fine-tuned) models: ``$MMREG_MODELS`` or ``~/.mmreg/models``."""
    env = os.environ.get("MMREG_MODELS")
    return Path(env).expanduser() if env else Path.home() / ".mmreg" / "models"


@dataclass
class ModelCard:
    """What a model is and how to use it (stored as ``model.json`` beside the weights).

    ``spacing_mm``: isotropic spacing of the network grid the model was trained on (mm);
    ``inference_spacing_mm``: the spacing (mm) the network runs at by default when it registers, where
    a benchmark found another spacing than the training one better (None: ``spacing_mm``; see
    :meth:`mmreg.methods.network_method.NetworkRegistration.network_spacing`);
    ``multiple``: spatial sizes must be multiples of it; ``normalisation``: how inputs were
    scaled (the engine's :func:`mmreg.intensity.normalize_intensity`, images in [0, 1]);
    ``diffeomorphic``: the network output is a stationary velocity integrated by scaling and
    squaring in ``integration_steps`` steps (else a displacement); both in voxels of the network
    grid, resampling convention. ``training`` / ``benchmark``: free-form records (data, steps,
    wall time; Dice etc.). ``sha256``: of the weights file.
    """

    name: str
    method: str
    architecture: dict
    spacing_mm: float
    multiple: int
    normalisation: str = "mmreg.intensity.normalize_intensity (CT window -1000..1000 HU, MR 1st-99th percentile) to [0, 1]"
    diffeomorphic: bool = True
    integration_steps: int = 7
    inference_spacing_mm: float | None = None
    description: str = ""
    training: dict = field(default_factory=dict)
    benchmark: dict = field(default_factory=dict)
    sha256: str = ""
    created: str = ""
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        """JSON-friendly dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, source: str = "model card") -> "ModelCard":
        """Card from a dict; :class:`WeightsError` naming ``source`` when fields are missing or unknown."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = required - set(data)
        if missing:
            raise WeightsError(f"{source} lacks {', '.join(sorted(missing))}; it is not an mmreg model card.")
        if int(data.get("format_version", FORMAT_VERSION)) > FORMAT_VERSION:
            raise WeightsError(f"{source} was written by a newer mmreg (format {data['format_version']}); update mmreg.")
        return cls(**{k: v for k, v in data.items() if k in names})


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_model(folder, network: torch.nn.Module, card: ModelCard) -> Path:
    """Write ``model.pt`` (state dict, CPU tensors) and ``model.json`` (card with checksum) into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / WEIGHTS_FILE
    tmp = weights.with_suffix(".pt.tmp")
    torch.save({k: v.detach().cpu() for k, v in network.state_dict().items()}, tmp)
    os.replace(tmp, weights)
    card.sha256 = sha256_of(weights)
    card.created = card.created or _dt.datetime.now().isoformat(timespec="seconds")
    (folder / CARD_FILE).write_text(json.dumps(card.to_dict(), indent=1))
    return folder


def _candidates(method: str) -> list:
    out = []
    for source, root in (("user", user_model_root()), ("shipped", shipped_model_root())):
        base = root / method
        if base.is_dir():
            out += [(source, d) for d in sorted(base.iterdir()) if (d / CARD_FILE).is_file()]
    return out


def portable_model_path(folder) -> str:
    """``folder`` for reports without this machine's paths: ``<shipped models>/...``,
    ``<user models>/...`` inside those roots, else as given."""
    path = Path(folder).expanduser().resolve()
    for label, root in (("<shipped models>", shipped_model_root()), ("<user models>", user_model_root())):
        try:
            return f"{label}/{path.relative_to(root.expanduser().resolve()).as_posix()}"
        except ValueError:
            continue
    return str(folder)


def local_model_path(portable: str) -> Path:
    """Inverse of :func:`portable_model_path` on this machine: ``<shipped models>/...`` and
    ``<user models>/...`` resolved against the current roots; other paths as given."""
    for label, root in (("<shipped models>", shipped_model_root()), ("<user models>", user_model_root())):
        if str(portable).startswith(label + "/"):
            return root.expanduser() / str(portable)[len(label) + 1:]
    return Path(portable).expanduser()


def record_benchmark(folder, key: str, numbers: dict) -> Path:
    """Store benchmark ``numbers`` under ``benchmark[key]`` of the model card in ``folder`` (the
    weights and their checksum are untouched); returns the card's path."""
    card_path = Path(folder) / CARD_FILE
    data = json.loads(card_path.read_text())
    data.setdefault("benchmark", {})[key] = numbers
    tmp = card_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, card_path)
    return card_path


def list_models(method: str) -> list:
    """The models of ``method``: dicts with name, source ("user"/"shipped"), path, description,
    spacing_mm (the training grid spacing), inference_spacing_mm (the spacing it runs at by default
    when that differs; else None) and diffeomorphic (whether the network predicts a
    stationary velocity; None when the card does not say). User models hide shipped ones of the
    same name."""
    seen, out = set(), []
    for source, folder in _candidates(method):
        if folder.name in seen:
            continue
        seen.add(folder.name)
        try:
            card = json.loads((folder / CARD_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            card = {}
        out.append({"name": folder.name, "source": source, "path": str(folder),
                    "description": card.get("description", ""), "spacing_mm": card.get("spacing_mm"),
                    "inference_spacing_mm": card.get("inference_spacing_mm"), "diffeomorphic": card.get("diffeomorphic")})
    return out


def _user_model(method: str, name: str) -> Path:
    """The folder of the user model ``name`` of ``method``; :class:`InputError` when there is none
    (shipped models cannot be changed: they belong to the installation)."""
    from .errors import InputError  # noqa: PLC0415
    folder = user_model_root() / method / str(name)
    if not _plain_name(name) or not (folder / CARD_FILE).is_file():
        shipped = (shipped_model_root() / method / str(name) / CARD_FILE).is_file()
        raise InputError(f"'{name}' is a shipped model of '{method}' and cannot be renamed or deleted; shipped models "
                         "belong to the installation." if shipped and _plain_name(name) else
                         f"No user model '{name}' of method '{method}' in {user_model_root() / method}.")
    return folder


def _plain_name(name) -> bool:
    text = str(name)
    return bool(text) and "/" not in text and "\\" not in text and text not in (".", "..")


def rename_model(method: str, name: str, new_name: str) -> Path:
    """Rename the user model ``name`` of ``method`` to ``new_name`` (folder and card); returns the
    new folder. :class:`InputError` for shipped or missing models, a bad or taken new name."""
    from .errors import InputError  # noqa: PLC0415
    folder = _user_model(method, name)
    if not _plain_name(new_name):
        raise InputError(f"A model name must be a plain folder name, got {new_name!r}.")
    target = folder.parent / str(new_name)
    if target.exists() or any(m["name"] == new_name for m in list_models(method)):
        raise InputError(f"A model named '{new_name}' of method '{method}' exists already; choose another name.")
    os.replace(folder, target)
    card_path = target / CARD_FILE
    data = json.loads(card_path.read_text())
    data["name"] = str(new_name)
    tmp = card_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, card_path)
    _CACHE.clear()
    return target


def delete_model(method: str, name: str) -> Path:
    """Delete the user model ``name`` of ``method`` (its folder, with any training checkpoints);
    returns the folder it was in. :class:`InputError` for shipped or missing models."""
    import shutil  # noqa: PLC0415
    folder = _user_model(method, name)
    shutil.rmtree(folder)
    _CACHE.clear()
    return folder


def install_model(folder, name: str | None = None) -> Path:
    """Copy the model in ``folder`` (model.pt + model.json, checksum verified; not its training
    checkpoints) into the user models as ``name`` (default: the card's name), so it is listed and
    usable by name; returns the new folder. :class:`InputError` when the files are missing or do
    not match, or the name is taken."""
    import shutil  # noqa: PLC0415

    from .errors import InputError  # noqa: PLC0415
    folder = Path(folder).expanduser()
    card_path, weights = folder / CARD_FILE, folder / WEIGHTS_FILE
    if not card_path.is_file() or not weights.is_file():
        raise InputError(f"'{folder}' is not a model folder (it needs {WEIGHTS_FILE} and {CARD_FILE}).")
    try:
        card = json.loads(card_path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(f"Model card '{card_path}' is not valid JSON ({exc}).") from None
    if card.get("sha256") and sha256_of(weights) != card["sha256"]:
        raise InputError(f"Weights '{weights}' do not match the checksum in '{card_path}'; the model is damaged.")
    name = str(name or card.get("name") or folder.name)
    method = str(card.get("method", ""))
    if not _plain_name(name) or not method:
        raise InputError(f"Cannot install '{folder}': bad name {name!r} or no method in its card.")
    target = user_model_root() / method / name
    if target.exists() or any(m["name"] == name for m in list_models(method)):
        raise InputError(f"A model named '{name}' of method '{method}' exists already; pass another name.")
    target.mkdir(parents=True)
    shutil.copy2(weights, target / WEIGHTS_FILE)
    card["name"] = name
    (target / CARD_FILE).write_text(json.dumps(card, indent=1))
    return target


def default_model_name(names) -> str | None:
    """The model used when none is chosen: "default" if among ``names``, else the only name, else None."""
    names = list(names)
    if "default" in names:
        return "default"
    return names[0] if len(names) == 1 else None


def resolve_model(method: str, model: str | os.PathLike | None) -> Path:
    """The folder of ``model`` (a name, a folder path, or None = "default" or the only model of ``method``)."""
    if model is not None and Path(model).expanduser().is_dir():
        return Path(model).expanduser()
    found = {m["name"]: Path(m["path"]) for m in list_models(method)}
    if model is None:
        name = default_model_name(found)
        if name is not None:
            return found[name]
    elif str(model) in found:
        return found[str(model)]
    where = f"{user_model_root() / method} or {shipped_model_root() / method}"
    if not found:
        raise WeightsError(f"No trained model for method '{method}' (looked in {where}). Train one with "
                           f"`mmreg train` or point --model at a model folder (with {WEIGHTS_FILE} and {CARD_FILE}).")
    want = "a model name" if model is None else f"model '{model}'"
    raise WeightsError(f"Method '{method}' needs {want}: available {', '.join(sorted(found))} (in {where}), "
                       "or a model folder path.")


_CACHE: dict = {}


def load_model(method: str, model, build: Callable[[dict], torch.nn.Module],
               device: torch.device | str = "cpu") -> tuple:
    """(network in eval mode on ``device``, :class:`ModelCard`) for ``model`` of ``method``.

    ``build(architecture)`` makes the untrained network the card describes. Checks the card,
    the checksum and that the weights fit; cached per folder while the files are unchanged.
    """
    folder = resolve_model(method, model)
    card_path, weights = folder / CARD_FILE, folder / WEIGHTS_FILE
    for path in (card_path, weights):
        if not path.is_file():
            raise WeightsError(f"Model folder '{folder}' has no {path.name}; reinstall or retrain the model.")
    key = (str(folder.resolve()), weights.stat().st_mtime_ns, card_path.stat().st_mtime_ns, str(device))
    if key in _CACHE:
        return _CACHE[key]
    try:
        card = ModelCard.from_dict(json.loads(card_path.read_text()), str(card_path))
    except json.JSONDecodeError as exc:
        raise WeightsError(f"Model card '{card_path}' is not valid JSON ({exc}); reinstall or retrain the model.") from None
    if card.method != method:
        raise WeightsError(f"Model '{folder}' was trained for method '{card.method}', not '{method}'; "
                           f"use it with --method {card.method}.")
    digest = sha256_of(weights)
    if card.sha256 and digest != card.sha256:
        raise WeightsError(f"Weights '{weights}' do not match the checksum in '{card_path}' (corrupted or replaced "
                           "file); reinstall or retrain the model.")
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means a broken file
        raise WeightsError(f"Weights '{weights}' cannot be read ({type(exc).__name__}: {exc}); reinstall or retrain "
                           "the model.") from None
    network = build(card.architecture)
    try:
        network.load_state_dict(state, strict=True)
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0][:300]
        raise WeightsError(f"Weights '{weights}' do not fit the architecture in its card ({first}); the files do not "
                           "belong together: reinstall or retrain the model.") from None
    network = network.to(device).eval()
    for p in network.parameters():
        p.requires_grad_(False)
    _CACHE.clear()  # keep one network in memory
    _CACHE[key] = (network, card)
    return network, card
