"""Object store adapter on fsspec URIs: ``file://`` by default, ``s3://`` through s3fs.

Keys are ``/``-separated paths relative to the store root. Every write is atomic for readers:
local files are written under a temporary name and renamed; an S3 PUT (or a completed multipart
upload) becomes visible whole. Server-side-encryption options reach every S3 write.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import fsspec

from pipelines.config import StoreSettings
from pipelines.redaction import protect


class StoreError(RuntimeError):
    """Raised for object-store failures with the key that caused them."""


def storage_options(cfg: StoreSettings) -> dict[str, Any]:
    """fsspec options for the configured root (empty for local files)."""
    if not cfg.root.startswith("s3://"):
        return {}
    opts: dict[str, Any] = {}
    client_kwargs: dict[str, Any] = {}
    if cfg.endpoint_url:
        client_kwargs["endpoint_url"] = cfg.endpoint_url
    if cfg.region:
        client_kwargs["region_name"] = cfg.region
    if client_kwargs:
        opts["client_kwargs"] = client_kwargs
    if cfg.key and cfg.secret:
        opts["key"], opts["secret"] = cfg.key.get_secret_value(), cfg.secret.get_secret_value()
        protect(opts["key"], opts["secret"])  # botocore logs signed requests at DEBUG
    if cfg.sse:
        extra: dict[str, str] = {"ServerSideEncryption": cfg.sse}
        if cfg.sse == "aws:kms" and cfg.sse_kms_key_id:
            extra["SSEKMSKeyId"] = cfg.sse_kms_key_id
        opts["s3_additional_kwargs"] = extra
    return opts


class ObjectStore:
    """A rooted view of one fsspec filesystem."""

    def __init__(self, root: str, options: dict[str, Any] | None = None):
        self.root_uri = root.rstrip("/")
        self.fs, root_path = fsspec.core.url_to_fs(self.root_uri, **(options or {}))
        self.root_path = root_path.rstrip("/")
        self.is_local = self.fs.protocol in ("file", "local") or "file" in self.fs.protocol
        if self.is_local:
            Path(self.root_path).mkdir(parents=True, exist_ok=True)

    @classmethod
    def from_settings(cls, cfg: StoreSettings) -> ObjectStore:
        return cls(cfg.root, storage_options(cfg))

    # -- naming ---------------------------------------------------------------------------
    def _path(self, key: str) -> str:
        key = key.strip("/")
        if ".." in key.split("/"):
            raise StoreError(f"Key {key!r} may not contain '..'.")
        return f"{self.root_path}/{key}" if key else self.root_path

    def uri(self, key: str = "") -> str:
        """Full URI of a key (what goes into manifests, XCom and MLflow tags)."""
        key = key.strip("/")
        return f"{self.root_uri}/{key}" if key else self.root_uri

    def key_of(self, uri: str) -> str:
        """Inverse of :meth:`uri`; raises if the URI is outside this store."""
        if not uri.startswith(self.root_uri):
            raise StoreError(f"URI {uri} is not under the store root {self.root_uri}.")
        return uri[len(self.root_uri) :].strip("/")

    # -- reads ----------------------------------------------------------------------------
    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self._path(key)))

    def read_bytes(self, key: str) -> bytes:
        try:
            return bytes(self.fs.cat_file(self._path(key)))
        except FileNotFoundError as exc:
            raise StoreError(f"No object at {self.uri(key)}.") from exc

    def read_text(self, key: str) -> str:
        return self.read_bytes(key).decode()

    @contextmanager
    def open(self, key: str, mode: str = "rb") -> Iterator[IO[Any]]:
        if "w" in mode:
            raise StoreError("Use write_bytes/put_file: writes must be atomic.")
        try:
            with self.fs.open(self._path(key), mode) as fh:
                yield fh
        except FileNotFoundError as exc:
            raise StoreError(f"No object at {self.uri(key)}.") from exc

    def list(self, prefix: str, recursive: bool = False) -> list[str]:
        """Keys under a prefix (files only when recursive), sorted."""
        base = self._path(prefix)
        if not self.fs.exists(base):
            return []
        paths = self.fs.find(base) if recursive else self.fs.ls(base, detail=False)
        root = self.root_path + "/"
        return sorted(p[len(root) :] if p.startswith(root) else p for p in paths)

    def modified(self, key: str) -> float:
        """Last-modified time of an object (epoch seconds)."""
        return float(self.fs.modified(self._path(key)).timestamp())

    def sha256(self, key: str) -> str:
        digest = hashlib.sha256()
        with self.open(key) as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                digest.update(block)
        return digest.hexdigest()

    # -- writes (atomic) ------------------------------------------------------------------
    def write_bytes(self, key: str, data: bytes) -> str:
        path = self._path(key)
        if self.is_local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)
        return self.uri(key)

    def create_bytes(self, key: str, data: bytes) -> bool:
        """Write ``key`` only if it does not exist yet (never overwrites), whole or not at all;
        False when it already exists. Local: a hard link of a finished temporary file; S3: a
        conditional PUT (``If-None-Match: *``)."""
        path = self._path(key)
        if self.is_local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "wb") as fh:
                    fh.write(data)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.link(tmp, path)  # fails when the key exists
            except FileExistsError:
                return False
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
            return True
        try:
            self.fs.pipe_file(path, data, mode="create")
        except FileExistsError:
            return False
        except OSError as exc:
            if "ConditionalRequestConflict" in str(exc):  # AWS: 409 for a racing conditional PUT
                return False
            raise
        return True

    def write_text(self, key: str, text: str) -> str:
        return self.write_bytes(key, text.encode())

    def put_file(self, local_path: str | Path, key: str) -> str:
        """Upload a local file; the object appears whole or not at all."""
        path = self._path(key)
        if self.is_local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            self.fs.put_file(str(local_path), tmp)
            os.replace(tmp, path)
        else:
            self.fs.put_file(str(local_path), path)
        return self.uri(key)

    def put_dir(self, local_dir: str | Path, key: str) -> str:
        """Upload every file under a local directory (callers publish a marker/manifest last)."""
        local_dir = Path(local_dir)
        for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
            self.put_file(file, f"{key.strip('/')}/{file.relative_to(local_dir).as_posix()}")
        return self.uri(key)

    def get_dir(self, key: str, local_dir: str | Path) -> Path:
        """Download every object under a prefix into a local directory."""
        local_dir = Path(local_dir)
        prefix = key.strip("/")
        keys = self.list(prefix, recursive=True)
        if not keys:
            raise StoreError(f"Nothing stored under {self.uri(prefix)}.")
        for k in keys:
            dest = local_dir / k[len(prefix) :].lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(self._path(k), str(dest))
        return local_dir

    def move(self, src: str, dst: str) -> None:
        """Move a key or a prefix (rename locally; copy then delete on S3)."""
        if not self.exists(src):
            raise StoreError(f"Cannot move {self.uri(src)}: it does not exist.")
        dst_path = self._path(dst)
        if self.is_local:
            os.makedirs(posixpath.dirname(dst_path), exist_ok=True)
            os.replace(self._path(src), dst_path)
        else:
            # Object stores have no rename: copy each object server-side, then delete.
            src_path = self._path(src)
            files = self.fs.find(src_path) or [src_path]
            for f in files:
                self.fs.copy(f, dst_path + f[len(src_path) :])
            self.fs.rm(files)

    def delete(self, key: str, recursive: bool = False) -> None:
        path = self._path(key)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=recursive)


def open_store(cfg: StoreSettings) -> ObjectStore:
    return ObjectStore.from_settings(cfg)
