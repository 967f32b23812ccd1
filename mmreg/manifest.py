"""Training data manifests: the image pairs of a user's own data (engine side, no Slicer imports).

A manifest lists registration pairs, one per row (CSV with a header) or per object (JSON: a list,
or ``{"pairs": [...]}``)::

    fixed,moving,fixed_labels,moving_labels,fixed_modality,moving_modality,split
    sub01_T1.nii.gz,sub02_T2.nii.gz,sub01_seg.nii.gz,sub02_seg.nii.gz,MR,MR,train
    sub03_T1.nii.gz,sub01_T2.nii.gz,,,MR,MR,

Only ``fixed`` and ``moving`` are required. Label maps (optional, on the grid of their image)
give validation Dice; ``*_modality`` is "auto" (default), "MR" or "CT" (intensity
normalisation, as in ``mmreg register``); ``split`` is "train", "validation" (also "val") or
empty (automatic split). Relative paths are taken from the manifest's folder. Any image format
SimpleITK reads (NIfTI, NRRD, MetaImage, ...), in LPS physical space as everywhere in the engine.

:func:`read_manifest` parses and reports malformed rows; :func:`check_entry` opens the files of
one entry and says what is wrong with it (unreadable, not 3-D scalar, NaN/Inf, constant, labels
off their image's grid), so training skips bad entries up front instead of failing mid-run.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import InputError, MMRegError

#: Columns of a manifest (``fixed`` and ``moving`` required).
COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels", "fixed_modality", "moving_modality", "split")
_SPLITS = {"": "", "train": "train", "training": "train", "val": "validation", "validation": "validation"}
_MODALITIES = {"": "auto", "auto": "auto", "mr": "MR", "mri": "MR", "ct": "CT"}


@dataclass
class ManifestEntry:
    """One pair of a manifest: absolute paths (labels may be None), modalities ("auto"/"MR"/"CT"),
    ``split`` ("train", "validation" or "" for automatic) and ``row`` (1-based, for messages)."""

    row: int
    fixed: str
    moving: str
    fixed_labels: str | None = None
    moving_labels: str | None = None
    fixed_modality: str = "auto"
    moving_modality: str = "auto"
    split: str = ""

    @property
    def name(self) -> str:
        """A short name for logs: ``row N: fixed <- moving`` (file names only)."""
        return f"row {self.row}: {Path(self.fixed).name} <- {Path(self.moving).name}"

    def files(self) -> list:
        """The entry's existing files (images, then labels)."""
        return [p for p in (self.fixed, self.moving, self.fixed_labels, self.moving_labels) if p]


def _records(path: Path) -> list:
    """Raw rows of a CSV or JSON manifest as dicts (lower-case keys)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"Manifest '{path}' does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Manifest '{path}' cannot be read ({exc}).") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"Manifest '{path}' is not valid JSON ({exc}).") from None
        if isinstance(data, dict):
            data = data.get("pairs")
        if not isinstance(data, list):
            raise InputError(f"Manifest '{path}' must hold a list of pairs (or {{\"pairs\": [...]}}).")
        return [{str(k).strip().lower(): v for k, v in r.items()} if isinstance(r, dict) else r for r in data]
    if path.suffix.lower() not in (".csv", ".tsv", ".txt"):
        raise InputError(f"Manifest '{path}': use a .csv or .json file.")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise InputError(f"Manifest '{path}' is empty.")
    dialect = csv.excel_tab if path.suffix.lower() == ".tsv" else csv.excel
    reader = csv.DictReader(lines, dialect=dialect)
    header = [h.strip().lower() for h in (reader.fieldnames or [])]
    if "fixed" not in header or "moving" not in header:
        raise InputError(f"Manifest '{path}' needs a header line with at least the columns fixed and moving "
                         f"(known columns: {', '.join(COLUMNS)}); got {', '.join(header) or 'none'}.")
    return [{(k or "").strip().lower(): v for k, v in r.items()} for r in reader]


def read_manifest(path: str | os.PathLike) -> tuple:
    """``(entries, problems)`` of a manifest: :class:`ManifestEntry` per well-formed row (paths made
    absolute from the manifest's folder) and a ``"row N: reason"`` string per malformed one
    (missing fixed/moving, unknown modality or split, unknown columns are ignored).
    :class:`InputError` when the file itself is unusable (missing, not CSV/JSON, no header)."""
    path = Path(path).expanduser()
    base = path.resolve().parent
    entries, problems = [], []
    for i, rec in enumerate(_records(path), start=1):
        if not isinstance(rec, dict):
            problems.append(f"row {i}: not an object with fixed and moving")
            continue

        def text(key):
            value = rec.get(key)
            return "" if value is None else str(value).strip()

        def absolute(key):
            value = text(key)
            return str((base / Path(value).expanduser()).resolve()) if value else None

        if not text("fixed") or not text("moving"):
            problems.append(f"row {i}: fixed and moving are both required")
            continue
        mods = [text("fixed_modality").lower(), text("moving_modality").lower()]
        bad = [m for m in mods if m not in _MODALITIES]
        if bad:
            problems.append(f"row {i}: unknown modality {bad[0]!r} (use MR, CT or auto)")
            continue
        split = text("split").lower()
        if split not in _SPLITS:
            problems.append(f"row {i}: unknown split {split!r} (use train, validation or leave it empty)")
            continue
        entries.append(ManifestEntry(i, absolute("fixed"), absolute("moving"), absolute("fixed_labels"),
                                     absolute("moving_labels"), _MODALITIES[mods[0]], _MODALITIES[mods[1]],
                                     _SPLITS[split]))
    return entries, problems


def write_manifest(path: str | os.PathLike, rows) -> Path:
    """Write ``rows`` (dicts with the keys of :data:`COLUMNS`; fixed and moving required) as a CSV
    (``.csv``) or JSON (``.json``) manifest; paths inside the manifest's folder are written
    relative to it. Returns the path."""
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    base = path.resolve().parent
    out = []
    for i, row in enumerate(rows, start=1):
        unknown = set(row) - set(COLUMNS)
        if unknown:
            raise InputError(f"Manifest row {i}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(COLUMNS)}.")
        if not row.get("fixed") or not row.get("moving"):
            raise InputError(f"Manifest row {i}: fixed and moving are required.")
        rec = {}
        for key in COLUMNS:
            value = row.get(key)
            if value and key in ("fixed", "moving", "fixed_labels", "moving_labels"):
                p = Path(value).expanduser().resolve()
                try:
                    value = p.relative_to(base).as_posix()
                except ValueError:
                    value = str(p)
            rec[key] = "" if value is None else str(value)
        out.append(rec)
    if path.suffix.lower() == ".json":
        path.write_text(json.dumps({"pairs": out}, indent=1) + "\n")
    else:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows(out)
    return path


def check_entry(entry: ManifestEntry) -> tuple:
    """Open and validate the files of ``entry``: ``(fixed, moving, fixed_labels, moving_labels)``
    SimpleITK images (labels None when not given). Raises :class:`MMRegError` whose message says
    what is wrong (the caller reports it and skips the entry)."""
    from .image import read_image, read_labels, same_grid  # noqa: PLC0415

    fixed = read_image(entry.fixed, "Fixed image")
    moving = read_image(entry.moving, "Moving image")
    labels = []
    for path, image, what in ((entry.fixed_labels, fixed, "fixed"), (entry.moving_labels, moving, "moving")):
        if not path:
            labels.append(None)
            continue
        lab = read_labels(path, f"{what.capitalize()} label map")
        if not same_grid(lab, image, tol=1e-3):
            raise InputError(f"the {what} label map is not on the grid of the {what} image (size {lab.GetSize()} vs "
                             f"{image.GetSize()}, or a different origin/spacing/direction)")
        labels.append(lab)
    return fixed, moving, labels[0], labels[1]


def manifest_digest(entries) -> str:
    """sha256 of the entries' paths, splits, modalities and file sizes/dates: identifies the data
    a model was trained on (goes into its model card)."""
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps(asdict(e), sort_keys=True).encode())
        for f in e.files():
            try:
                st = os.stat(f)
                h.update(f"{st.st_size}:{int(st.st_mtime)}".encode())
            except OSError:
                h.update(b"missing")
    return h.hexdigest()


def describe_problem(exc: Exception) -> str:
    """The first line of an error's message (engine errors carry the reason and the fix)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if isinstance(exc, MMRegError) else f"{type(exc).__name__}: {text}"


__all__ = ["COLUMNS", "ManifestEntry", "read_manifest", "write_manifest", "check_entry", "manifest_digest",
           "describe_problem"]
