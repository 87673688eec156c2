"""Where uploads and heatmaps live: a local folder or ``s3://bucket/prefix``, through fsspec (s3fs for S3).

Keys are ``<random prefix>/<name>``: nothing in a key comes from the upload (no file names, no PHI).
The S3 endpoint and credentials come from the usual AWS variables (``AWS_ENDPOINT_URL`` for MinIO or
moto). Calls are blocking; the app runs them in worker threads.
"""

from __future__ import annotations

import os
import uuid


class StorageError(Exception):
    """The image store cannot be read or written."""


class ImageStore:
    def __init__(self, root: str):
        import fsspec

        self.url = root.rstrip("/")
        self.fs, path = fsspec.core.url_to_fs(self.url)
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
                with open(partial, "wb") as out:
                    out.write(data)
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(partial, path)  # readers never see half a file
            else:
                self.fs.pipe_file(path, data)
        except OSError as exc:
            raise StorageError(f"cannot write to the image store {self.url}: {exc}") from None

    def get(self, key: str) -> bytes:
        try:
            return self.fs.cat_file(self._path(key))
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StorageError(f"cannot read from the image store {self.url}: {exc}") from None

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
        except OSError:
            pass  # best effort: an orphan file holds no PHI and no row points at it

    def check(self) -> None:
        """Raise StorageError when the store cannot be listed (wrong bucket, no credentials)."""
        try:
            self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            if not self.local:
                return  # an empty prefix in a bucket does not exist until the first write
            raise StorageError(f"image store folder not found: {self.url}") from None
        except Exception as exc:  # botocore/aiohttp errors have no common base
            raise StorageError(f"cannot open the image store {self.url}: {str(exc).splitlines()[0]}") from None
