"""
A bare aiohttp handler answering GET /jobs/{id} with the same fixed JSON: one process
(`python http_aiohttp.py PORT JOB.json`), or under gunicorn as a user runs it on N cores
(`gunicorn -k aiohttp.GunicornWebWorker http_aiohttp:gunicorn_app`, the JSON file named by
$TWISTNET_JOB_JSON).
"""

import asyncio
import os
import sys
from pathlib import Path

from aiohttp import web


def make_app(body: bytes) -> web.Application:
    async def job(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/jobs/{id}", job)
    return app


async def gunicorn_app() -> web.Application:
    return make_app(Path(os.environ["TWISTNET_JOB_JSON"]).read_bytes())


async def main() -> None:
    runner = web.AppRunner(make_app(Path(sys.argv[2]).read_bytes()), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", int(sys.argv[1]))
    await site.start()
    port = runner.addresses[0][1]
    print(f"aiohttp listening on 127.0.0.1:{port}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
