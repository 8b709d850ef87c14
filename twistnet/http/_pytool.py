"""
Runs one Python tool in a child process: ``python -m twistnet.http._pytool module:function``.

The parameters arrive as a JSON object on stdin and are passed as keyword arguments; the
function's return value goes back as JSON on file descriptor 3, so whatever the function
prints stays ordinary output. An exception is a traceback on stderr and exit status 1.
"""

from __future__ import annotations

import importlib
import json
import os
import sys

#: The file descriptor the result is written to, opened by the runner.
RESULT_FD = 3


def main(argv: list[str]) -> int:
    module_name, _, function_name = argv[1].partition(":")
    params = json.loads(sys.stdin.read())
    function = getattr(importlib.import_module(module_name), function_name)
    result = function(**params)
    encoded = json.dumps(result, allow_nan=False)
    with os.fdopen(RESULT_FD, "w") as out:
        out.write(encoded)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
