"""A FastAPI app on a real uvicorn server on a free loopback port, in the test's loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import uvicorn
from fastapi import FastAPI

from stages.common.ws_reads import QueuedReadsProtocol


@contextlib.asynccontextmanager
async def serving(app: FastAPI, wait_ready: bool = True, lifespan: str = "on"
                  ) -> AsyncIterator[tuple[int, uvicorn.Server]]:
    """``app`` served until the block ends; yields its port and the server. With
    ``wait_ready`` the block starts once ``/readyz`` answers 200 (needs the lifespan)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan=lifespan, log_level="warning",
                            timeout_graceful_shutdown=5, ws=QueuedReadsProtocol,
                            ws_per_message_deflate=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        for _ in range(500):
            if server.started:
                break
            await asyncio.sleep(0.01)
        assert server.started, "uvicorn did not start"
        if wait_ready:
            async with httpx.AsyncClient() as http:
                for _ in range(500):
                    if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.01)
        yield port, server
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 15)
        sock.close()
