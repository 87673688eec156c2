"""Send a result to the PACS with STOW-RS (``dicomweb-client``).

The answer decides what happens to the result: 200 with the instance among the stored ones, sent; 409 (the PACS
refused it, PS3.18 10.5.3), refused for good with the PACS's reason; 5xx, 429, a timeout or no connection, tried
again later. An answer that cannot be read (not the DICOM JSON or XML it must be, or one that names neither our
instance as stored nor as failed) is checked with QIDO-RS: the instance is either there (sent) or tried again.
"""

from __future__ import annotations

import io
import logging

import pydicom
import requests

from gateway.outbox import SendFailed, SendRefused

log = logging.getLogger(__name__)

#: STOW-RS answers that mean "stored" (PS3.18 table 10.5.3-1): all stored, or some stored with warnings.
STORED = (200, 202)
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)


class StowSender:
    def __init__(self, url: str, timeout_s: float):
        from dicomweb_client import DICOMwebClient

        self.client = DICOMwebClient(url, timeout=timeout_s)
        self.client.set_http_retry_params(retry=False)  # the outbox retries, durably and with back-off

    def send(self, data: bytes, sop_instance_uid: str) -> None:
        dataset = pydicom.dcmread(io.BytesIO(data))
        try:
            answer = self.client.store_instances([dataset], dataset.StudyInstanceUID)
        except requests.HTTPError as exc:
            self._failed(exc.response, sop_instance_uid)
        except requests.Timeout:
            raise SendFailed("timeout", "the PACS did not answer STOW-RS in time") from None
        except requests.ConnectionError:
            raise SendFailed("unreachable", "cannot reach the PACS's STOW-RS service") from None
        except (ValueError, KeyError, TypeError, AttributeError, SyntaxError) as exc:
            # 200, but the body is not the DICOM JSON/XML it claims to be (ElementTree's ParseError is a SyntaxError)
            self._verify(sop_instance_uid, f"unreadable STOW-RS answer ({type(exc).__name__})")
            return
        stored = {str(item.get("ReferencedSOPInstanceUID", "")) for item in answer.get("ReferencedSOPSequence", [])}
        failed = {str(item.get("ReferencedSOPInstanceUID", "")): item.get("FailureReason")
                  for item in answer.get("FailedSOPSequence", [])}
        if sop_instance_uid in failed:
            reason = _reason(failed[sop_instance_uid])
            raise SendRefused(f"the PACS refused the object (STOW-RS failure reason {reason})")
        if sop_instance_uid not in stored:
            self._verify(sop_instance_uid, "the STOW-RS answer does not name the instance")

    def _failed(self, response: requests.Response, sop_instance_uid: str) -> None:
        status = response.status_code if response is not None else 0
        if status == 409:
            raise SendRefused(f"the PACS refused the object (STOW-RS 409{_failure_reason(response)})")
        if status in RETRY_STATUSES:
            raise SendFailed(f"http_{status}", f"the PACS answered STOW-RS with {status}")
        if status in (401, 403):
            raise SendFailed(f"http_{status}", f"the PACS refused the gateway's credentials ({status}); fix the "
                                               "configuration, the result waits")
        raise SendFailed(f"http_{status}", f"the PACS answered STOW-RS with {status}")

    def _verify(self, sop_instance_uid: str, why: str) -> None:
        try:
            found = self.client.search_for_instances(search_filters={"SOPInstanceUID": sop_instance_uid},
                                                     fields=["SOPInstanceUID"])
        except (requests.RequestException, ValueError) as exc:
            raise SendFailed("unverified", f"{why}, and QIDO-RS could not check it ({type(exc).__name__})") from None
        if not any(str(_value(item, "00080018")) == sop_instance_uid for item in found):
            raise SendFailed("not_stored", f"{why}, and QIDO-RS does not find the instance")
        log.warning("%s; QIDO-RS finds the instance stored", why)


def _value(item: dict, tag: str):
    values = (item.get(tag) or {}).get("Value") or [None]
    return values[0]


def _reason(code) -> str:
    try:
        return f"0x{int(code):04X}"
    except (TypeError, ValueError):
        return "not given"


def _failure_reason(response: requests.Response) -> str:
    """The first FailureReason of a 409's body (DICOM JSON), when it has one."""
    try:
        body = response.json()
        first = (body.get("00081198") or {}).get("Value", [{}])[0]
        return f", failure reason {_reason(_value(first, '00081197'))}"
    except (ValueError, AttributeError, IndexError, TypeError):
        return ""
