"""
The ceiling for twisted.web: a bare leaf resource answering GET /jobs/ID with fixed JSON.
A third argument, C{httptools}, parses requests with the prototype of httptools_channel.py.
"""

import sys
from pathlib import Path

from twisted.internet import reactor
from twisted.web import resource, server

BODY = Path(sys.argv[2]).read_bytes()


class Jobs(resource.Resource):
    isLeaf = True

    def render_GET(self, request):
        request.setHeader(b"content-type", b"application/json")
        return BODY


root = resource.Resource()
root.putChild(b"jobs", Jobs())
site = server.Site(root)
site.displayTracebacks = False
if sys.argv[3:] == ["httptools"]:
    from httptools_channel import HttptoolsChannel

    site.protocol = HttptoolsChannel
port = reactor.listenTCP(int(sys.argv[1]), site, interface="127.0.0.1")
print(f"twisted-web listening on 127.0.0.1:{port.getHost().port}", flush=True)
reactor.run()
