"""A bare aiohttp handler answering GET /jobs/{id} with the same fixed JSON."""

import asyncio
import sys
from pathlib import Path

from aiohttp import web

BODY = Path(sys.argv[2]).read_bytes()


async def job(request: web.Request) -> web.Response:
    return web.Response(body=BODY, content_type="application/json")


async def main() -> None:
    app = web.Application()
    app.router.add_get("/jobs/{id}", job)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(sys.argv[1]))
    await site.start()
    port = runner.addresses[0][1]
    print(f"aiohttp listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
