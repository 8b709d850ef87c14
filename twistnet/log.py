"""The twistnet-log service: not landed yet (issue 4)."""

from twisted.python import usage

from twistnet._tap import not_yet_available


class Options(usage.Options):
    """Placeholder options until the service lands."""

    longdesc = "Not available yet: see issue 4. The plugin name is reserved."


makeService = not_yet_available("issue 4")
