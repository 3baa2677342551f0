"""The fault proxy against a loopback echo server: each fault, switched at run time."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from benchmarks.reliability.fault_proxy import FaultProxy

pytestmark = pytest.mark.asyncio(loop_scope="session")  # the fixtures' loop

WAIT_S = 5.0


class Echo:
    """A TCP echo server; counts the connections it accepted and saw reset."""

    def __init__(self) -> None:
        self.accepted = 0
        self.resets = 0
        self.server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionResetError:
            self.resets += 1
        finally:
            writer.close()

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port


@pytest_asyncio.fixture
async def echo() -> AsyncIterator[Echo]:
    e = Echo()
    e.server = await asyncio.start_server(e._serve, "127.0.0.1", 0)
    yield e
    e.server.close()


@pytest_asyncio.fixture
async def proxy(echo: Echo) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(echo.port) as p:
        yield p


async def connect(proxy: FaultProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(asyncio.open_connection("127.0.0.1", proxy.port), WAIT_S)


async def roundtrip(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                    data: bytes, limit_s: float = WAIT_S) -> float:
    started = time.monotonic()
    writer.write(data)
    await writer.drain()
    got = await asyncio.wait_for(reader.readexactly(len(data)), limit_s)
    assert got == data
    return time.monotonic() - started


async def test_forwards_both_ways_and_counts(proxy: FaultProxy, echo: Echo) -> None:
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"hello" * 1000)
    assert proxy.stats.bytes == {"up": 5000, "down": 5000}
    assert proxy.stats.accepted == 1 and proxy.stats.active == 1
    writer.close()
    for _ in range(200):
        if proxy.stats.active == 0:
            break
        await asyncio.sleep(0.01)
    assert proxy.stats.active == 0
    assert echo.accepted == 1


async def test_latency_delays_each_chunk_without_serializing_them(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    base = await roundtrip(reader, writer, b"x")
    proxy.set_latency(0.15)
    slowed = await roundtrip(reader, writer, b"y")
    assert slowed >= 0.3 > base, (base, slowed)
    # Ten chunks sent at once arrive about one round trip later, not ten.
    started = time.monotonic()
    for i in range(10):
        writer.write(bytes([i]) * 100)
        await writer.drain()
        await asyncio.sleep(0.01)
    await asyncio.wait_for(reader.readexactly(1000), WAIT_S)
    assert time.monotonic() - started < 1.0
    proxy.set_latency(0.0, "up")
    assert 0.15 <= await roundtrip(reader, writer, b"z") < 0.3


async def test_bandwidth_cap(proxy: FaultProxy) -> None:
    reader, writer = await connect(proxy)
    proxy.set_bandwidth(100_000, "down")
    took = await roundtrip(reader, writer, b"b" * 50_000)
    assert took >= 0.45, took
    proxy.heal()
    assert await roundtrip(reader, writer, b"b" * 50_000) < 0.3


async def test_hang_holds_data_and_new_connections_until_resumed(
        proxy: FaultProxy, echo: Echo) -> None:
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"before")
    proxy.hang()
    writer.write(b"held")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.readexactly(4), 0.3)
    # A new connection is accepted (like a stopped process's backlog) but goes nowhere.
    reader2, writer2 = await connect(proxy)
    writer2.write(b"second")
    await asyncio.sleep(0.2)
    assert echo.accepted == 1
    proxy.resume()
    assert await asyncio.wait_for(reader.readexactly(4), WAIT_S) == b"held"
    assert await asyncio.wait_for(reader2.readexactly(6), WAIT_S) == b"second"
    assert echo.accepted == 2


async def test_reset_kills_open_connections_on_both_sides(
        proxy: FaultProxy, echo: Echo) -> None:
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"ok")
    assert proxy.reset() == 1
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(10), WAIT_S)
    for _ in range(200):
        if echo.resets:
            break
        await asyncio.sleep(0.01)
    assert echo.resets == 1
    # ... and the proxy still serves new connections.
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"again")


async def test_reset_new_connections(proxy: FaultProxy, echo: Echo) -> None:
    proxy.reset_new(True)
    reader, writer = await connect(proxy)
    writer.write(b"x")
    with pytest.raises(ConnectionResetError):
        await asyncio.wait_for(reader.read(10), WAIT_S)
    assert echo.accepted == 0
    proxy.reset_new(False)
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"fine")


async def test_refuse_closes_the_port_and_reopens_it(proxy: FaultProxy) -> None:
    port = proxy.port
    await proxy.refuse(True)
    with pytest.raises(ConnectionRefusedError):
        await connect(proxy)
    await proxy.refuse(False)
    assert proxy.port == port
    reader, writer = await connect(proxy)
    await roundtrip(reader, writer, b"back")
