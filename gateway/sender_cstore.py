"""Send a result to the PACS with C-STORE (pynetdicom), one association per send.

Success and warnings (0x0000, 0xB000-0xBFFF) mean stored; "Refused: Out of Resources" (0xA7xx) and a PACS that
does not answer or refuses the association are tried again later; any other failure (0xA9xx: does not match the
SOP class, 0xCxxx: cannot understand, ...) is refused for good, with the status and the PACS's comment.
"""

from __future__ import annotations

import io

import pydicom

from gateway.outbox import SendFailed, SendRefused


class CStoreSender:
    def __init__(self, calling_ae: str, called_ae: str, host: str, port: int, timeout_s: float):
        self.calling_ae, self.called_ae, self.host, self.port = calling_ae, called_ae, host, port
        self.timeout_s = timeout_s

    def send(self, data: bytes, sop_instance_uid: str) -> None:
        from pynetdicom import AE

        dataset = pydicom.dcmread(io.BytesIO(data))
        ae = AE(self.calling_ae)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.add_requested_context(dataset.SOPClassUID, dataset.file_meta.TransferSyntaxUID)
        assoc = ae.associate(self.host, self.port, ae_title=self.called_ae)
        if not assoc.is_established:
            raise SendFailed("unreachable", f"no association with {self.called_ae}@{self.host}:{self.port} "
                                            f"({'rejected' if assoc.is_rejected else 'no answer'})")
        try:
            status = assoc.send_c_store(dataset)
        finally:
            assoc.release()
        if not status or "Status" not in status:
            raise SendFailed("no_answer", "the PACS did not answer the C-STORE")
        code = int(status.Status)
        if code == 0 or 0xB000 <= code <= 0xBFFF:
            return
        comment = str(status.get("ErrorComment", "") or "")[:64]
        if 0xA700 <= code <= 0xA7FF:
            raise SendFailed("out_of_resources", f"the PACS is out of resources (C-STORE status 0x{code:04X})")
        detail = f": {comment}" if comment else ""
        raise SendRefused(f"the PACS refused the object (C-STORE status 0x{code:04X}{detail})")
