"""Load generation for the overload and soak benchmarks: open- and closed-loop REST clients, RSS sampling.

Every request is one real X-ray sent to the transformer over REST v2 (binary extension), as
``pneumoscope predict --protocol v2`` does. Each result records when it was sent, how long it took,
and its HTTP status (or ``error`` when no status came back within the client timeout).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import numpy as np

from model.wire_format import bytes_input, encode_request


@dataclass
class Result:
    sent: float  # seconds since the start of the run
    latency_s: float
    status: str  # "200", "503", ..., or "error"


def v2_request(data: bytes) -> tuple[bytes, dict]:
    return encode_request([bytes_input("image", [data])])


def percentiles(latencies_s, *qs) -> list[float | None]:
    if not len(latencies_s):
        return [None for _ in qs]
    values = np.asarray(latencies_s) * 1000.0
    return [round(float(np.percentile(values, q)), 1) for q in qs]


def summarize(results: list[Result]) -> dict:
    by_status: dict[str, list[float]] = {}
    for r in results:
        by_status.setdefault(r.status, []).append(r.latency_s)
    out = {"requests": len(results), "statuses": {k: len(v) for k, v in sorted(by_status.items())}}
    for status, latencies in by_status.items():
        p50, p99, worst = percentiles(latencies, 50, 99, 100)
        out[f"latency_ms_{status}"] = {"p50": p50, "p99": p99, "max": worst}
    return out


def rss_mib(pid: int) -> float | None:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class RssSampler:
    """Samples the RSS of the given processes every ``every_s`` seconds in a background thread."""

    def __init__(self, pids: dict[str, int], every_s: float = 1.0):
        self.pids, self.every_s = pids, every_s
        self.samples: list[tuple[float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.started = time.perf_counter()

    def _run(self):
        while not self._stop.wait(self.every_s):
            self.samples.append((time.perf_counter() - self.started, {r: rss_mib(p) for r, p in self.pids.items()}))

    def __enter__(self):
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


class RawConnections:
    """Keep-alive HTTP/1.1 connections for the load generators: one request at a time on each, pre-encoded, the
    answer read by its status line and Content-Length only. A fraction of a millisecond of CPU per request,
    where an httpx client costs a millisecond or more: at four times the saturation rate on the servers' own
    2 cores, httpx fell seconds behind its schedule and measured its own queue, not the server's."""

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    @classmethod
    def for_url(cls, url: str) -> "RawConnections":
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        return cls(parts.hostname, parts.port or 80)

    async def request(self, raw: bytes, timeout_s: float) -> str:
        """Send ``raw``: the answer's HTTP status, or ``error``."""
        return (await self.fetch(raw, timeout_s))[0]

    async def fetch(self, raw: bytes, timeout_s: float) -> tuple[str, bytes]:
        """Send ``raw`` and read the answer: (its HTTP status or ``error``, its body). A kept-alive connection that
        the server closed (nginx closes its idle ones when it reloads, as when the drill adds a replica) is
        replaced, and a request that found it closed without a byte of answer is sent once more on a new one, as
        HTTP clients do (RFC 9112, 9.3.1): the server never read it."""
        while self.idle:
            reader, writer = self.idle.pop()
            if not (reader.at_eof() or writer.is_closing()):
                status, body = await self._exchange(reader, writer, raw, timeout_s)
                if status != "closed":
                    return status, body
                break
            writer.close()
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), timeout_s)
        except (OSError, asyncio.TimeoutError):
            return "error", b""
        status, body = await self._exchange(reader, writer, raw, timeout_s)
        return ("error" if status == "closed" else status), body

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()

    async def _exchange(self, reader, writer, raw: bytes, timeout_s: float) -> tuple[str, bytes]:
        """One request on one connection: (its status, body); ``closed`` when it ended before any answer."""
        keep = answered = False
        try:
            writer.write(raw)
            status_line = await asyncio.wait_for(reader.readline(), timeout_s)
            if not status_line:
                return "closed", b""
            length, keep, answered = 0, True, True
            while (line := await reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.decode("latin-1").partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
                elif name.strip().lower() == "connection" and value.strip().lower() == "close":
                    keep = False
            body = await reader.readexactly(length)
            return status_line.split()[1].decode(), body
        except ConnectionResetError:
            keep = False
            return ("error" if answered else "closed"), b""
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, IndexError, ValueError):
            keep = False
            return "error", b""
        finally:
            if keep:
                self.idle.append((reader, writer))
            else:
                writer.close()


def raw_requests(url: str, payloads: list[tuple[bytes, dict]]) -> list[bytes]:
    """Each (body, headers) as the bytes of one HTTP/1.1 POST to ``url``."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    raws = []
    for body, headers in payloads:
        given = {k.lower() for k in headers}
        fields = {**({} if "content-type" in given else {"Content-Type": "application/json"}), **headers}
        extra = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
        raws.append(f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nContent-Length: {len(body)}\r\n"
                    f"{extra}\r\n".encode() + body)
    return raws


def _run(coroutine):
    try:
        import uvloop  # the servers' loop: cheaper per request than asyncio's own

        return uvloop.run(coroutine)
    except ImportError:
        return asyncio.run(coroutine)


def open_loop(url: str, payloads: list[tuple[bytes, dict]], rate_per_s: float, seconds: float,
              timeout_s: float = 30.0) -> list[Result]:
    """Requests arrive at a fixed rate whatever the answers do (a crowd, not a polite client). Each latency runs
    from the request's scheduled time, so a generator that falls behind shows it (no coordinated omission)."""
    raws = raw_requests(url, payloads)

    async def run() -> list[Result]:
        out: list[Result] = []
        connections = RawConnections.for_url(url)

        async def one(n: int, due: float, t0: float) -> None:
            status = await connections.request(raws[n % len(raws)], timeout_s)
            out.append(Result(due, time.perf_counter() - t0 - due, status))

        t0 = time.perf_counter()
        tasks, n = [], 0
        while (now := time.perf_counter() - t0) < seconds:
            due = n / rate_per_s
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.ensure_future(one(n, due, t0)))
            n += 1
        await asyncio.gather(*tasks)
        connections.close()
        return out

    return _run(run())


def closed_loop(url: str, payloads: list[tuple[bytes, dict]], clients: int, seconds: float,
                timeout_s: float = 60.0, on_result=None, retry_pause_s: float = 0.05,
                stop: threading.Event | None = None) -> list[Result]:
    """``clients`` clients, each sending its next request when the last one is answered (after a refusal,
    ``retry_pause_s`` later: 1.0 is what the servers' Retry-After asks for), for ``seconds`` or until ``stop``.

    All of them on one event loop, each with its own kept-alive connection and pre-encoded requests: the
    generator shares the cores with the servers, and 16 httpx threads spent about 2 ms of CPU per request there
    (the same cost that made the open loop fall behind, :class:`RawConnections`)."""
    raws = raw_requests(url, payloads)

    async def run() -> list[Result]:
        out: list[Result] = []
        t0 = time.perf_counter()
        stop_at = t0 + seconds

        async def client(k: int) -> None:
            connection = RawConnections.for_url(url)
            i = k * 13
            while time.perf_counter() < stop_at and not (stop is not None and stop.is_set()):
                sent = time.perf_counter()
                status = await connection.request(raws[i % len(raws)], timeout_s)
                result = Result(sent - t0, time.perf_counter() - sent, status)
                out.append(result)
                if on_result is not None:
                    on_result(result)
                if status == "503":
                    await asyncio.sleep(retry_pause_s)
                i += 1
            connection.close()

        await asyncio.gather(*(client(k) for k in range(clients)))
        return out

    return _run(run())


class HeldRequest:
    """A raw HTTP/1.1 POST whose headers and first half of the body are sent: admitted (it holds a slot) and
    answered only after :meth:`finish`. Holds a server at its limit without using its CPU (no timing
    assumptions about how fast the server is)."""

    def __init__(self, url: str, path: str, body: bytes, headers: dict | None = None):
        import socket

        host, port = url.removeprefix("http://").split(":")
        self.body = body
        self.sock = socket.create_connection((host, int(port)), timeout=120)
        given = {k.lower() for k in (headers or {})}
        headers = {**({} if "content-type" in given else {"Content-Type": "application/json"}), **(headers or {})}
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
                          .encode() + body[:len(body) // 2])

    def finish(self) -> tuple[int, dict]:
        """Send the rest of the body; the answer's status and JSON body."""
        self.sock.sendall(self.body[len(self.body) // 2:])
        return self.response()

    def response(self) -> tuple[int, dict]:
        import json

        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed before a response")
            data += chunk
        head, rest = data.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        fields = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
        length = int(fields.get("content-length", 0))
        while len(rest) < length:
            rest += self.sock.recv(65536)
        self.sock.close()
        try:
            answer = json.loads(rest[:length] or b"{}")
        except ValueError:
            answer = {}
        return int(lines[0].split()[1]), answer if isinstance(answer, dict) else {"body": answer}

    def close(self) -> None:
        self.sock.close()
