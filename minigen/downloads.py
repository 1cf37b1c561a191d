"""The real datasets: MNIST, Fashion-MNIST and CIFAR-10, downloaded once and checked.

Files come from their official mirrors into ``cache_dir()/<name>`` and are verified against
their published MD5 checksums (the values torchvision checks); a file that fails is fetched
again once, and where downloading is impossible the error says where to put the file by
hand. `read_idx` parses MNIST's IDX format, `read_cifar_batch` CIFAR's pickled batches with an
unpickler that allows only numpy arrays, never arbitrary code.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import tarfile
import tempfile
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch

from minigen.data import ImageDataset, cache_dir

# ----------------------------------------------------------------------------- real datasets


class DownloadError(RuntimeError):
    """A real dataset could not be downloaded or failed its checksum."""


MNIST_CLASSES = [str(d) for d in range(10)]
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]

# Official file names and their published MD5s (the same values torchvision checks).
_REAL = {
    "mnist": {
        "mirrors": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
        "files": {
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
    },
    "fashion-mnist": {
        "mirrors": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
        "files": {
            "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
        },
    },
    "cifar10": {
        "mirrors": ["https://www.cs.toronto.edu/~kriz/"],
        "files": {"cifar-10-python.tar.gz": "c58f30108f718f92721af3b95e74349a"},
        "members": {  # inside the archive, under cifar-10-batches-py/
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
    },
}


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, dest: Path, timeout: float = 30.0) -> None:
    """Stream ``url`` into ``dest``. Raises OSError (URLError, timeouts) when offline."""
    with urllib.request.urlopen(url, timeout=timeout) as r, open(dest, "wb") as f:
        while block := r.read(1 << 20):
            f.write(block)


def _by_hand(name: str, folder: Path) -> str:
    spec = _REAL[name]
    files = ", ".join(spec["files"])
    url = spec["mirrors"][0] + next(iter(spec["files"]))
    return (f"To use {name} offline, download {files} on a connected machine (e.g. from {url}) "
            f"and place the file(s) in {folder}/ under exactly those names"
            + (" (the extracted cifar-10-batches-py/ folder works too)" if name == "cifar10" else "")
            + ". Or use a built-in "
            "dataset that needs no download: load_dataset('shapes') or load_dataset('digits').")


def _ensure_file(name: str, folder: Path, filename: str, download: bool) -> Path:
    """Return the verified path of one official file, downloading it if needed."""
    spec = _REAL[name]
    md5 = spec["files"][filename]
    path = folder / filename
    problem = None
    if path.exists():
        got = _md5(path)
        if got == md5:
            return path
        problem = (f"{path} has MD5 {got} but the published checksum is {md5} "
                   "(a truncated download or a different file); it is not used")
        if not download:
            raise DownloadError(f"{problem}. Delete it. " + _by_hand(name, folder))
        warnings.warn(problem + "; downloading it again")
    elif not download:
        raise DownloadError(f"{name}: {path} not found and download=False. " + _by_hand(name, folder))

    folder.mkdir(parents=True, exist_ok=True)
    errors = [problem] if problem else []
    network_only = True
    for mirror in spec["mirrors"]:
        url = mirror + filename
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=filename + ".", suffix=".part")
        os.close(fd)
        tmp = Path(tmp)
        try:
            print(f"downloading {url} -> {path}")
            _download(url, tmp)
            got = _md5(tmp)
            if got != md5:  # never keep a file that fails its checksum
                network_only = False
                errors.append(f"{url}: checksum mismatch, MD5 {got} but expected {md5} (file deleted)")
                continue
            os.replace(tmp, path)
            return path
        except OSError as e:  # URLError, HTTPError, socket timeouts, DNS failures are all OSError
            errors.append(f"{url}: {getattr(e, 'reason', None) or e}")
        finally:
            tmp.unlink(missing_ok=True)
    what = "Could not download" if network_only else "Downloaded a file that failed its checksum for"
    hint = " (no network?)" if network_only else ""
    raise DownloadError(f"{what} {name} file {filename}{hint}:\n  " + "\n  ".join(errors) + "\n"
                        + _by_hand(name, folder))


def read_idx(path) -> np.ndarray:
    """Parse an IDX file (the MNIST format), gzipped or not, into a numpy array.

    Layout: two zero bytes, a type code, the number of dimensions, one big-endian uint32 per
    dimension, then the values in big-endian C order.
    """
    path = Path(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    types = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in types:
        raise ValueError(f"{path} is not an IDX file (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(types[raw[2]])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(f"{path}: IDX header says {dims} of {dtype} ({expected} bytes), file has {len(raw)}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


class _CifarUnpickler(pickle.Unpickler):
    # The CIFAR batches are pickles; unpickling may call any global, so allow only what a
    # dict of numpy arrays and lists needs.
    def find_class(self, module, name):
        if name == "_reconstruct" and module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            return np.ndarray.__reduce__(np.zeros(0))[0]   # numpy's own _reconstruct, either version
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs" and name == "encode":
            import codecs
            return codecs.encode
        raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}, which is not allowed")


def read_cifar_batch(path):
    """Parse one CIFAR-10 python batch: (uint8 images (N, 3, 32, 32), int64 labels (N,))."""
    with open(path, "rb") as f:
        d = _CifarUnpickler(f, encoding="bytes").load()
    if not isinstance(d, dict):
        raise ValueError(f"{path} is not a CIFAR batch (expected a dict, got {type(d).__name__})")
    d = {k.decode() if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise ValueError(f"{path} is not a CIFAR-10 batch (keys {sorted(d)})")
    data = np.asarray(d["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(d["labels"]) != len(data):
        raise ValueError(f"{path}: unexpected CIFAR batch layout {data.shape}, {len(d['labels'])} labels")
    # rows are 1024 red, then 1024 green, then 1024 blue values, each row-major: already CHW
    return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.tensor(d["labels"], dtype=torch.long)


def load_mnist_like(name: str, split: str, root, download: bool) -> ImageDataset:
    folder = cache_dir(root) / name
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(_ensure_file(name, folder, f"{prefix}-images-idx3-ubyte.gz", download))
    labels = read_idx(_ensure_file(name, folder, f"{prefix}-labels-idx1-ubyte.gz", download))
    if images.ndim != 3 or labels.shape != images.shape[:1]:
        raise ValueError(f"{name}: unexpected IDX shapes {images.shape} and {labels.shape}")
    classes = MNIST_CLASSES if name == "mnist" else FASHION_CLASSES
    return ImageDataset(name, torch.from_numpy(images.astype(np.uint8)[:, None].copy()),
                        torch.from_numpy(labels.astype(np.int64)), classes)


def load_cifar10(split: str, root, download: bool) -> ImageDataset:
    spec = _REAL["cifar10"]
    folder = cache_dir(root) / "cifar10"
    batch_dir = folder / "cifar-10-batches-py"
    wanted = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    # the extracted batches (ours, or placed by hand) are used when their checksums are right
    if not all((batch_dir / b).exists() and _md5(batch_dir / b) == spec["members"][b] for b in wanted):
        archive = _ensure_file("cifar10", folder, "cifar-10-python.tar.gz", download)
        batch_dir.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive, "r:gz") as tar:
            for b, md5 in spec["members"].items():
                # read known members only (never tar.extractall: no path tricks possible)
                member = tar.extractfile(f"cifar-10-batches-py/{b}")
                fd, tmp = tempfile.mkstemp(dir=batch_dir, prefix=b + ".", suffix=".tmp")
                with os.fdopen(fd, "wb") as f:
                    f.write(member.read())
                if _md5(Path(tmp)) != md5:
                    Path(tmp).unlink()
                    raise DownloadError(f"{archive}: member {b} fails its checksum; delete the archive and retry")
                os.replace(tmp, batch_dir / b)
    parts = [read_cifar_batch(batch_dir / b) for b in wanted]
    return ImageDataset("cifar10", torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
                        CIFAR10_CLASSES)


__all__ = ["DownloadError", "MNIST_CLASSES", "FASHION_CLASSES", "CIFAR10_CLASSES", "read_idx", "read_cifar_batch",
           "load_mnist_like", "load_cifar10"]
