"""
The uvloop echo on a port shared with SO_REUSEPORT: start it N times on one port, as a user
runs an asyncio server on N cores (the kernel spreads the connections).
"""

import asyncio
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).parent))
from echo_asyncio import Echo


async def main() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", int(sys.argv[1]), reuse_port=True)
    port = server.sockets[0].getsockname()[1]
    print(f"uvloop-echo (SO_REUSEPORT) listening on 127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


uvloop.run(main())
