"""Where uploads and heatmaps live: a local folder or ``s3://bucket/prefix``, through fsspec (s3fs for S3).

Keys are ``<random prefix>/<name>``: nothing in a key comes from the upload (no file names, no PHI).
The S3 endpoint and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL`` for MinIO or
moto). Calls are blocking; the app runs them in worker threads.

Nothing half-written is ever visible: a local file is written beside its name and renamed into place
(the partial file is removed when the write fails), and an S3 object is written with one PUT (an upload
is at most ``max_upload_bytes``, below s3fs's multipart threshold), which S3 applies whole or not at all.
An unreachable S3 endpoint is retried with exponential back-off (botocore's "standard" mode, then s3fs's own
retries) within bounded timeouts, then reported as :class:`StorageError` (the app answers 503).
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid

#: botocore's client settings for the image store: bounded waits, retries with exponential back-off and jitter.
S3_CLIENT_CONFIG = {"connect_timeout": 5, "read_timeout": 30, "retries": {"mode": "standard", "max_attempts": 4}}
#: s3fs's own retries of a call that botocore gave up on (back-off 0.1 s x 1.7^n).
S3FS_RETRIES = 3


class StorageError(Exception):
    """The image store cannot be read or written."""


class ImageStore:
    def __init__(self, root: str):
        import fsspec

        self.url = root.rstrip("/")
        options = {"config_kwargs": S3_CLIENT_CONFIG} if self.url.startswith("s3://") else {}
        self.fs, path = fsspec.core.url_to_fs(self.url, **options)
        if options:
            self.fs.retries = S3FS_RETRIES  # a class attribute of s3fs, not a constructor argument
        self.root = path.rstrip("/")
        protocols = self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,)
        self.local = "file" in protocols
        if self.local:
            try:
                os.makedirs(self.root, exist_ok=True)
            except OSError as exc:
                raise StorageError(f"cannot open the image store {self.url}: {exc.strerror}") from None

    @staticmethod
    def new_prefix() -> str:
        return uuid.uuid4().hex

    def _path(self, key: str) -> str:
        if ".." in key.split("/"):
            raise StorageError(f"invalid key {key!r}")
        return f"{self.root}/{key}"

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            if self.local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                partial = f"{path}.partial-{uuid.uuid4().hex[:8]}"
                try:
                    with open(partial, "wb") as out:
                        out.write(data)
                        out.flush()
                        os.fsync(out.fileno())
                    os.replace(partial, path)  # readers never see half a file
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(partial)  # a full disk must not keep half a file
                    raise
            else:
                self.fs.pipe_file(path, data)
        except OSError as exc:
            raise StorageError(f"cannot write to the image store {self.url}: {exc}") from None
        except Exception as exc:  # botocore/aiohttp errors of an S3 store that stays away after the retries
            raise StorageError(f"cannot write to the image store {self.url}: {_first_line(exc)}") from None

    def get(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot read from the image store {self.url}: {exc}") from None
        except Exception as exc:
            raise StorageError(f"cannot read from the image store {self.url}: {_first_line(exc)}") from None

    def delete(self, key: str) -> None:
        """Remove one file (best effort: a missing one is fine)."""
        try:
            self.fs.rm(self._path(key))
        except (OSError, FileNotFoundError):
            pass

    def delete_prefix(self, prefix: str) -> None:
        """Remove everything under one study's prefix (a failed upload's leftovers)."""
        path = self._path(prefix)
        try:
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except Exception:  # best effort: the retry worker's sweep removes what no row names later
            pass

    def prefixes(self) -> list[tuple[str, float]]:
        """(prefix, newest modification time as a Unix time) of every study folder in the store."""
        found: dict[str, float] = {}
        try:
            for path, info in self.fs.find(self.root, detail=True).items():
                prefix = path[len(self.root):].lstrip("/").split("/", 1)[0]
                modified = _modified(info)
                found[prefix] = max(found.get(prefix, 0.0), modified)
        except FileNotFoundError:
            return []
        except Exception as exc:
            raise StorageError(f"cannot list the image store {self.url}: {_first_line(exc)}") from None
        return sorted(found.items())

    def check(self) -> None:
        """Raise StorageError when the store cannot be listed (wrong bucket, no credentials)."""
        try:
            self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            if not self.local:
                return  # an empty prefix in a bucket does not exist until the first write
            raise StorageError(f"image store folder not found: {self.url}") from None
        except Exception as exc:  # botocore/aiohttp errors have no common base
            raise StorageError(f"cannot open the image store {self.url}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:300] if lines else type(exc).__name__


def _modified(info: dict) -> float:
    """A Unix time from fsspec's file info: ``mtime`` (local), ``LastModified`` (S3); now when neither is there,
    so that an undated file is never old enough to be swept."""
    value = info.get("mtime", info.get("LastModified", info.get("created")))
    if hasattr(value, "timestamp"):
        return value.timestamp()
    return float(value) if value is not None else time.time()
