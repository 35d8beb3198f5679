"""Tests of the raw IDX reader on fake files in tmp_path (torchvision idiom); never download."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from gedi_nesy import data
from gedi_nesy.errors import DataError

N_FAKE = {"train": 7, "test": 5}
PREFIX = {"train": "train", "test": "t10k"}
IMAGES_MAGIC = 0x00000803
LABELS_MAGIC = 0x00000801
MNIST_TEST_LABEL_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
REAL_ROOT = os.environ.get("GEDI_NESY_DATA", "")


def fake_images(n: int) -> np.ndarray:
    """Pixels ``(31 * i + 28 * r + c) mod 256``: every value 0..255 occurs in each image."""
    i, r, c = np.meshgrid(np.arange(n), np.arange(28), np.arange(28), indexing="ij")
    return ((31 * i + 28 * r + c) % 256).astype(np.uint8)  # (n, 28, 28)


def fake_labels(n: int, offset: int = 0) -> np.ndarray:
    """Labels ``(3 * i + offset) mod 10``."""
    return ((3 * np.arange(n) + offset) % 10).astype(np.uint8)  # (n,)


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """IDX encoding: big-endian int32 magic and dims, then the uint8 payload."""
    header = np.array([magic, *array.shape], dtype=">i4").tobytes()
    return header + array.astype(np.uint8).tobytes()


def write_file(path: Path, blob: bytes, compressed: bool) -> Path:
    """Write ``blob`` to ``path`` (+ ``.gz`` when compressed) and return the written path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    target = path.with_name(path.name + ".gz") if compressed else path
    target.write_bytes(gzip.compress(blob) if compressed else blob)
    return target


def make_fake(
    root: Path, folder: str = "MNIST", compressed: bool = True, offset: int = 0
) -> dict[str, Path]:
    """Fake ``<root>/<folder>/raw/`` with 7 train and 5 test items; returns the written paths."""
    raw = root / folder / "raw"
    paths = {}
    for split, n in N_FAKE.items():
        images = idx_bytes(fake_images(n), IMAGES_MAGIC)
        labels = idx_bytes(fake_labels(n, offset), LABELS_MAGIC)
        paths[f"{split}-images"] = write_file(
            raw / f"{PREFIX[split]}-images-idx3-ubyte", images, compressed
        )
        paths[f"{split}-labels"] = write_file(
            raw / f"{PREFIX[split]}-labels-idx1-ubyte", labels, compressed
        )
    return paths


def load_fake(dataset: str, split: str, root: Path | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``load_images`` without the official-release checks, which fake files cannot pass."""
    return data.load_images(dataset, split, root, verify_official=False)


@pytest.fixture(autouse=True)
def no_download(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, Path]]:
    """Replace the downloader by one that records its calls and fails as if offline."""
    calls: list[tuple[str, Path]] = []

    def offline(dataset: str, root: str | Path) -> None:
        calls.append((dataset, Path(root)))
        raise OSError("network is unreachable")

    monkeypatch.setattr(data, "download", offline)
    return calls


@pytest.mark.parametrize("compressed", [True, False])
@pytest.mark.parametrize("split", ["train", "test"])
def test_decodes_exact_values(tmp_path: Path, compressed: bool, split: str) -> None:
    make_fake(tmp_path, compressed=compressed)
    images, labels = load_fake("mnist", split, tmp_path)
    n = N_FAKE[split]
    assert images.shape == (n, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (n,) and labels.dtype == torch.int64
    expected = torch.from_numpy(fake_images(n)).float().unsqueeze(1) / 127.5 - 1.0
    assert torch.equal(images, expected)
    assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert images[0, 0, 0, 0].item() == -1.0  # pixel 0 -> -1
    assert images[0, 0, 9, 3].item() == 1.0  # pixel 28 * 9 + 3 = 255 -> 1
    assert labels.tolist() == fake_labels(n).tolist()


def test_normalise_images_endpoints() -> None:
    pixels = torch.tensor([[[0, 255], [51, 204]]], dtype=torch.uint8)  # (1, 2, 2)
    out = data.normalise_images(pixels)
    assert out.shape == (1, 1, 2, 2)
    assert out.flatten().tolist() == pytest.approx([-1.0, 1.0, -0.6, 0.6], abs=1e-7)


def test_fashion_mnist_reads_its_folder(tmp_path: Path) -> None:
    make_fake(tmp_path, folder="FashionMNIST", offset=4)
    _, labels = load_fake("fashion_mnist", "test", tmp_path)
    assert labels.tolist() == fake_labels(5, offset=4).tolist()
    with pytest.raises(DataError, match="MNIST/raw"):
        load_fake("mnist", "test", tmp_path)


def test_gz_preferred_when_both_present(tmp_path: Path) -> None:
    make_fake(tmp_path, compressed=True, offset=1)
    make_fake(tmp_path, compressed=False, offset=2)
    _, labels = load_fake("mnist", "test", tmp_path)
    assert labels.tolist() == fake_labels(5, offset=1).tolist()


def test_returned_tensors_do_not_share_memory_across_calls(tmp_path: Path) -> None:
    make_fake(tmp_path)
    images, labels = load_fake("mnist", "train", tmp_path)
    images.fill_(0.5)
    labels.fill_(7)
    images2, labels2 = load_fake("mnist", "train", tmp_path)
    assert images2[0, 0, 0, 0].item() == -1.0
    assert labels2.tolist() == fake_labels(7).tolist()


def test_rewritten_file_is_read_again(tmp_path: Path) -> None:
    paths = make_fake(tmp_path)
    load_fake("mnist", "test", tmp_path)
    write_file(
        paths["test-labels"].with_suffix(""), idx_bytes(fake_labels(5, 9), LABELS_MAGIC), True
    )
    os.utime(paths["test-labels"], ns=(0, 0))  # new mtime even on coarse clocks
    _, labels = load_fake("mnist", "test", tmp_path)
    assert labels.tolist() == fake_labels(5, 9).tolist()


def test_root_precedence_argument_env_cache(tmp_path: Path, monkeypatch) -> None:
    explicit, env, xdg = tmp_path / "explicit", tmp_path / "env", tmp_path / "xdg"
    make_fake(explicit, offset=1)
    make_fake(env, offset=2)
    make_fake(xdg / "gedi_nesy", offset=3)
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    monkeypatch.setenv("GEDI_NESY_DATA", str(env))
    assert data.resolve_root(explicit) == explicit
    assert data.resolve_root(str(explicit)) == explicit
    assert data.resolve_root(None) == env
    assert load_fake("mnist", "test", explicit)[1].tolist() == fake_labels(5, 1).tolist()
    assert load_fake("mnist", "test", None)[1].tolist() == fake_labels(5, 2).tolist()
    monkeypatch.delenv("GEDI_NESY_DATA")
    assert data.resolve_root(None) == xdg / "gedi_nesy"
    assert load_fake("mnist", "test", None)[1].tolist() == fake_labels(5, 3).tolist()


def test_cache_defaults_to_home(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("GEDI_NESY_DATA", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert data.resolve_root(None) == tmp_path / ".cache" / "gedi_nesy"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")  # XDG spec: ignore relative paths
    assert data.resolve_root(None) == tmp_path / ".cache" / "gedi_nesy"


@pytest.mark.parametrize("via_env", [False, True])
def test_missing_files_named_no_download(
    tmp_path: Path, monkeypatch, no_download: list, via_env: bool
) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("GEDI_NESY_DATA", str(tmp_path))
    with pytest.raises(DataError) as info:
        load_fake("mnist", "train", None if via_env else tmp_path)
    message = str(info.value)
    assert "\n" not in message
    for name in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
        assert f"{name}-ubyte" in message
    assert str(tmp_path / "MNIST" / "raw") in message
    assert "GEDI_NESY_DATA" in message
    assert no_download == []


def test_only_missing_split_matters(tmp_path: Path) -> None:
    paths = make_fake(tmp_path)
    paths["train-images"].unlink()
    assert load_fake("mnist", "test", tmp_path)[1].shape == (5,)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\[\.gz\] missing"):
        load_fake("mnist", "train", tmp_path)


def test_cache_download_failure_is_one_line_data_error(
    tmp_path: Path, monkeypatch, no_download: list
) -> None:
    monkeypatch.delenv("GEDI_NESY_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(DataError) as info:
        load_fake("fashion_mnist", "test", None)
    message = str(info.value)
    assert "\n" not in message and "network is unreachable" in message
    assert "GEDI_NESY_DATA" in message and "t10k-labels-idx1-ubyte" in message
    assert str(tmp_path / "gedi_nesy" / "FashionMNIST" / "raw") in message
    assert no_download == [("fashion_mnist", tmp_path / "gedi_nesy")]


def test_cache_downloads_once_when_missing(tmp_path: Path, monkeypatch) -> None:
    calls = []

    def fake_download(dataset: str, root: str | Path) -> None:
        calls.append(dataset)
        make_fake(Path(root), compressed=False, offset=5)

    monkeypatch.delenv("GEDI_NESY_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(data, "download", fake_download)
    assert load_fake("mnist", "test", None)[1].tolist() == fake_labels(5, 5).tolist()
    assert load_fake("mnist", "train", None)[1].tolist() == fake_labels(7, 5).tolist()
    assert calls == ["mnist"]


def test_read_only_folder_untouched(tmp_path: Path) -> None:
    root = tmp_path / "ro"
    make_fake(root, compressed=True)
    make_fake(root, folder="FashionMNIST", compressed=False)
    folders = [root, root / "MNIST", root / "MNIST" / "raw"]
    folders += [root / "FashionMNIST", root / "FashionMNIST" / "raw"]
    before = sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*"))
    for folder in reversed(folders):
        folder.chmod(0o555)
    try:
        assert load_fake("mnist", "train", root)[0].shape == (7, 1, 28, 28)
        assert load_fake("fashion_mnist", "test", root)[0].shape == (5, 1, 28, 28)
    finally:
        for folder in folders:
            folder.chmod(stat.S_IRWXU)
    assert sorted((str(p), p.stat().st_mtime_ns) for p in root.rglob("*")) == before


def test_truncated_gzip(tmp_path: Path) -> None:
    paths = make_fake(tmp_path)
    blob = paths["test-images"].read_bytes()
    paths["test-images"].write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz is not a valid gzip"):
        load_fake("mnist", "test", tmp_path)


def test_not_gzip_at_all(tmp_path: Path) -> None:
    paths = make_fake(tmp_path)
    paths["train-labels"].write_bytes(b"this is not gzip")
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz is not a valid gzip"):
        load_fake("mnist", "train", tmp_path)


@pytest.mark.parametrize("compressed", [True, False])
def test_bad_magic(tmp_path: Path, compressed: bool) -> None:
    make_fake(tmp_path, compressed=compressed)
    blob = idx_bytes(fake_images(5), IMAGES_MAGIC + 0x0100)  # dtype code 0x09 instead of 0x08
    written = write_file(tmp_path / "MNIST/raw/t10k-images-idx3-ubyte", blob, compressed)
    with pytest.raises(DataError) as info:
        load_fake("mnist", "test", tmp_path)
    assert str(written) in str(info.value) and "0x00000903" in str(info.value)
    assert "download it again" in str(info.value)


@pytest.mark.parametrize("cut", [3, 100])
def test_truncated_uncompressed(tmp_path: Path, cut: int) -> None:
    paths = make_fake(tmp_path, compressed=False)
    blob = paths["train-images"].read_bytes()
    paths["train-images"].write_bytes(blob[:cut])
    with pytest.raises(DataError, match="train-images-idx3-ubyte has .*truncated"):
        load_fake("mnist", "train", tmp_path)


def test_trailing_bytes(tmp_path: Path) -> None:
    paths = make_fake(tmp_path, compressed=False)
    paths["test-labels"].write_bytes(paths["test-labels"].read_bytes() + b"\x00")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte has 14 bytes.*needs exactly 13"):
        load_fake("mnist", "test", tmp_path)


def test_wrong_image_size(tmp_path: Path) -> None:
    make_fake(tmp_path)
    blob = idx_bytes(np.zeros((5, 27, 28), dtype=np.uint8), IMAGES_MAGIC)
    write_file(tmp_path / "MNIST/raw/t10k-images-idx3-ubyte", blob, True)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz holds images of 27x28"):
        load_fake("mnist", "test", tmp_path)


def test_label_out_of_range(tmp_path: Path) -> None:
    make_fake(tmp_path)
    labels = fake_labels(7)
    labels[3] = 10
    write_file(
        tmp_path / "MNIST/raw/train-labels-idx1-ubyte", idx_bytes(labels, LABELS_MAGIC), True
    )
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.gz holds label 10, allowed 0..9"):
        load_fake("mnist", "train", tmp_path)


def test_count_mismatch(tmp_path: Path) -> None:
    make_fake(tmp_path)
    blob = idx_bytes(fake_labels(4), LABELS_MAGIC)
    write_file(tmp_path / "MNIST/raw/t10k-labels-idx1-ubyte", blob, True)
    with pytest.raises(DataError) as info:
        load_fake("mnist", "test", tmp_path)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz holds 5 images" in message
    assert "t10k-labels-idx1-ubyte.gz holds 4 labels" in message


def test_wrong_md5(tmp_path: Path) -> None:
    make_fake(tmp_path, compressed=True)
    with pytest.raises(DataError) as info:
        data.load_images("mnist", "test", tmp_path)
    message = str(info.value)
    assert "t10k-images-idx3-ubyte.gz has md5" in message
    assert "9fb629c4189551a2d022fa330f9573f3" in message and "download it again" in message


def test_uncompressed_needs_official_count(tmp_path: Path) -> None:
    make_fake(tmp_path, compressed=False)
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte holds 5 items.* has 10000"):
        data.load_images("mnist", "test", tmp_path)


@pytest.mark.parametrize(
    ("dataset", "split", "allowed"),
    [("cifar10", "train", "'mnist', 'fashion_mnist'"), ("mnist", "val", "'train', 'test'")],
)
def test_unknown_dataset_or_split(tmp_path: Path, dataset: str, split: str, allowed: str) -> None:
    with pytest.raises(DataError, match=f"allowed: {allowed}"):
        data.load_images(dataset, split, tmp_path)


@pytest.mark.skipif(not REAL_ROOT, reason="set GEDI_NESY_DATA to a folder holding MNIST/raw/")
def test_real_mnist() -> None:
    train_images, train_labels = data.load_images("mnist", "train")
    test_images, test_labels = data.load_images("mnist", "test")
    assert train_images.shape == (60000, 1, 28, 28) and train_labels.shape == (60000,)
    assert test_images.shape == (10000, 1, 28, 28) and test_labels.shape == (10000,)
    for images in (train_images, test_images):
        assert images.min().item() == -1.0 and images.max().item() == 1.0
    assert torch.bincount(test_labels, minlength=10).tolist() == MNIST_TEST_LABEL_COUNTS
