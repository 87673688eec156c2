"""Typed settings of the web app: environment variables (``PNEUMOSCOPE_*``) under command-line flags.

Defaults run locally: SQLite and images under ``PNEUMOSCOPE_HOME``, the transformer of
``pneumoscope serve`` on 127.0.0.1:8080. No heavy imports: the CLI builds every parser on each call.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.settings_cli import Cli

#: Largest upload accepted by default (the issue: 32 MB), counted while the body streams in.
DEFAULT_MAX_UPLOAD_BYTES = 32 * 1024 * 1024


class WebSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PNEUMOSCOPE_", extra="ignore")

    home: Path = Field(Path(".pneumoscope"), description="working folder: the SQLite database, images, the secret")
    database_url: str | None = Field(
        None, description="SQLAlchemy URL (postgresql://... uses psycopg 3); default sqlite under home")
    image_store: str | None = Field(None, description="folder or s3://bucket/prefix for uploads and heatmaps; "
                                                      "default home/studies")
    # No flag: a secret on the command line would show in `ps`.
    secret_key: Annotated[str | None, Cli(env_only=True)] = Field(
        None, description="signs session cookies and CSRF tokens; default: generated once into home/webapp-secret "
        "(set it when running replicas)")

    # No flag either: keys on the command line would show in `ps`.
    field_keys: Annotated[str | None, Cli(env_only=True)] = Field(
        None, description="Fernet keys (comma-separated; the first encrypts) for the identifying fields stored with "
        "a study (patient reference, accession number, DICOM modules); default: generated once into home/field-key "
        "(set it when running replicas or the DICOM gateway)")

    # --- the transformer (Open Inference Protocol v2 over REST) ---
    inference_url: str = Field("http://127.0.0.1:8080", description="the transformer's base URL")
    inference_host: str | None = Field(None, description="Host header for the transformer (an ingress's route)")
    model_name: str = Field("pneumonia", description="KServe model name at the transformer")
    inference_timeout_s: float = Field(30.0, gt=0, description="deadline of one inference call")
    inline_wait_s: float = Field(10.0, gt=0, description="an upload waits this long for its result before it "
                                                         "answers 202 pending and leaves it to the retry worker")
    retry_initial_s: float = Field(2.0, gt=0, description="first retry delay of a pending study (doubles)")
    retry_max_s: float = Field(120.0, gt=0, description="longest retry delay")
    worker_poll_s: float = Field(1.0, gt=0, description="how often the retry worker looks for due studies")
    worker_concurrency: int = Field(2, ge=1, description="studies the retry worker scores at once")
    orphan_sweep_s: float = Field(600.0, gt=0, description="how often the retry worker removes stored files that "
                                                           "no study names (uploads that failed before their commit)")
    orphan_min_age_s: float = Field(3600.0, gt=0, description="a file no study names is removed once it is this old "
                                                              "(longer than any upload takes to commit)")

    # --- uploads ---
    max_upload_bytes: int = Field(DEFAULT_MAX_UPLOAD_BYTES, gt=0, description="largest file accepted")
    deidentify_dicom: bool = Field(True, description="remove PS3.15 basic-profile identifying DICOM tags before "
                                                     "anything is stored (an admin may turn this off)")
    strip_image_metadata: bool = Field(True, description="remove EXIF, XMP, IPTC, comments and PNG text chunks "
                                                         "from JPEG and PNG uploads before anything is stored "
                                                         "(lossless: the pixels are kept byte for byte)")

    # --- sign-in ---
    session_hours: float = Field(12.0, gt=0, description="a session expires this long after sign-in")
    cookie_secure: Literal["auto", "always", "never"] = Field(
        "auto", description="Secure cookies: auto = when the request came over HTTPS (X-Forwarded-Proto counts "
        "from forwarded_allow_ips)")
    login_window_s: float = Field(900.0, gt=0, description="window of the sign-in rate limits")
    login_max_failures_per_user: int = Field(5, ge=1, description="failed sign-ins per user name and window")
    login_max_failures_per_client: int = Field(20, ge=1, description="failed sign-ins per client address and window")

    # --- process ---
    host: str = Field("127.0.0.1", description="listen address")
    port: int = Field(8000, ge=1, le=65535, description="listen port")
    forwarded_allow_ips: str = Field("127.0.0.1", description="proxies whose X-Forwarded-* headers are trusted")
    access_log: bool = Field(False, description="log every HTTP request")

    def resolved_database_url(self) -> str:
        url = self.database_url or f"sqlite:///{self.home.resolve() / 'webapp.db'}"
        for plain in ("postgresql://", "postgres://"):
            if url.startswith(plain):  # SQLAlchemy would pick psycopg2; the web extra ships psycopg 3
                url = "postgresql+psycopg://" + url[len(plain):]
        return url

    def resolved_image_store(self) -> str:
        return self.image_store or str(self.home.resolve() / "studies")

    def resolved_secret_key(self) -> str:
        if self.secret_key:
            return self.secret_key
        path = self.home / "webapp-secret"
        secret = path.read_text().strip() if path.exists() else ""
        if not secret:
            # Missing, or left empty by a process that died while writing it (an empty key would sign every
            # session with nothing): a new one is written whole beside it, then moved into place in one step.
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(48))
            try:
                if path.exists():
                    os.replace(tmp, path)
                else:
                    os.link(tmp, path)  # fails if another process made one meanwhile: theirs is used
            except FileExistsError:
                pass
            finally:
                tmp.unlink(missing_ok=True)
            secret = path.read_text().strip()
        return secret

    def field_cipher(self):
        from webapp.field_encryption import FieldCipher

        return FieldCipher.from_config(self.field_keys, self.home)
