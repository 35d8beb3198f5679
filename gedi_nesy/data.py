"""Read MNIST and Fashion-MNIST straight from their raw IDX files, in place and read-only.

Layout (the one torchvision uses): ``<root>/MNIST/raw/`` and ``<root>/FashionMNIST/raw/``, each
holding ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, gzip-compressed (``.gz``) or not. Nothing
is ever written under ``root``; the reader only opens files.

``root`` is chosen as: the ``root`` argument, else the environment variable ``GEDI_NESY_DATA``, else
the user cache ``$XDG_CACHE_HOME/gedi_nesy`` (or ``~/.cache/gedi_nesy``). Only in the user cache
are missing files downloaded (with torchvision); anywhere else a missing file is a ``DataError``.

Integrity: a ``.gz`` file's md5 must equal the official one (torchvision's table). An uncompressed
file cannot be checked that way, so it is checked structurally: IDX magic number (uint8 code and
number of dimensions), 28x28 images, the official item count and the exact byte length. Every file
also gets the structural checks, labels must lie in 0..9 and images and labels must be as many.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from gedi_nesy.errors import DataError

ENV_VAR = "GEDI_NESY_DATA"
DATASET_FOLDERS = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}  # name -> torchvision folder
SPLIT_PREFIXES = {"train": "train", "test": "t10k"}  # split -> IDX file-name prefix
OFFICIAL_COUNTS = {"train": 60000, "test": 10000}
IMAGE_SIDE = 28
OFFICIAL_MD5 = {  # (folder, file) -> md5, as in torchvision/datasets/mnist.py
    ("MNIST", "train-images-idx3-ubyte.gz"): "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    ("MNIST", "train-labels-idx1-ubyte.gz"): "d53e105ee54ea40749a09fcbcd1e9432",
    ("MNIST", "t10k-images-idx3-ubyte.gz"): "9fb629c4189551a2d022fa330f9573f3",
    ("MNIST", "t10k-labels-idx1-ubyte.gz"): "ec29112dd5afa0611ce80d1b7f02629c",
    ("FashionMNIST", "train-images-idx3-ubyte.gz"): "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    ("FashionMNIST", "train-labels-idx1-ubyte.gz"): "25c81989df183df01b3e8a0aad5dffbe",
    ("FashionMNIST", "t10k-images-idx3-ubyte.gz"): "bef4ecab320f06d8554ea6380940ec79",
    ("FashionMNIST", "t10k-labels-idx1-ubyte.gz"): "bb300cfdad3c16e7a12a480ee83cd310",
}
_IMAGES_MAGIC = 0x00000803  # IDX: two zero bytes, dtype code 0x08 (uint8), 3 dimensions
_LABELS_MAGIC = 0x00000801  # IDX: two zero bytes, dtype code 0x08 (uint8), 1 dimension
_FIX = "delete it and download it again, or replace it with the official file"


class _FileStamp(NamedTuple):
    """A file and the stat fields that change when it is rewritten (the memo key)."""

    path: Path
    size: int
    mtime_ns: int


def user_cache_dir() -> Path:
    """The per-user cache folder, the only place the reader downloads into.

    Returns:
        ``$XDG_CACHE_HOME/gedi_nesy`` when that variable holds an absolute path, else
        ``~/.cache/gedi_nesy``.
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() else Path.home() / ".cache"
    return base / "gedi_nesy"


def _locate_root(root: str | Path | None) -> tuple[Path, str]:
    """Pick the data root and its source: ``argument``, ``GEDI_NESY_DATA`` or ``cache``."""
    if root is not None:
        return Path(root).expanduser().absolute(), "argument"
    env = os.environ.get(ENV_VAR, "")
    if env:
        return Path(env).expanduser().absolute(), ENV_VAR
    return user_cache_dir(), "cache"


def resolve_root(root: str | Path | None) -> Path:
    """The data root: ``root`` if given, else ``$GEDI_NESY_DATA`` if set, else the user cache.

    Args:
        root: an explicit folder holding ``MNIST/raw/`` and/or ``FashionMNIST/raw/``, or None.

    Returns:
        The chosen folder, absolute. It need not exist.
    """
    return _locate_root(root)[0]


def _check_choice(value: str, allowed: dict[str, str], what: str) -> str:
    """Return ``allowed[value]`` or raise a DataError listing the allowed values."""
    if value not in allowed:
        names = ", ".join(repr(name) for name in allowed)
        raise DataError(f"unknown {what} {value!r}; allowed: {names}. Pass one of them.")
    return allowed[value]


def _base_names(split: str) -> tuple[str, str]:
    """Uncompressed file names (images, labels) of one split."""
    prefix = SPLIT_PREFIXES[split]
    return f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"


def _find_file(raw_dir: Path, base: str) -> Path | None:
    """``base.gz`` if present (it can be md5-checked), else ``base``, else None."""
    for candidate in (raw_dir / f"{base}.gz", raw_dir / base):
        try:
            found = candidate.is_file()  # Python 3.11 raises on EACCES
        except OSError as error:
            raise DataError(
                f"cannot look into {raw_dir} ({error.strerror}); make the data folder readable "
                "(data.root or $GEDI_NESY_DATA)"
            ) from None
        if found:
            return candidate
    return None


def _all_files_text() -> str:
    """The four expected file names of a data set, for error messages."""
    names = [name for split in SPLIT_PREFIXES for name in _base_names(split)]
    return ", ".join(f"{name}[.gz]" for name in names)


def _missing_message(
    folder: str, split: str, raw_dir: Path, source: str, missing: list[str]
) -> str:
    """One-line DataError text for files missing under an explicit or GEDI_NESY_DATA root."""
    return (
        f"{folder} {split} data not found: {', '.join(missing)} missing in {raw_dir} (root from "
        f"{source}); the reader needs the four files {_all_files_text()} there, gzip or not. "
        f"Fix: copy them there, or point {ENV_VAR} or root= at a folder holding {folder}/raw/, "
        f"or leave both unset to download into {user_cache_dir()}."
    )


def _download_message(folder: str, raw_dir: Path, error: Exception) -> str:
    """One-line DataError text for a failed download into the user cache."""
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:300]
    return (
        f"{folder} is not in the cache {raw_dir} and downloading it failed ({reason}). "
        f"Fix: copy the four files {_all_files_text()} there, or set {ENV_VAR} (or pass root=) "
        f"to a folder holding {folder}/raw/ with them."
    )


def download(dataset: str, root: str | Path) -> None:
    """Download a data set with torchvision into ``<root>/<Folder>/raw/`` (network needed).

    Args:
        dataset: ``"mnist"`` or ``"fashion_mnist"``.
        root: the folder to download into; torchvision creates ``<Folder>/raw/`` under it.

    Returns:
        None. Raises whatever torchvision raises when the download fails.
    """
    folder = _check_choice(dataset, DATASET_FOLDERS, "dataset")
    import torchvision.datasets  # imported here: slow to import and only needed to download

    getattr(torchvision.datasets, folder)(root=str(root), download=True)


def _split_files(dataset: str, split: str, root: str | Path | None) -> tuple[Path, Path]:
    """Paths of a split's images and labels; downloads only into the user cache, when missing."""
    folder = DATASET_FOLDERS[dataset]
    base_dir, source = _locate_root(root)
    raw_dir = base_dir / folder / "raw"
    bases = _base_names(split)
    found = [_find_file(raw_dir, base) for base in bases]
    if None in found and source == "cache":
        try:
            download(dataset, base_dir)
        except (OSError, RuntimeError) as error:  # URLError is an OSError
            raise DataError(_download_message(folder, raw_dir, error)) from error
        found = [_find_file(raw_dir, base) for base in bases]
    missing = [f"{base}[.gz]" for base, path in zip(bases, found, strict=True) if path is None]
    if missing:
        raise DataError(_missing_message(folder, split, raw_dir, source, missing))
    images, labels = found
    assert images is not None and labels is not None
    return images, labels


def _read_bytes(path: Path, md5: str | None) -> bytes:
    """The file's IDX bytes, gunzipped if ``.gz``; md5-checked first when ``md5`` is given."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read {path} ({error}); make it readable or {_FIX}.") from error
    if md5 is not None:
        actual = hashlib.md5(raw).hexdigest()
        if actual != md5:
            raise DataError(f"{path} has md5 {actual}, official is {md5}: corrupt; {_FIX}.")
    if path.suffix != ".gz":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:  # bad header, truncated stream, bad CRC
        raise DataError(
            f"{path} is not a valid gzip file ({error}): truncated or corrupt; {_FIX}."
        ) from error


def _parse_idx(data: bytes, path: Path, magic: int, ndim: int) -> np.ndarray:
    """Decode a uint8 IDX blob (magic, big-endian int32 dims, payload) after checking its header.

    Returns:
        The array, shape given by the header's dims, dtype uint8, writable.
    """
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(
            f"{path} has only {len(data)} bytes, no full IDX header: truncated; {_FIX}."
        )
    header = np.frombuffer(data, dtype=">i4", count=1 + ndim)  # (1 + ndim,) magic, then dims
    if int(header[0]) != magic:
        raise DataError(
            f"{path} has IDX magic number {int(header[0]):#010x}, expected {magic:#010x} (uint8, "
            f"{ndim} dims): corrupt or the wrong file; {_FIX}."
        )
    dims = tuple(int(d) for d in header[1:])
    expected_len = header_len + int(np.prod(dims))
    if len(data) != expected_len:
        raise DataError(
            f"{path} has {len(data)} bytes, its IDX header {dims} needs exactly {expected_len}: "
            f"truncated or corrupt; {_FIX}."
        )
    payload = np.frombuffer(data, dtype=np.uint8, offset=header_len)  # (prod(dims),)
    return payload.reshape(dims).copy()  # (*dims,) uint8


def _check_count(path: Path, count: int, split: str, official: bool) -> None:
    """Raise a DataError when an official file does not hold the official number of items."""
    if official and count != OFFICIAL_COUNTS[split]:
        raise DataError(
            f"{path} holds {count} items, the official {split} split has {OFFICIAL_COUNTS[split]}: "
            f"truncated or not the official file; {_FIX}."
        )


def _decode_images(path: Path, split: str, md5: str | None, official: bool) -> torch.Tensor:
    """Images of one IDX file, checked; shape (N, 28, 28), uint8."""
    images = _parse_idx(_read_bytes(path, md5), path, _IMAGES_MAGIC, ndim=3)  # (N, H, W)
    if images.shape[1:] != (IMAGE_SIDE, IMAGE_SIDE):
        raise DataError(
            f"{path} holds images of {images.shape[1]}x{images.shape[2]} pixels, expected "
            f"{IMAGE_SIDE}x{IMAGE_SIDE}: not an MNIST images file; {_FIX}."
        )
    _check_count(path, images.shape[0], split, official)
    return torch.from_numpy(images)  # (N, 28, 28) uint8


def _decode_labels(path: Path, split: str, md5: str | None, official: bool) -> torch.Tensor:
    """Labels of one IDX file, checked to lie in 0..9; shape (N,), uint8."""
    labels = _parse_idx(_read_bytes(path, md5), path, _LABELS_MAGIC, ndim=1)  # (N,)
    if labels.size and int(labels.max()) > 9:
        raise DataError(
            f"{path} holds label {int(labels.max())}, allowed 0..9: corrupt or the wrong file; "
            f"{_FIX}."
        )
    _check_count(path, labels.shape[0], split, official)
    return torch.from_numpy(labels)  # (N,) uint8


def _stamp(path: Path) -> _FileStamp:
    """The memo key of a file: path, size and modification time."""
    stat = path.stat()
    return _FileStamp(path, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_uint8(
    images: _FileStamp, labels: _FileStamp, folder: str, split: str, official: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode and check one split, memoised; shared tensors, never mutate them."""
    md5s = [OFFICIAL_MD5.get((folder, f.path.name)) if official else None for f in (images, labels)]
    pixels = _decode_images(images.path, split, md5s[0], official)  # (N, 28, 28) uint8
    targets = _decode_labels(labels.path, split, md5s[1], official)  # (M,) uint8
    if pixels.shape[0] != targets.shape[0]:
        raise DataError(
            f"{images.path} holds {pixels.shape[0]} images but {labels.path} holds "
            f"{targets.shape[0]} labels: one of them is truncated or from another split; {_FIX}."
        )
    return pixels, targets


def normalise_images(images: torch.Tensor) -> torch.Tensor:
    """Map uint8 pixels to [-1, 1] with ``x / 127.5 - 1`` (0 -> -1, 255 -> 1), adding a channel.

    Args:
        images: pixels, shape (N, H, W), uint8.

    Returns:
        A new tensor, shape (N, 1, H, W), float32.
    """
    return (images.to(torch.float32) / 127.5 - 1.0).unsqueeze(1)  # (N, H, W) -> (N, 1, H, W)


def load_images(
    dataset: str,
    split: str,
    root: str | Path | None = None,
    *,
    verify_official: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one split of MNIST or Fashion-MNIST from raw IDX files, checked.

    Decoded splits are memoised per file (path, size, mtime); every call returns fresh tensors,
    so a caller may modify them without affecting later calls.

    Args:
        dataset: ``"mnist"`` or ``"fashion_mnist"``.
        split: ``"train"`` (60,000 images) or ``"test"`` (10,000 images).
        root: folder holding ``MNIST/raw/`` or ``FashionMNIST/raw/``; None means
            ``$GEDI_NESY_DATA``, else the user cache (:func:`user_cache_dir`), where missing files
            are downloaded.
        verify_official: check that the files are the official release: md5 of ``.gz`` files and
            60,000/10,000 items. Set False only for non-official files such as small fakes in
            tests; the structural checks (magic, 28x28, byte length, labels 0..9, counts equal)
            always run.

    Returns:
        ``(images, labels)``: images shape (N, 1, 28, 28), float32 in [-1, 1]; labels shape (N,),
        int64 in 0..9.
    """
    folder = _check_choice(dataset, DATASET_FOLDERS, "dataset")
    _check_choice(split, SPLIT_PREFIXES, "split")
    images_path, labels_path = _split_files(dataset, split, root)
    pixels, targets = _load_uint8(
        _stamp(images_path), _stamp(labels_path), folder, split, verify_official
    )  # (N, 28, 28) uint8, (N,) uint8
    return normalise_images(pixels), targets.to(torch.int64)  # (N, 1, 28, 28), (N,)
