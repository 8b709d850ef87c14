"""twistd options and service for twistnet-http (being built, issue 5)."""

from twisted.python import usage

from twistnet._tap import not_yet_available


class Options(usage.Options):
    longdesc = "Not available yet: see issue 5."


makeService = not_yet_available("issue 5")
