"""The asyncio echo of C{echo_asyncio.py}, unchanged, on the uvloop event loop."""

import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).parent))
from echo_asyncio import main

uvloop.run(main("uvloop-echo"))
