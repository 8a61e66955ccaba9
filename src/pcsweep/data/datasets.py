"""Datasets as tensors on the training device: sklearn's bundled digits, MNIST and FashionMNIST from idx files.

No torchvision: the idx format is a 4-byte magic, the dimensions, then raw bytes; we read it ourselves.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import struct
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, cast

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor

from pcsweep.config.errors import UserError

# The four standard files of each idx dataset with the md5 of their .gz as published (the same as torchvision's).
IDX_FILES: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion_mnist": {
        "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}
BUNDLED = ("digits", "digits28")  # made from scikit-learn's digits: no files, no download
DATASETS = BUNDLED + tuple(IDX_FILES)

_IDX_DTYPES: dict[int, npt.DTypeLike] = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: ">i2",
    0x0C: ">i4",
    0x0D: ">f4",
    0x0E: ">f8",
}


class DatasetError(UserError, RuntimeError):
    """A dataset that cannot be read or fetched; the message says what to do."""


@dataclass
class Split:
    inputs: Tensor  # (N, features) float in [0, 1]
    labels: Tensor  # (N,) int64

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> Split:
        return Split(self.inputs.to(device=device, dtype=dtype), self.labels.to(device))

    def __len__(self) -> int:
        return self.labels.shape[0]


@dataclass
class Dataset:
    name: str
    train: Split
    test: Split
    num_classes: int
    val: Optional[Split] = None  # held out of the training split (dataset.val_fraction): what tuning reads

    @property
    def num_features(self) -> int:
        return self.train.inputs.shape[1]


# ------------------------------------------------------------------------------------------------ idx format
def read_idx(path: Path | str) -> np.ndarray:
    """Read an idx file, gzipped (by its magic bytes, whatever its name) or raw."""
    path = Path(path)
    with open(path, "rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    with opener(path, "rb") as fh:
        data = fh.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path} is not an idx file (bad magic number)")
    dtype, ndim = np.dtype(_IDX_DTYPES[data[2]]), data[3]
    shape = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = data[4 + 4 * ndim :]
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(body) != expected:
        raise DatasetError(f"{path} is truncated or corrupt: {len(body)} data bytes, expected {expected}")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def write_idx(path: Path | str, array: np.ndarray, compress: bool = False) -> None:
    """Write an idx file (the tests build small MNIST-shaped datasets with it)."""
    matches = [
        (code, np.dtype(dt))
        for code, dt in _IDX_DTYPES.items()
        if np.dtype(dt).kind == array.dtype.kind and np.dtype(dt).itemsize == array.dtype.itemsize
    ]
    if not matches:
        raise ValueError(f"idx cannot hold dtype {array.dtype}")
    code, big_endian = matches[0]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open if compress else open)(path, "wb") as fh:
        fh.write(header + array.astype(big_endian).tobytes())


def _find_idx_file(data_dir: Path, stem: str) -> Optional[Path]:
    for candidate in (data_dir / f"{stem}.gz", data_dir / stem):
        if candidate.is_file():
            return candidate
    return None


def missing_idx_files(name: str, data_dir: Path | str) -> list[str]:
    return [stem for stem in IDX_FILES[name] if _find_idx_file(Path(data_dir), stem) is None]


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_idx(name: str, data_dir: Path | str, mirrors: Sequence[str], timeout: float = 30.0) -> None:
    """Fetch the missing .gz files of ``name`` into ``data_dir``, trying each mirror in turn.

    Each file is written to a temporary name in ``data_dir``, checked against its md5, and only then renamed into
    place: an interrupted or corrupted download never leaves a file that looks complete.
    """
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    for stem in missing_idx_files(name, data_dir):
        filename, expected = f"{stem}.gz", IDX_FILES[name][stem]
        problems = []
        for mirror in mirrors:
            url = mirror.rstrip("/") + "/" + filename
            fd, tmp_name = tempfile.mkstemp(prefix=f".{filename}.", suffix=".part", dir=data_dir)
            tmp = Path(tmp_name)
            try:
                with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
                    shutil.copyfileobj(response, out)
                actual = _md5(tmp)
                if actual != expected:
                    problems.append(f"{url}: checksum mismatch (md5 {actual}, expected {expected})")
                    continue
                tmp.replace(data_dir / filename)
                break
            except (urllib.error.URLError, OSError) as exc:
                problems.append(f"{url}: {getattr(exc, 'reason', exc)}")
            finally:
                tmp.unlink(missing_ok=True)
        else:
            raise DatasetError(f"could not download {filename} for {name}: " + "; ".join(problems))


def check_available(name: str, data_dir: Path | str, download: bool) -> None:
    """Raise one clear error, before any training, if the files are absent and may not be fetched."""
    if name in BUNDLED:
        return
    if name not in IDX_FILES:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    missing = missing_idx_files(name, data_dir)
    if missing and not download:
        raise DatasetError(
            f"{name} files not found in {Path(data_dir).resolve()}: missing "
            + ", ".join(f"{m}[.gz]" for m in missing)
            + "; put them there or add dataset.download=true"
        )


# ------------------------------------------------------------------------------------------------ loaders
def load_digits(test_fraction: float = 0.2) -> Dataset:
    """sklearn's 8x8 digits scaled to [0, 1], with a fixed stratified split (the same for every run)."""
    # scikit-learn takes about a second to import: only the bundled datasets pay it
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    inputs = bunch.data.astype(np.float32) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(
        inputs, bunch.target, test_size=test_fraction, random_state=0, stratify=bunch.target
    )
    return Dataset(
        "digits",
        Split(torch.from_numpy(x_tr), torch.from_numpy(y_tr).long()),
        Split(torch.from_numpy(x_te), torch.from_numpy(y_te).long()),
        num_classes=10,
    )


def _distort(images: Tensor, count: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """``count`` random draws of 8x8 images, each upsampled to 20x20, rotated (+-15 deg), scaled (0.85-1.15),
    sheared, placed at a random offset in a 28x28 frame (as MNIST centres its digits in 20x20 boxes), plus noise."""
    pick = torch.randint(0, images.shape[0], (count,), generator=gen)
    big = F.interpolate(images[pick].view(-1, 1, 8, 8), size=(20, 20), mode="bilinear", align_corners=False)
    big = F.pad(big, (4, 4, 4, 4))
    angle = (torch.rand(count, generator=gen) - 0.5) * math.radians(30)
    scale = 0.85 + 0.3 * torch.rand(count, generator=gen)
    shear = (torch.rand(count, generator=gen) - 0.5) * 0.3
    shift = (torch.rand(count, 2, generator=gen) - 0.5) * (8 / 14)  # +-4 pixels in grid units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin + shear, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (count, 1, 28, 28), align_corners=False)  # type: ignore[arg-type]  # any int sequence
    out = F.grid_sample(big, grid, align_corners=False, padding_mode="zeros").view(count, 784)
    out = (out + 0.05 * torch.randn(out.shape, generator=gen)).clamp_(0.0, 1.0)
    return out, pick


def load_digits28(
    train_size: int = 60000, test_size: int = 10000, test_fraction: float = 0.2, seed: int = 0
) -> Dataset:
    """An MNIST-shaped check set made offline from the bundled digits: 784 inputs, MNIST's split sizes (938 batches
    of 64 per epoch). Train and test images are distorted copies of disjoint digits (the fixed digits split)."""
    base = load_digits(test_fraction)
    gen = torch.Generator().manual_seed(seed)
    train_x, train_pick = _distort(base.train.inputs, train_size, gen)
    test_x, test_pick = _distort(base.test.inputs, test_size, gen)
    return Dataset(
        "digits28",
        Split(train_x, base.train.labels[train_pick]),
        Split(test_x, base.test.labels[test_pick]),
        num_classes=10,
    )


def load_idx_dataset(name: str, data_dir: Path | str, download: bool = False, mirrors: Sequence[str] = ()) -> Dataset:
    data_dir = Path(data_dir)
    if download and missing_idx_files(name, data_dir):
        download_idx(name, data_dir, mirrors)
    check_available(name, data_dir, download=False)

    def split(prefix: str) -> Split:
        # check_available above: both files are there
        images = read_idx(cast(Path, _find_idx_file(data_dir, f"{prefix}-images-idx3-ubyte")))
        labels = read_idx(cast(Path, _find_idx_file(data_dir, f"{prefix}-labels-idx1-ubyte")))
        if images.shape[0] != labels.shape[0]:
            raise DatasetError(f"{name} {prefix}: {images.shape[0]} images but {labels.shape[0]} labels")
        flat = torch.from_numpy(images.reshape(images.shape[0], -1).astype(np.float32) / 255.0)
        return Split(flat, torch.from_numpy(labels.astype(np.int64)))

    return Dataset(name, split("train"), split("t10k"), num_classes=10)


def load_dataset(settings) -> Dataset:
    """From the dataset settings (``pcsweep.config.settings.DatasetSettings``)."""
    if settings.name == "digits":
        dataset = load_digits(settings.test_fraction)
    elif settings.name == "digits28":
        dataset = load_digits28(
            settings.train_size or 60000, settings.test_size or 10000, settings.test_fraction, settings.seed
        )
    else:
        dataset = load_idx_dataset(settings.name, settings.data_dir, settings.download, list(settings.mirrors))
    return hold_out_validation(dataset, settings.val_fraction)


def hold_out_validation(dataset: Dataset, fraction: float) -> Dataset:
    """Move ``fraction`` of the training split (a fixed random subset: the same for every twin, seed and width) into
    a validation split, so that choosing hyperparameters never reads the test set. 0: no validation split."""
    count = round(fraction * len(dataset.train))
    if count == 0:
        return dataset
    order = torch.randperm(len(dataset.train), generator=torch.Generator().manual_seed(0))
    val, train = order[:count], order[count:]
    pick = lambda split, idx: Split(split.inputs[idx], split.labels[idx])
    return Dataset(
        dataset.name, pick(dataset.train, train), dataset.test, dataset.num_classes, val=pick(dataset.train, val)
    )
