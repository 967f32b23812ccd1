"""Choosing the torch device and CPU threads."""
from __future__ import annotations

import os

import torch

from .errors import InputError

DEVICES = ("auto", "cpu", "cuda", "mps")


def choose_device(preference: str | None = "auto") -> torch.device:
    """The torch device to use: CUDA if available, else Apple MPS, else CPU (for ``"auto"``/None).

    An explicit ``"cuda"`` or ``"mps"`` that is not available raises :class:`InputError`; CPU
    always works. ``"cuda:1"`` style names are accepted.
    """
    pref = (preference or "auto").lower()
    if pref == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if pref.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError("CUDA was requested but no CUDA GPU is available to torch; use --device cpu "
                             "(or auto).")
        return torch.device(pref)
    if pref == "mps":
        if not (getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()):
            raise InputError("Apple MPS was requested but is not available; use --device cpu (or auto).")
        return torch.device("mps")
    if pref == "cpu":
        return torch.device("cpu")
    raise InputError(f"Unknown device '{preference}'; use one of {', '.join(DEVICES)} (or cuda:N).")


def set_threads(threads: int | None = None) -> int:
    """Set torch's CPU threads (default: ``MMREG_THREADS`` or all cores); returns the number used."""
    if threads is None:
        threads = int(os.environ.get("MMREG_THREADS", "0")) or os.cpu_count() or 1
    torch.set_num_threads(max(1, int(threads)))
    return torch.get_num_threads()
