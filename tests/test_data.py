"""Datasets without torchvision or the internet: idx files we generate, a download server on 127.0.0.1."""

import functools
import hashlib
import http.server
import json
import threading

import numpy as np
import pytest
import torch

from helpers import SMALL, pcsweep
from pcsweep.data import datasets as data
from pcsweep.data.datasets import DatasetError, load_idx_dataset, read_idx, write_idx


def make_idx_dataset(folder, n_train=300, n_test=100, compress=True, seed=0):
    """MNIST-shaped files whose labels are learnable: each class lights up its own band of pixels."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, n).astype(np.uint8)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label : 2 * label + 3, :] = 255
        suffix = ".gz" if compress else ""
        write_idx(folder / f"{prefix}-images-idx3-ubyte{suffix}", images, compress)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte{suffix}", labels, compress)
    return folder


@pytest.mark.parametrize("compress", [True, False])
def test_idx_reader_roundtrip(tmp_path, compress):
    array = np.random.default_rng(0).integers(0, 255, (4, 28, 28)).astype(np.uint8)
    write_idx(tmp_path / "x", array, compress)
    assert np.array_equal(read_idx(tmp_path / "x"), array)
    floats = np.random.default_rng(1).standard_normal((3, 5)).astype(np.float32)
    write_idx(tmp_path / "f", floats)
    assert np.array_equal(read_idx(tmp_path / "f"), floats)


def test_idx_reader_rejects_truncated_and_foreign_files(tmp_path):
    write_idx(tmp_path / "x", np.zeros((4, 28, 28), np.uint8))
    (tmp_path / "short").write_bytes((tmp_path / "x").read_bytes()[:-10])
    with pytest.raises(DatasetError, match="truncated"):
        read_idx(tmp_path / "short")
    (tmp_path / "png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(DatasetError, match="not an idx file"):
        read_idx(tmp_path / "png")


@pytest.mark.parametrize("compress", [True, False])
def test_load_idx_dataset_gives_flat_unit_range_tensors(tmp_path, compress):
    make_idx_dataset(tmp_path, compress=compress)
    ds = load_idx_dataset("mnist", tmp_path)
    assert ds.train.inputs.shape == (300, 784) and ds.test.inputs.shape == (100, 784)
    assert ds.train.inputs.dtype == torch.float32 and 0 <= ds.train.inputs.min() and ds.train.inputs.max() == 1
    assert ds.train.labels.dtype == torch.int64 and set(ds.train.labels.tolist()) <= set(range(10))


def test_missing_files_give_one_clear_error(tmp_path):
    with pytest.raises(DatasetError) as info:
        data.check_available("fashion_mnist", tmp_path, download=False)
    message = str(info.value)
    assert (
        str(tmp_path) in message and "train-images-idx3-ubyte[.gz]" in message and "t10k-labels-idx1-ubyte" in message
    )
    assert "dataset.download=true" in message and "\n" not in message


@pytest.fixture
def idx_server(tmp_path):
    """Serve a folder on 127.0.0.1; yields (folder, base_url)."""
    served = tmp_path / "served"
    served.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield served, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def publish(served, monkeypatch, name="mnist"):
    """Generated .gz files on the server, registered as the published checksums."""
    make_idx_dataset(served, compress=True)
    sums = {stem: hashlib.md5((served / f"{stem}.gz").read_bytes()).hexdigest() for stem in data.IDX_FILES[name]}
    monkeypatch.setitem(data.IDX_FILES, name, sums)


def test_download_from_a_mirror_verifies_and_loads(tmp_path, idx_server, monkeypatch):
    served, url = idx_server
    publish(served, monkeypatch)
    target = tmp_path / "data"
    ds = load_idx_dataset("mnist", target, download=True, mirrors=["http://127.0.0.1:9/dead/", url])
    assert len(ds.train) == 300
    assert sorted(p.name for p in target.iterdir()) == sorted(f"{s}.gz" for s in data.IDX_FILES["mnist"])


def test_a_corrupted_download_is_rejected_and_nothing_is_left_behind(tmp_path, idx_server, monkeypatch):
    served, url = idx_server
    publish(served, monkeypatch)
    corrupted = served / "train-labels-idx1-ubyte.gz"
    corrupted.write_bytes(corrupted.read_bytes()[:-3] + b"xyz")
    target = tmp_path / "data"
    with pytest.raises(DatasetError, match="checksum mismatch"):
        data.download_idx("mnist", target, [url])
    assert "train-labels-idx1-ubyte.gz" not in {p.name for p in target.iterdir()}
    assert not [p for p in target.iterdir() if p.name.endswith(".part")]


def test_offline_sweep_on_missing_files_fails_before_any_training(tmp_path):
    result = pcsweep(
        tmp_path, "-m", *SMALL, "dataset=mnist,fashion_mnist", env={"PCSWEEP_DATA_DIR": str(tmp_path / "nodata")}
    )
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "files not found" in lines[0] and "train-images-idx3-ubyte" in lines[0]
    assert not list(tmp_path.rglob("metrics.csv"))


@pytest.mark.slow
def test_sweep_over_mnist_and_fashion_mnist_from_local_idx_files(tmp_path):
    for name in ("mnist", "fashion_mnist"):
        make_idx_dataset(tmp_path / "data" / name, n_train=1280, compress=name == "mnist")
    result = pcsweep(
        tmp_path,
        "-m",
        *SMALL,
        "optimizer.lr=0.01",
        "algo=bp,pc",
        "dataset=mnist,fashion_mnist",
        "relax=none,2",
        env={"PCSWEEP_DATA_DIR": str(tmp_path / "data")},
    )
    assert result.returncode == 0, result.stderr
    sweep = tmp_path / "multirun" / "default"
    names = sorted(p.name.rsplit("-", 1)[0] for p in sweep.iterdir() if (p / "summary.json").is_file())
    assert names == sorted(
        f"{m}_{d}" for m in ("bp_24_3", "pc_24_3", "pc_24_3_rc2") for d in ("mnist", "fashion_mnist")
    )
    summary = json.loads(next(sweep.glob("bp_24_3_mnist-*/summary.json")).read_text())
    assert summary["final_test_acc"] > 0.5  # the bands are easy: training really happened on these files
