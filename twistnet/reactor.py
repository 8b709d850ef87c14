"""
The reactor twistnet runs on: Twisted's epoll reactor without the legacy log context it wraps
around every read and write (L{twistnet._internals.DirectDispatchEPollReactor}; the why is in
docs/architecture.md).

C{twistd --reactor twistnet} installs it through the reactor plugin in
C{twisted/plugins/twistnet_plugins.py}; the services' twistd plugins install it when the
operator names no reactor (L{ServiceMaker}); C{twistd --reactor epoll ...} keeps Twisted's
stock one. Where epoll(7) is absent, Twisted's default reactor for the platform runs instead,
and a log line says so.

Nothing here imports C{twisted.internet.reactor}: importing this module must not install the
default reactor that it exists to replace.
"""

from __future__ import annotations

import sys

from twisted.application import service
from twisted.logger import Logger

log = Logger()

#: The short name of the reactor plugin: C{twistd --reactor twistnet}.
SHORT_NAME = "twistnet"

#: What C{install()} logs when it has to fall back.
NO_EPOLL = "epoll(7) is not available here: running Twisted's default reactor, not twistnet's"


def install() -> None:
    """
    Install the twistnet reactor as the global reactor (Twisted's platform default where
    epoll is absent); raises C{ReactorAlreadyInstalledError} if a reactor is installed.
    """
    from twisted.internet.main import installReactor

    from twistnet._internals import EPollReactor

    if EPollReactor is None:
        from twisted.internet import default

        log.warn(NO_EPOLL)
        default.install()
        return
    from twistnet._internals import DirectDispatchEPollReactor

    installReactor(DirectDispatchEPollReactor())


def installed() -> bool:
    """Whether some reactor, any, is already the global one."""
    return "twisted.internet.reactor" in sys.modules


def install_default() -> bool:
    """
    Install the twistnet reactor unless a reactor is installed already (C{twistd --reactor}
    parses before the service's options, so an operator's choice always wins). Returns
    whether it installed one.
    """
    if installed():
        return False
    install()
    log.info(
        "running on the twistnet reactor, the default; "
        "`twistd --reactor epoll ...` runs Twisted's stock one"
    )
    return True


class ServiceMaker(service.ServiceMaker):
    """
    A twistd plugin for a twistnet service: the same as Twisted's, except that it puts the
    twistnet reactor in place before the service's module is imported, when twistd asks for
    its options (one of its dependencies, txredisapi, imports the global reactor at import
    time, which would install Twisted's default).
    """

    @property
    def options(self):
        install_default()
        return super().options
