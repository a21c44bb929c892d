"""MNIST loading: the embedded digits, IDX parsing with clear errors, and the download over loopback."""

import gzip
import hashlib
import http.server
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from backforward.experiments.cli import main
from backforward.experiments.data import DataError, download, load_embedded, load_idx_dir, normalize


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train=6, n_val=4, gz=False, **override) -> Path:
    rng = np.random.default_rng(0)
    files = {
        "train-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_train, 28, 28))),
        "train-labels-idx1-ubyte": idx_bytes(np.arange(n_train) % 10),
        "t10k-images-idx3-ubyte": idx_bytes(rng.integers(0, 256, (n_val, 28, 28))),
        "t10k-labels-idx1-ubyte": idx_bytes(np.arange(n_val) % 10),
    }
    files.update(override)
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        if data is None:
            continue
        if gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return folder


def test_embedded_split_is_fixed_stratified_and_normalized():
    a, b = load_embedded(), load_embedded()
    assert len(a.y_train) == 4000 and len(a.y_val) == 1000
    assert torch.equal(a.y_train, b.y_train) and torch.equal(a.x_val, b.x_val)
    assert torch.bincount(a.y_train).tolist() == [400] * 10
    assert torch.bincount(a.y_val).tolist() == [100] * 10
    assert a.x_train.shape == (4000, 784) and a.x_train.dtype == torch.float32
    # Normalization: 0 -> -0.1307/0.3081, 255 -> (1-0.1307)/0.3081.
    assert normalize(np.array([[0, 255]])).tolist()[0] == pytest.approx([-0.42421, 2.82149], abs=1e-4)


@pytest.mark.parametrize("layout", ["plain", "gz", "torchvision"])
def test_idx_directory_layouts(tmp_path, layout):
    folder = tmp_path / "MNIST" / "raw" if layout == "torchvision" else tmp_path
    write_mnist(folder, gz=layout != "plain")
    split = load_idx_dir(tmp_path)
    assert split.x_train.shape == (6, 784) and split.y_val.tolist() == [0, 1, 2, 3]


def bad_cases():
    good = idx_bytes(np.zeros((6, 28, 28)))
    yield "missing", {"train-labels-idx1-ubyte": None}, "train-labels-idx1-ubyte: missing"
    yield "magic", {"train-images-idx3-ubyte": b"\x00\x00\x09\x03" + good[4:]}, "wrong magic number"
    yield "dims", {"train-images-idx3-ubyte": idx_bytes(np.zeros((6, 28)))}, "has 2 dimensions, expected 3"
    yield "truncated", {"train-images-idx3-ubyte": good[:-100]}, "truncated"
    yield "count", {"train-labels-idx1-ubyte": idx_bytes(np.zeros(5))}, "5 labels for 6 images"
    yield "range", {"t10k-labels-idx1-ubyte": idx_bytes(np.array([0, 1, 12, 3]))}, "label 12 out of range"
    yield "size", {"train-images-idx3-ubyte": idx_bytes(np.zeros((6, 14, 14)))}, "images are 14x14"
    yield "no images", {"train-images-idx3-ubyte": idx_bytes(np.zeros((0, 28, 28))),
                        "train-labels-idx1-ubyte": idx_bytes(np.zeros(0))}, \
        "train-images-idx3-ubyte: holds no images: its header counts 0"
    yield "no labels", {"t10k-labels-idx1-ubyte": idx_bytes(np.zeros(0))}, \
        "t10k-labels-idx1-ubyte: holds no labels: its header counts 0"


@pytest.mark.parametrize("case", list(bad_cases()), ids=lambda c: c[0])
def test_bad_data_is_one_clear_line_and_exit_2(tmp_path, capsys, case):
    _, override, message = case
    write_mnist(tmp_path, **override)
    with pytest.raises(DataError, match=message):
        load_idx_dir(tmp_path)
    assert main(["train", "--data-dir", str(tmp_path), "--epochs", "1", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message.split(":")[0] in err and str(tmp_path) in err
    assert main(["data", "check", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == err


def test_unreadable_gzip(tmp_path):
    write_mnist(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte.gz: unreadable"):
        load_idx_dir(tmp_path)


@pytest.fixture
def mirror(tmp_path):
    """A loopback HTTP server over a folder of fake gzipped IDX files, and their MD5s."""
    served = tmp_path / "served"
    write_mnist(served, gz=True)
    sums = {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in sorted(served.iterdir())}

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/", sums, served
    server.shutdown()
    server.server_close()


def test_download_checks_and_writes_atomically(tmp_path, mirror):
    url, sums, _ = mirror
    target = tmp_path / "mnist"
    written = download(target, url, sums)
    assert sorted(p.name for p in written) == sorted(sums)
    assert sorted(p.name for p in target.iterdir()) == sorted(sums)  # no temporary files left behind
    assert len(load_idx_dir(target).y_train) == 6


def test_download_rejects_a_bad_checksum_and_leaves_nothing(tmp_path, mirror):
    url, sums, _ = mirror
    wrong = dict(sums, **{"train-images-idx3-ubyte.gz": "0" * 32})
    with pytest.raises(DataError, match="checksum mismatch"):
        download(tmp_path / "mnist", url, wrong)
    assert not (tmp_path / "mnist" / "train-images-idx3-ubyte.gz").exists()


def test_download_command_reports_an_unreachable_mirror(tmp_path, capsys):
    assert main(["data", "download", "--to", str(tmp_path), "--mirror", "http://127.0.0.1:9/"]) == 2
    assert "download failed" in capsys.readouterr().err


def test_the_source_names_the_folder_resolved_so_toy_json_is_reused_only_for_the_same_folder(tmp_path, monkeypatch):
    write_mnist(tmp_path / "a" / "idx")
    monkeypatch.chdir(tmp_path / "a")
    assert load_idx_dir("./idx/").source == f"IDX files in {(tmp_path / 'a' / 'idx').resolve()}"
