"""Decode-once image cache for the face datasets.

Decoding ~200k JPEGs every epoch would dominate a run, and holding CelebA's decoded pixels in RAM
takes ~20 GB. So each JPEG is decoded once into a uint8 (N, 3, H, W) file that later runs (and every
Ray trial on the machine) open as a read-only memmap; the OS page cache does the rest.

Next to ``<name>`` lives ``<name>.json``, recording the shape, the ordered file names and
``file_fingerprint`` of the sources. The cache is valid only if all three match, and the sidecar is
written last, so a build that is killed halfway never leaves a cache that looks valid.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from fairtune.data.base import file_fingerprint
from fairtune.errors import UserError

CACHE_DIR = ".fairtune-cache"


class UndecodableImage(UserError):
    """An image PIL cannot decode; ``path`` and ``reason`` let a caller say where the file was listed."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot decode image {path} ({reason}); replace it with the file from the original archive")
        self.path, self.reason = path, reason


def cache_path(data_dir: Path, name: str) -> Path:
    """Where a dataset keeps its decoded images: ``<data_dir>/.fairtune-cache/<name>``."""
    return Path(data_dir) / CACHE_DIR / name


def decode_cache(
    paths: list[Path],
    height: int,
    width: int,
    cache_file: Path,
    progress: Callable[[int, int], None] | None = None,
    names: list[str] | None = None,
) -> np.ndarray:
    """The images of ``paths`` as a read-only uint8 (N, 3, height, width) memmap, in that order.

    Built on first use (and whenever the sources, their order or the size change): each file is
    decoded with PIL, converted to RGB and resized (bilinear) when not already ``width``×``height``.
    ``progress(done, total)`` is called while building. An empty ``paths`` gives an empty in-memory
    array (a zero-byte file cannot be memory-mapped). An undecodable file raises ``UndecodableImage``.
    ``names`` (default: the file names) identify the rows in the sidecar; pass paths relative to the
    data when files in different folders may share a name, so that reordering them is noticed.
    """
    cache_file = Path(cache_file)
    shape = (len(paths), 3, height, width)
    if not paths:
        return np.empty(shape, dtype=np.uint8)
    names = [p.name for p in paths] if names is None else list(names)
    meta = {"shape": list(shape), "fingerprint": file_fingerprint(paths), "names": names}
    sidecar = _sidecar(cache_file)
    if _read_meta(sidecar) != meta or not _has_size(cache_file, int(np.prod(shape))):
        _build(paths, shape, cache_file, meta, progress)
    return np.memmap(cache_file, dtype=np.uint8, mode="r", shape=shape)


def decode_image(path: Path, height: int, width: int) -> np.ndarray:
    """One image as uint8 (3, height, width), exactly as it is stored in the cache."""
    try:
        with Image.open(path) as image:
            rgb = image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as exc:  # PIL reports bad data with all three
        raise UndecodableImage(path, str(exc)) from None
    if rgb.size != (width, height):
        rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1)


def _sidecar(cache_file: Path) -> Path:
    return cache_file.with_name(cache_file.name + ".json")


def _read_meta(sidecar: Path) -> dict | None:
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None


def _has_size(path: Path, nbytes: int) -> bool:
    try:
        return path.stat().st_size == nbytes
    except OSError:
        return False


def _build(
    paths: list[Path],
    shape: tuple[int, int, int, int],
    cache_file: Path,
    meta: dict,
    progress: Callable[[int, int], None] | None,
) -> None:
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    # A stale sidecar must not survive: if this build dies after replacing the data file, the old
    # sidecar could otherwise vouch for it.
    _sidecar(cache_file).unlink(missing_ok=True)
    # Unique temp names let concurrent trials build the same cache; the last os.replace wins and
    # both wrote the same bytes.
    fd, tmp_name = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.chmod(0o644)  # mkstemp's 0600 would hide a shared data dir's cache from other users
    try:
        images = np.memmap(tmp, dtype=np.uint8, mode="w+", shape=shape)
        for i, path in enumerate(paths):
            images[i] = decode_image(path, shape[2], shape[3])
            if progress is not None:
                progress(i + 1, len(paths))
        images.flush()
        del images
        os.replace(tmp, cache_file)
        _write_atomic(_sidecar(cache_file), json.dumps(meta))
    finally:
        tmp.unlink(missing_ok=True)


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)
