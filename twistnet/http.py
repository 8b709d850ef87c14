"""The twistnet-http service: not landed yet (issue 5)."""

from twisted.python import usage

from twistnet._tap import not_yet_available


class Options(usage.Options):
    """Placeholder options until the service lands."""

    longdesc = "Not available yet: see issue 5. The plugin name is reserved."


makeService = not_yet_available("issue 5")
