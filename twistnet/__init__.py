"""twistnet: small, robust network services on Twisted."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("twistnet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
