"""The DICOM gateway's latency and throughput against a real Orthanc, next to the transformer's own latency.

    python benchmarks/gateway_latency.py [--films 50] [--senders 4] [--films-per-sender 10]
                                         [--model BUNDLE|models:/...] [--out runs/gateway_latency.json]

1. The serving stack (``LocalStack``: predictor + transformer) on the 224 px benchmark bundle of
   ``serving_throughput.py`` (untrained: speed does not depend on the weights) unless ``--model`` names a real
   one; Debian's Orthanc with its DICOMweb plugin (as the tests start it); the gateway as a real process
   (``python -m gateway``) sending results back by STOW-RS. SQLite and images in a temporary home.
2. Latency, one film at a time, N real X-rays from ``../shared/data/chest_xray_full`` as 16-bit DX films of
   about 2,500 px (10 MB):
   - transformer: the gateway's own client (``webapp.inference.InferenceClient``: the same v2 request with the
     heatmap, the same de-identified DICOM file the gateway sends) straight to the transformer;
   - gateway: from the end of the C-STORE (pynetdicom's response received) until the SR is queryable in
     Orthanc (QIDO-RS polled every 10 ms), and until all three results are; the C-STORE itself is reported
     too (receipt, de-identification and the cost-bounded preview happen before the gateway answers).
   "gateway adds" = median(end of C-STORE -> SR queryable) - median(transformer). Goal: <= 300 ms.
3. Throughput: ``--senders`` associations at once, each sending ``--films-per-sender`` films; films/s from
   the first send to the last SR stored; counted both ways (accepted by the gateway = sent, studies with their
   three results in Orthanc = sent: no loss).

Two warm-up films are not counted. Nothing else may run on the cores; the load average is written beside the
figures. Results: one JSON document (``--out``, and stdout).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from serving_throughput import build_bundle, cpu_info, load_images, log, write_report  # noqa: E402

SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.34"


def summary(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"n": len(a), "median_ms": round(float(np.median(a)), 1), "p95_ms": round(float(np.percentile(a, 95)), 1),
            "mean_ms": round(float(a.mean()), 1)}


def with_new_uids(film: bytes) -> tuple[bytes, str]:
    """The film as another instance of another study (new UIDs): (file, StudyInstanceUID)."""
    import pydicom
    from pydicom.uid import generate_uid

    ds = pydicom.dcmread(io.BytesIO(film))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue(), str(ds.StudyInstanceUID)


class Sender:
    """One association to the gateway, kept open (as a PACS's forwarding job keeps it)."""

    def __init__(self, port: int):
        from pynetdicom import AE

        ae = AE("BENCH")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1")  # DX, explicit/implicit little endian
        self.assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCOPE")
        if not self.assoc.is_established:
            raise SystemExit("no association with the gateway")

    def send(self, film: bytes) -> float:
        """C-STORE one film; returns the time its response arrived (perf_counter)."""
        import pydicom

        status = self.assoc.send_c_store(pydicom.dcmread(io.BytesIO(film)))
        done = time.perf_counter()
        if not status or int(status.Status) != 0:
            raise SystemExit(f"the gateway answered C-STORE with {status}")
        return done

    def close(self) -> None:
        self.assoc.release()


def wait_for(pacs, study_uid: str, count: int, timeout: float = 120.0) -> tuple[float, float]:
    """Poll QIDO-RS: (when the SR was first queryable, when all ``count`` results were)."""
    sr_at = None
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        found = pacs.qido_instances(study_uid)
        now = time.perf_counter()
        classes = [item["00080016"]["Value"][0] for item in found]
        if sr_at is None and SR_CLASS in classes:
            sr_at = now
        if len(found) >= count:
            return sr_at or now, now
        time.sleep(0.01)
    raise SystemExit(f"study {study_uid}: results not in the PACS after {timeout:.0f} s")


def run(films: int, senders: int, per_sender: int, model: str | None) -> dict:
    from gateway_fixtures import chest_dx, running_orthanc, start_gateway
    from serving.settings import ServingSettings
    from serving.stack import LocalStack
    from serving_fixtures import free_port_pair
    from webapp.inference import InferenceClient
    from webapp.uploads import check_upload
    from webapp_fixtures import full_res_xrays

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="pneumoscope-gw-bench-") as tmp:
        home = Path(tmp)
        model = model or str(build_bundle(ROOT / ".pneumoscope" / "bench" / "bundle224", load_images(32)[0]))
        settings = ServingSettings()
        if not model.startswith("models:/") and not settings.model_sha256:
            from model.bundle import Bundle

            settings = settings.model_copy(update={"model_sha256": Bundle.load(model, verify=False).sha256})
        stack = LocalStack(model, free_port_pair(), settings, log_file=home / "stack.log")
        log("starting the stack, Orthanc and the gateway")
        info = stack.start(timeout=300)
        base = [chest_dx(path) for path in full_res_xrays(min(films + 2, 10))]
        log(f"{len(base)} base films of {np.mean([len(f) for f in base]) / 1e6:.1f} MB (16-bit DX)")
        try:
            with running_orthanc() as pacs:
                gateway = start_gateway(home / "gateway", info["rest"], send_to=pacs.dicomweb,
                                        max_associations=senders + 1)
                try:
                    latency = _latency(films, base, pacs, gateway, info["rest"], InferenceClient, check_upload)
                    throughput = _throughput(senders, per_sender, base, pacs, gateway)
                finally:
                    gateway.stop()
        finally:
            stack.stop()
    load_after = os.getloadavg()
    return {"benchmark": "gateway_latency", "cpu": cpu_info(), "load_average_before": load_before,
            "load_average_after": load_after, "model": model, **latency, "throughput": throughput}


def _latency(films: int, base: list[bytes], pacs, gateway, rest: str, client_class, check_upload) -> dict:
    loop = asyncio.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    direct = client_class(rest, timeout_s=120)
    sender = Sender(gateway.port)
    times: dict[str, list[float]] = {"transformer": [], "c_store": [], "to_sr": [], "to_all_three": []}
    try:
        for i in range(films + 2):
            film, study = with_new_uids(base[i % len(base)])
            deidentified = check_upload(film, "application/dicom").data  # what the gateway sends the transformer
            started = time.perf_counter()
            asyncio.run_coroutine_threadsafe(direct.infer(deidentified), loop).result()
            transformer_ms = (time.perf_counter() - started) * 1000
            started = time.perf_counter()
            ended = sender.send(film)
            sr_at, all_at = wait_for(pacs, study, 3)
            if i < 2:
                continue  # warm-up
            times["transformer"].append(transformer_ms)
            times["c_store"].append((ended - started) * 1000)
            times["to_sr"].append((sr_at - ended) * 1000)
            times["to_all_three"].append((all_at - ended) * 1000)
            log(f"film {i - 1}/{films}: transformer {transformer_ms:.0f} ms, C-STORE {times['c_store'][-1]:.0f} ms, "
                f"SR after {times['to_sr'][-1]:.0f} ms, all three after {times['to_all_three'][-1]:.0f} ms")
    finally:
        sender.close()
        asyncio.run_coroutine_threadsafe(direct.aclose(), loop).result()
        loop.call_soon_threadsafe(loop.stop)
    stats = {name: summary(values) for name, values in times.items()}
    added = stats["to_sr"]["median_ms"] - stats["transformer"]["median_ms"]
    return {"latency": stats, "gateway_adds_to_median_ms": round(added, 1), "goal_ms": 300,
            "goal_met": added <= 300}


def _throughput(senders: int, per_sender: int, base: list[bytes], pacs, gateway) -> dict:
    accepted_before = gateway.metric("pneumoscope_gateway_received_total", outcome="accepted")
    batches = [[with_new_uids(base[(s * per_sender + i) % len(base)]) for i in range(per_sender)]
               for s in range(senders)]
    errors: list[str] = []

    def send_all(batch):
        try:
            sender = Sender(gateway.port)
            for film, _ in batch:
                sender.send(film)
            sender.close()
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(repr(exc))

    started = time.perf_counter()
    threads = [threading.Thread(target=send_all, args=(batch,)) for batch in batches]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sent_seconds = time.perf_counter() - started
    studies = [study for batch in batches for _, study in batch]
    for study in studies:
        wait_for(pacs, study, 3, timeout=600)
    seconds = time.perf_counter() - started
    complete = sum(len(pacs.qido_instances(study)) == 3 for study in studies)
    accepted = gateway.metric("pneumoscope_gateway_received_total", outcome="accepted") - accepted_before
    return {"senders": senders, "films_sent": len(studies), "accepted_by_gateway": int(accepted),
            "studies_with_three_results": complete, "lost": len(studies) - complete, "sender_errors": errors,
            "seconds_to_send": round(sent_seconds, 2), "seconds_to_last_result": round(seconds, 2),
            "films_per_second": round(len(studies) / seconds, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--films", type=int, default=50, help="films timed one at a time (after 2 warm-ups)")
    parser.add_argument("--senders", type=int, default=4, help="concurrent associations for the throughput run")
    parser.add_argument("--films-per-sender", type=int, default=10)
    parser.add_argument("--model", help="a bundle folder or models:/ URI (default: the untrained 224 px bundle)")
    parser.add_argument("--out", help="also write the JSON report here")
    args = parser.parse_args()
    os.environ.setdefault("PNEUMOSCOPE_ENGINE_TIMING_S", "0.5")
    write_report(run(args.films, args.senders, args.films_per_sender, args.model), args.out)


if __name__ == "__main__":
    main()
