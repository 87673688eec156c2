"""Typed settings of the DICOM gateway: ``PNEUMOSCOPE_GATEWAY_*`` environment variables under command-line flags.

Where studies are recorded and how the transformer is reached are the web app's settings (``PNEUMOSCOPE_HOME``,
``PNEUMOSCOPE_DATABASE_URL``, ``PNEUMOSCOPE_IMAGE_STORE``, ``PNEUMOSCOPE_FIELD_KEYS``,
``PNEUMOSCOPE_INFERENCE_URL``, ...): the gateway writes into the same database and store, so it reads them from
the same variables (:class:`webapp.settings.WebSettings`). No heavy imports: the CLI builds every parser on each call.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from model.settings_cli import Cli

#: Real 16-bit CR/DX files are 10-30 MB (a 3,520 x 4,280 CR plate is 30 MB); the transformer admits 64 MB.
DEFAULT_MAX_OBJECT_BYTES = 60_000_000
#: An AE title: 1-16 characters of the default repertoire, no backslash, not all spaces (PS3.5 table 6.2-1).
AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")
#: Written in the gateway's records for instances fetched by DICOMweb (no calling AE title there).
DICOMWEB_ORIGIN = "DICOMWEB"


def _ae_title(value: str, what: str) -> str:
    value = value.strip()
    if not AE_TITLE.match(value):
        raise ValueError(f"{what} {value!r} is not an AE title (1-16 printable ASCII characters, no backslash)")
    return value


@dataclass(frozen=True)
class Destination:
    """Where results go: a DICOMweb service (STOW-RS) or a DICOM node (C-STORE)."""

    kind: Literal["stow", "cstore"]
    url: str = ""  # stow: the DICOMweb base URL
    ae_title: str = ""  # cstore: the called AE title, host and port
    host: str = ""
    port: int = 0

    def describe(self) -> str:
        """For logs: no credentials."""
        if self.kind == "stow":
            parts = urlsplit(self.url)
            return f"STOW-RS {parts.scheme}://{parts.hostname}{f':{parts.port}' if parts.port else ''}{parts.path}"
        return f"C-STORE {self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    """``http(s)://HOST/dicom-web`` (STOW-RS) or ``dicom://AE@HOST:PORT`` (C-STORE)."""
    text = text.strip()
    parts = urlsplit(text)
    if parts.scheme in ("http", "https") and parts.hostname:
        return Destination("stow", url=text.rstrip("/"))
    if parts.scheme == "dicom" and parts.username and parts.hostname and parts.port:
        return Destination("cstore", ae_title=_ae_title(parts.username, "the PACS AE title"), host=parts.hostname,
                           port=parts.port)
    raise ValueError(f"{text!r} is neither a DICOMweb URL (http://HOST:PORT/dicom-web) nor a DICOM node "
                     "(dicom://AE_TITLE@HOST:PORT)")


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PNEUMOSCOPE_GATEWAY_", extra="ignore")

    # --- receiving (the Storage SCP) ---
    ae_title: str = Field("PNEUMOSCOPE", description="the gateway's AE title (the PACS sends to it)")
    host: str = Field("127.0.0.1", description="DICOM listen address (0.0.0.0 in a container)")
    port: int = Field(11112, ge=1, le=65535, description="DICOM listen port (C-STORE, C-ECHO)")
    allowed_aes: str = Field("", description="calling AE titles allowed to associate, comma-separated; empty: any "
                                             "(the gateway warns at start)")
    max_object_bytes: int = Field(DEFAULT_MAX_OBJECT_BYTES, gt=0,
                                  description="largest DICOM object accepted (16-bit CR/DX films are 10-30 MB); it "
                                              "must fit the transformer's max_payload_bytes")
    max_associations: int = Field(8, ge=1, description="associations served at once")
    network_timeout_s: float = Field(60.0, gt=0, description="DICOM network and DIMSE timeout")

    # --- pull mode (DICOMweb) ---
    pull: str | None = Field(None, description="DICOMweb base URL of a PACS to poll with QIDO-RS for new CR/DX "
                                               "instances (fetched with WADO-RS); unset: no polling")
    pull_interval_s: float = Field(10.0, gt=0, description="seconds between two polls")
    pull_lookback_days: int = Field(1, ge=0, description="poll studies dated today and this many days before")

    # --- sending results back ---
    send_to: str | None = Field(None, description="where results go: a DICOMweb base URL (STOW-RS) or "
                                                  "dicom://AE@HOST:PORT (C-STORE); default: the --pull URL; unset "
                                                  "with no pull: results are recorded in the web app only")
    send_timeout_s: float = Field(30.0, gt=0, description="deadline of one send to the PACS")
    send_retry_initial_s: float = Field(2.0, gt=0, description="first delay before a result is sent again "
                                                               "(doubles on each failure)")
    send_retry_max_s: float = Field(300.0, gt=0, description="longest delay between two sends of a result")
    manufacturer: str = Field("pneumoscope", description="Manufacturer written into the result objects")

    # --- the studies it records ---
    service_user: str = Field("pacs-gateway", description="web app user that owns the studies received from the "
                                                          "PACS (made at start when missing; admins see them)")
    worker_poll_s: float = Field(1.0, gt=0, description="how often the workers look for due work when not woken")
    build_lease_s: float = Field(15.0, gt=0, description="how long the Secondary Capture and the PDF of a film may "
                                 "stay unbuilt after its SR was queued before they are built again (the gateway "
                                 "stopped while building them); the lease is renewed every third of it while a "
                                 "build runs, so it bounds only the wait after a crash, not a build's time")
    test_build_delay_s: Annotated[float, Cli(env_only=True)] = Field(
        0.0, ge=0, description="TESTS ONLY: the Secondary Capture and the PDF wait this long before they are built "
        "(a test stops the gateway in between); never set it in production")

    # --- operations ---
    metrics_host: str = Field("127.0.0.1", description="listen address of /metrics, /healthz and /readyz")
    metrics_port: int = Field(9464, ge=0, le=65535, description="port of /metrics, /healthz and /readyz (0: any)")

    @field_validator("ae_title")
    @classmethod
    def _check_ae_title(cls, value: str) -> str:
        return _ae_title(value, "the gateway's AE title")

    @field_validator("allowed_aes")
    @classmethod
    def _check_allowed(cls, value: str) -> str:
        return ",".join(_ae_title(v, "an allowed AE title") for v in value.split(",") if v.strip())

    @field_validator("send_to")
    @classmethod
    def _check_send_to(cls, value: str | None) -> str | None:
        if value:
            parse_destination(value)
        return value or None

    @field_validator("pull")
    @classmethod
    def _check_pull(cls, value: str | None) -> str | None:
        if value and parse_destination(value).kind != "stow":
            raise ValueError(f"{value!r} is not a DICOMweb URL (http://HOST:PORT/dicom-web)")
        return value or None

    def allowed_ae_titles(self) -> list[str]:
        return [v for v in self.allowed_aes.split(",") if v]

    def destination(self) -> Destination | None:
        target = self.send_to or self.pull
        return parse_destination(target) if target else None
