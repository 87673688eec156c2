"""A TCP proxy that injects network faults between a client and a real server (moto_server, PostgreSQL, ...).

The server stays real and keeps its state (moto_server forgets every bucket when it restarts); only the path
to it fails, the way a network, a load balancer or a restarting pod fails:

- ``pass``: bytes flow both ways;
- ``refuse``: new connections are reset at once (a server that is down), open ones are cut;
- ``hang``: new connections are accepted and never answered (a black hole: the client's timeouts decide);
- ``cut``: each new connection forwards at most ``cut_after`` bytes from the client, then both sides are closed
  (a request whose body is cut halfway, as when a pod dies mid-upload).

Standard library only; runs an asyncio loop in a daemon thread; ``with FaultProxy(port) as proxy:``.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading


class FaultProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1"):
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.cut_after = 0
        self.connections = 0
        self._writers: set[asyncio.StreamWriter] = set()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="fault-proxy")
        self.port = 0

    # -- control -----------------------------------------------------------------------------------------
    def set(self, mode: str, cut_after: int = 0) -> None:
        if mode not in ("pass", "refuse", "hang", "cut"):
            raise ValueError(mode)
        self.mode, self.cut_after = mode, cut_after
        if mode in ("refuse", "cut"):
            asyncio.run_coroutine_threadsafe(self._close_all(), self._loop).result(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "FaultProxy":
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    # -- the loop ------------------------------------------------------------------------------------------
    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        server.close()

    async def _close_all(self) -> None:
        for writer in list(self._writers):
            _reset(writer)

    async def _handle(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        mode, cut_after = self.mode, self.cut_after
        if mode == "refuse":
            _reset(client_writer)
            return
        if mode == "hang":
            self._writers.add(client_writer)
            try:
                while await client_reader.read(65536):
                    pass
            finally:
                self._writers.discard(client_writer)
            return
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            _reset(client_writer)
            return
        self._writers.update((client_writer, server_writer))
        limit = cut_after if mode == "cut" else None
        try:
            await asyncio.gather(self._pipe(client_reader, server_writer, limit, client_writer),
                                 self._pipe(server_reader, client_writer, None, server_writer))
        finally:
            self._writers.difference_update((client_writer, server_writer))

    @staticmethod
    async def _pipe(reader, writer, limit: int | None, other) -> None:
        sent = 0
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                if limit is not None and sent + len(data) >= limit:
                    writer.write(data[:max(0, limit - sent)])
                    await writer.drain()
                    _reset(writer)
                    _reset(other)
                    return
                sent += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            if not writer.is_closing():
                writer.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST (SO_LINGER 0), as a crashed peer or a refused port looks to the client."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.close()
