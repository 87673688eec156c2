"""Encryption at rest of the identifying fields a study may carry (patient reference, accession number, the
DICOM modules a result sent back to a PACS must repeat).

The web app and the DICOM gateway store these fields only as Fernet tokens (AES-128-CBC + HMAC-SHA256, from
``cryptography``): a copy of the database file or a database dump shows ciphertext. The key comes from the
settings, never from the database: ``PNEUMOSCOPE_FIELD_KEYS`` (comma-separated Fernet keys, the first one
encrypts, all of them decrypt, so a key is rotated by putting the new one first), or, on one machine, a key
generated once into ``home/field-key`` (mode 0600). Replicas and the gateway must share the key: set it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class FieldKeyError(Exception):
    """The field key is missing, malformed, or does not open a stored value."""


class FieldCipher:
    """Encrypts and decrypts JSON-serialisable values with the configured keys."""

    def __init__(self, keys: list[bytes]):
        if not keys:
            raise FieldKeyError("no field encryption key: set PNEUMOSCOPE_FIELD_KEYS")
        try:
            self._fernet = MultiFernet([Fernet(k) for k in keys])
            # One fingerprint key per Fernet key, derived from it (never the key itself, which also encrypts).
            self._fingerprint_keys = [hashlib.sha256(b"pneumoscope-fingerprint\0" + base64.urlsafe_b64decode(k))
                                      .digest() for k in keys]
        except (ValueError, TypeError) as exc:
            raise FieldKeyError("PNEUMOSCOPE_FIELD_KEYS holds a key that is not a Fernet key "
                                "(32 url-safe base64-encoded bytes, as cryptography's Fernet.generate_key() makes)"
                                ) from exc

    @classmethod
    def from_config(cls, keys: str | None, home: Path) -> "FieldCipher":
        """The cipher for ``keys`` (comma-separated), or for the key generated once into ``home/field-key``."""
        if keys:
            return cls([k.strip().encode() for k in keys.split(",") if k.strip()])
        return cls([_local_key(home / "field-key")])

    def encrypt(self, value) -> str:
        return self._fernet.encrypt(json.dumps(value, sort_keys=True).encode()).decode("ascii")

    def decrypt(self, token: str | None):
        if token is None:
            return None
        try:
            return json.loads(self._fernet.decrypt(token.encode("ascii")))
        except InvalidToken as exc:
            raise FieldKeyError("a stored identifying field does not open with the configured key "
                                "(was PNEUMOSCOPE_FIELD_KEYS changed without keeping the old key?)") from exc

    def encrypt_bytes(self, data: bytes) -> bytes:
        """A file's bytes, encrypted (a DICOM object waiting to be sent back to a PACS)."""
        return self._fernet.encrypt(data)

    def decrypt_bytes(self, token: bytes) -> bytes:
        try:
            return self._fernet.decrypt(token)
        except InvalidToken as exc:
            raise FieldKeyError("a stored identifying file does not open with the configured key "
                                "(was PNEUMOSCOPE_FIELD_KEYS changed without keeping the old key?)") from exc

    def fingerprint(self, value: str) -> str:
        """A keyed one-way digest of an identifier (HMAC-SHA256 under the current key): equal identifiers have
        equal fingerprints, so a duplicate is found without storing the identifier, and without the key a
        fingerprint cannot be checked against guessed identifiers (UIDs are often guessable)."""
        return self.fingerprints(value)[0]

    def fingerprints(self, value: str) -> list[str]:
        """The fingerprint under every configured key, current first: a look-up matches rows written before a
        rotation too."""
        return [hmac.new(key, value.encode(), hashlib.sha256).hexdigest() for key in self._fingerprint_keys]

    def rotate(self, token: str) -> str:
        """Re-encrypt a token under the first (current) key."""
        return self._fernet.rotate(token.encode("ascii")).decode("ascii")


def new_key() -> str:
    return Fernet.generate_key().decode("ascii")


def _local_key(path: Path) -> bytes:
    """Read the machine's key, creating it whole (write a temporary file, then move it into place) when missing."""
    if not path.exists() or not path.read_bytes().strip():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_key())
        if not path.exists() or not path.read_bytes().strip():
            os.replace(temporary, path)  # atomic: a concurrent reader sees no key or a whole one
        else:
            temporary.unlink()  # another process made it first
    return path.read_bytes().strip()
