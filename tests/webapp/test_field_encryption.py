"""Identifying study fields are stored encrypted: round trip, rotation, a wrong or malformed key is one clear error."""

from __future__ import annotations

import base64
import stat

import pytest

from webapp.field_encryption import FieldCipher, FieldKeyError, new_key
from webapp.settings import WebSettings

FIELDS = {"patient_reference": "MRN-0042-MARKER", "accession_number": "ACC-77-MARKER", "view": "PA"}


def test_a_value_round_trips_and_its_token_shows_none_of_it(tmp_path):
    cipher = FieldCipher.from_config(None, tmp_path)
    token = cipher.encrypt(FIELDS)
    assert cipher.decrypt(token) == FIELDS and cipher.decrypt(None) is None
    # Only long values are looked for: a two-letter one ("PA") turns up by chance in ~5 % of random base64 tokens.
    # The decoded ciphertext must not carry the field names either (the plaintext JSON would).
    raw = base64.urlsafe_b64decode(token)
    markers = [value for value in FIELDS.values() if len(value) >= 8]
    for text in markers:
        assert text not in token
    for text in markers + list(FIELDS):
        assert text.encode() not in raw
    assert cipher.encrypt(FIELDS) != token, "Fernet tokens carry a random IV: equal values must not look equal"


def test_the_local_key_is_made_once_private_and_reused(tmp_path):
    first = WebSettings(home=tmp_path).field_cipher()
    key = tmp_path / "field-key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    token = first.encrypt(FIELDS)
    assert WebSettings(home=tmp_path).field_cipher().decrypt(token) == FIELDS
    key.write_text("")  # an empty key file left by a crash is replaced, not used
    with pytest.raises(FieldKeyError, match="does not open"):
        FieldCipher.from_config(None, tmp_path).decrypt(token)


def test_rotation_reads_old_tokens_and_writes_new_ones(tmp_path):
    old, new = new_key(), new_key()
    token = FieldCipher.from_config(old, tmp_path).encrypt(FIELDS)
    both = FieldCipher.from_config(f"{new},{old}", tmp_path)
    assert both.decrypt(token) == FIELDS
    rotated = both.rotate(token)
    assert FieldCipher.from_config(new, tmp_path).decrypt(rotated) == FIELDS
    with pytest.raises(FieldKeyError, match="does not open"):
        FieldCipher.from_config(old, tmp_path).decrypt(rotated)


def test_a_malformed_key_is_one_clear_error(tmp_path):
    with pytest.raises(FieldKeyError, match="not a Fernet key"):
        FieldCipher.from_config("not-a-key", tmp_path)
    with pytest.raises(FieldKeyError, match="no field encryption key"):
        FieldCipher([])


def test_files_round_trip_encrypted(tmp_path):
    cipher = FieldCipher.from_config(None, tmp_path)
    data = b"DICM" + b"Doe^Jane-MARKER" * 100
    token = cipher.encrypt_bytes(data)
    assert b"Doe^Jane-MARKER" not in token and cipher.decrypt_bytes(token) == data
    with pytest.raises(FieldKeyError, match="does not open"):
        FieldCipher.from_config(new_key(), tmp_path).decrypt_bytes(token)


def test_fingerprints_are_keyed_stable_and_survive_rotation(tmp_path):
    old, new = new_key(), new_key()
    uid = "1.2.826.0.1.3680043.8.498.1"
    before = FieldCipher.from_config(old, tmp_path).fingerprint(uid)
    assert before == FieldCipher.from_config(old, tmp_path).fingerprint(uid) and uid not in before
    assert before != FieldCipher.from_config(old, tmp_path).fingerprint(uid + "0")
    assert before != FieldCipher.from_config(new, tmp_path).fingerprint(uid), "another key, another fingerprint"
    rotated = FieldCipher.from_config(f"{new},{old}", tmp_path)
    assert rotated.fingerprints(uid) == [FieldCipher.from_config(new, tmp_path).fingerprint(uid), before]
