"""Where registries, runs and data live: a local folder, or a URI (`file://`, `s3://`, `gs://`,
...) through `pyarrow.fs`, which is what Ray Train's own storage uses.

A plain path and a `file://` URI are local folders: published by rename, one atomic step.
Anything else is an object store, where there is no rename: a folder is uploaded whole and a
completion marker (`COMPLETE`) written last; readers ignore folders without it. Files read
from an object store are copied once into the local cache (`$FTSERVICE_CACHE`), keyed by
their URI, size and modification time, so each node reads its own copy.

S3-compatible servers are reached the way the AWS SDKs and pyarrow reach them:
`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow.fs as pafs

from ftservice.errors import FtserviceError

COMPLETE = "COMPLETE"


class StorageError(FtserviceError):
    """A location that cannot be reached, read or written."""


def cache_dir() -> Path:
    """Where converted models and copies of stored files live: $FTSERVICE_CACHE, else
    ~/.cache/ftservice."""
    return Path(os.environ.get("FTSERVICE_CACHE") or Path.home() / ".cache" / "ftservice")


def is_uri(location: str) -> bool:
    return "://" in str(location)


def local_path(location: str | os.PathLike) -> Path | None:
    """The local folder a location names (a plain path or file://), or None for a store."""
    text = str(location)
    if not is_uri(text):
        return Path(text).expanduser()
    parsed = urlparse(text)
    if parsed.scheme == "file":
        return Path(unquote(parsed.netloc + parsed.path))
    return None


def filesystem(location: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a URI, and the path inside it."""
    try:
        return pafs.FileSystem.from_uri(location)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        raise StorageError(f"{location}: cannot open this storage URI ({e})") from None


def join(location: str, *parts: str) -> str:
    """A location under another one, the same kind (path or URI)."""
    if is_uri(location):
        return "/".join([location.rstrip("/"), *parts])
    return str(Path(location, *parts))


def _info(location: str) -> pafs.FileInfo:
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path)
    except OSError as e:
        raise StorageError(f"{location}: cannot reach it ({e})") from None


def exists(location: str) -> bool:
    local = local_path(location)
    if local is not None:
        return local.exists()
    return _info(location).type != pafs.FileType.NotFound


def is_file(location: str) -> bool:
    local = local_path(location)
    if local is not None:
        return local.is_file()
    return _info(location).type == pafs.FileType.File


def modified(location: str) -> float:
    """When a file or folder was last written (seconds since the epoch)."""
    local = local_path(location)
    if local is not None:
        return local.stat().st_mtime
    info = _info(location)
    return info.mtime.timestamp() if info.mtime is not None else 0.0


def read_text(location: str) -> str:
    local = local_path(location)
    if local is not None:
        return local.read_text(encoding="utf-8")
    fs, path = filesystem(location)
    try:
        with fs.open_input_stream(path) as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        raise
    except OSError as e:
        raise StorageError(f"{location}: cannot read it ({e})") from None


def write_text(location: str, text: str) -> None:
    """One object (or a local file, replaced atomically; its folder made if missing)."""
    local = local_path(location)
    if local is not None:
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, local)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:
        f.write(text.encode("utf-8"))


def list_dirs(location: str) -> list[str]:
    """Names of the folders directly under a location (none if it does not exist)."""
    local = local_path(location)
    if local is not None:
        return sorted(p.name for p in local.iterdir() if p.is_dir()) if local.is_dir() else []
    fs, path = filesystem(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except OSError as e:
        raise StorageError(f"{location}: cannot list it ({e})") from None
    return sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory)


def upload(folder: Path, location: str) -> None:
    """Copy a local folder to a location of a store, every file, then the marker last."""
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    pafs.copy_files(str(folder), path, destination_filesystem=fs, use_threads=True)
    with fs.open_output_stream(f"{path}/{COMPLETE}") as f:
        f.write(b"")


def is_complete(location: str) -> bool:
    return is_file(join(location, COMPLETE))


def delete(location: str) -> None:
    """Remove a folder of a store: its marker first, so readers stop seeing it at once."""
    fs, path = filesystem(location)
    marker = f"{path}/{COMPLETE}"
    if fs.get_file_info(marker).type == pafs.FileType.File:
        fs.delete_file(marker)
    fs.delete_dir(path)


def remove_tree(location: str) -> None:
    """Remove a folder wherever it is, if it is there."""
    local = local_path(location)
    if local is not None:
        shutil.rmtree(local, ignore_errors=True)
    elif exists(location):
        delete(location)


def download(location: str, target: Path) -> Path:
    """A store's folder or file copied to `target` (atomically: aside, then renamed)."""
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{location}: not found")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        if info.type == pafs.FileType.File:
            pafs.copy_files(path, str(tmp / target.name), source_filesystem=fs)
            os.replace(tmp / target.name, target)
        else:
            pafs.copy_files(path, str(tmp), source_filesystem=fs, use_threads=True)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def localize(location: str) -> Path:
    """A local path for a location: itself when local, else a cached copy."""
    local = local_path(location)
    return local if local is not None else cached(location)


def cached(location: str) -> Path:
    """A local copy of a store's file or folder, made once per version of it."""
    info = _info(location)
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{location}: not found (check the URI and the credentials)")
    version = f"{location}\0{info.size}\0{info.mtime_ns}"
    if info.type == pafs.FileType.Directory:  # a folder's version is that of its files
        fs, path = filesystem(location)
        files = fs.get_file_info(pafs.FileSelector(path, recursive=True))
        version += "".join(f"\0{f.path}:{f.size}:{f.mtime_ns}" for f in files)
    key = hashlib.sha256(version.encode()).hexdigest()[:16]
    name = location.rstrip("/").rsplit("/", 1)[-1]
    target = cache_dir() / "remote" / key / name
    if not target.exists():
        download(location, target)
    return target
