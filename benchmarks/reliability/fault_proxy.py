"""A small TCP proxy on loopback whose faults are switched at run time.

``FaultProxy(target_port)`` listens on a free loopback port and forwards every connection
to ``127.0.0.1:target_port``. Between the two it can inject, per direction (``up``: client
to target, ``down``: target to client):

- ``latency_s``: each chunk is delivered that long after it arrived (a pipeline, so
  throughput is kept: what a long link does);
- ``bandwidth_bps``: bytes per second at most (a slow link);

and for the whole proxy:

- ``hang()`` / ``resume()``: nothing is forwarded any more, in either direction, and new
  connections are accepted but not connected onwards: a process stopped with SIGSTOP (the
  kernel still completes handshakes, the data waits). ``resume()`` delivers what waited;
- ``reset()``: every open connection is reset (RST, via ``SO_LINGER`` 0) on both sides;
  ``reset_new(True)``: every new connection is reset as soon as it is accepted;
- ``refuse(True)``: the listening socket is closed, so connects are refused (a process that
  died); ``refuse(False)`` listens again on the same port.

Faults apply to connections already open as well as to new ones (except ``reset_new``).
The proxy counts connections and bytes (``stats``).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down"]
CHUNK = 64 * 1024
QUEUED_CHUNKS = 16  # per direction and connection, waiting for delivery


@dataclass
class LinkFaults:
    """One direction's faults."""

    latency_s: float = 0.0
    bandwidth_bps: float | None = None  # None: unlimited


@dataclass
class ProxyStats:
    accepted: int = 0
    active: int = 0
    resets: int = 0
    bytes: dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})


def _rst(writer: asyncio.StreamWriter) -> None:
    """Close with RST instead of FIN: SO_LINGER on, 0 s."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Connection:
    def __init__(self, proxy: FaultProxy, client: asyncio.StreamWriter) -> None:
        self.proxy = proxy
        self.client = client
        self.upstream: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []

    def reset(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _rst(writer)
        for task in self.tasks:
            task.cancel()


class FaultProxy:
    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.target = (target_host, target_port)
        self.port = port
        self.links: dict[Direction, LinkFaults] = {"up": LinkFaults(), "down": LinkFaults()}
        self.stats = ProxyStats()
        self._server: asyncio.Server | None = None
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._reset_new = False
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FaultProxy:
        await self._listen()
        return self

    async def __aenter__(self) -> FaultProxy:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port,
                                                  reuse_address=True)
        self.port = self._server.sockets[0].getsockname()[1]

    # ------------------------------------------------------------------ faults
    def set_latency(self, seconds: float, direction: Direction | None = None) -> None:
        for d in ("up", "down") if direction is None else (direction,):
            self.links[d].latency_s = seconds

    def set_bandwidth(self, bytes_per_s: float | None, direction: Direction | None = None
                      ) -> None:
        for d in ("up", "down") if direction is None else (direction,):
            self.links[d].bandwidth_bps = bytes_per_s

    def hang(self) -> None:
        self._flowing.clear()

    def resume(self) -> None:
        self._flowing.set()

    @property
    def hanging(self) -> bool:
        return not self._flowing.is_set()

    def reset(self) -> int:
        """Reset every open connection; how many."""
        conns = list(self._connections)
        for conn in conns:
            conn.reset()
        self.stats.resets += len(conns)
        return len(conns)

    def reset_new(self, on: bool) -> None:
        self._reset_new = on

    async def refuse(self, on: bool) -> None:
        if on and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif not on and self._server is None:
            await self._listen()

    def heal(self) -> None:
        """Back to a plain proxy (``refuse`` is left as it is: it is async)."""
        self.set_latency(0.0)
        self.set_bandwidth(None)
        self._reset_new = False
        self.resume()

    async def aclose(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.resume()
        for conn in list(self._connections):
            conn.reset()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)

    # ------------------------------------------------------------------ forwarding
    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        with contextlib.suppress(asyncio.CancelledError):  # aclose(): not an error
            await self._forward(task, reader, writer)

    async def _forward(self, task: asyncio.Task[None], reader: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        self.stats.accepted += 1
        conn = _Connection(self, writer)
        try:
            if self._reset_new:
                self.stats.resets += 1
                _rst(writer)
                return
            self._connections.add(conn)
            self.stats.active += 1
            try:
                await self._flowing.wait()
                try:
                    up_reader, up_writer = await asyncio.open_connection(*self.target)
                except OSError:
                    _rst(writer)
                    return
                conn.upstream = up_writer
                conn.tasks = [asyncio.create_task(self._pump(conn, reader, up_writer, "up")),
                              asyncio.create_task(self._pump(conn, up_reader, writer, "down"))]
                await asyncio.gather(*conn.tasks, return_exceptions=True)
            finally:
                self._connections.discard(conn)
                self.stats.active -= 1
                for w in (writer, conn.upstream):
                    if w is not None:
                        w.close()
        finally:
            self._handlers.discard(task)

    async def _pump(self, conn: _Connection, reader: asyncio.StreamReader,
                    writer: asyncio.StreamWriter, direction: Direction) -> None:
        """Read chunks as they come; a second task delivers each at arrival + latency. The
        queue is bounded, so a hung or slow link pushes back on the sender like a full
        socket buffer. A side that fails (reset) resets the other side too."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUED_CHUNKS)
        deliver = asyncio.create_task(self._deliver(conn, queue, writer, direction))
        try:
            while True:
                data = await reader.read(CHUNK)
                await queue.put((time.monotonic(), data))
                if not data:
                    break
            await deliver
        except OSError:
            conn.reset()
        finally:
            if not deliver.done():
                deliver.cancel()
                with contextlib.suppress(asyncio.CancelledError, OSError):
                    await deliver

    async def _deliver(self, conn: _Connection, queue: asyncio.Queue[tuple[float, bytes]],
                       writer: asyncio.StreamWriter, direction: Direction) -> None:
        try:
            await self._deliver_loop(queue, writer, direction)
        except OSError:
            conn.reset()

    async def _deliver_loop(self, queue: asyncio.Queue[tuple[float, bytes]],
                            writer: asyncio.StreamWriter, direction: Direction) -> None:
        link = self.links[direction]
        while True:
            arrived, data = await queue.get()
            wait = arrived + link.latency_s - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            await self._flowing.wait()
            if not data:
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            while data:
                piece = data
                if link.bandwidth_bps:  # ~20 pieces a second at the cap
                    piece = data[:max(1, int(link.bandwidth_bps / 20))]
                data = data[len(piece):]
                writer.write(piece)
                await writer.drain()
                self.stats.bytes[direction] += len(piece)
                if link.bandwidth_bps:
                    await asyncio.sleep(len(piece) / link.bandwidth_bps)
