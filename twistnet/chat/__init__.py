"""
The chat service: a telnet-grade broadcast chat (C{twistd -n twistnet-chat}).

L{room} holds who is here and delivers messages (the L{room.IRoom} seam), L{protocol} speaks
to one connection (framing, telnet bytes, commands, limits), L{tap} is the twistd face.
"""

from twistnet.chat.tap import Options, makeService

__all__ = ["Options", "makeService"]
