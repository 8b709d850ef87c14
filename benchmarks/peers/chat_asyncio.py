"""An asyncio broadcast chat with the same behaviour as the classic one (chat_classic.py)."""

import asyncio
import sys


class Chat(asyncio.Protocol):
    clients: list["Chat"] = []
    counter = 0

    def connection_made(self, transport):
        self.transport = transport
        self.buffer = b""
        Chat.counter += 1
        self.name = f"guest-{Chat.counter}"
        Chat.clients.append(self)
        transport.write(f"Welcome, {self.name}! /NAME new to rename, /EXIT to leave.\r\n".encode())
        self.broadcast(f"* {self.name} joined")

    def connection_lost(self, exc):
        Chat.clients.remove(self)
        self.broadcast(f"* {self.name} left")

    def data_received(self, data):
        *lines, self.buffer = (self.buffer + data).split(b"\n")
        for line in lines:
            text = line.rstrip(b"\r").decode("utf-8", "replace")
            if text.startswith("/NAME "):
                old, self.name = self.name, text[6:].strip()
                self.broadcast(f"* {old} is now {self.name}")
            elif text.startswith("/EXIT"):
                self.transport.write(b"Bye!\r\n")
                self.transport.close()
                return
            else:
                self.broadcast(f"{self.name}: {text}")

    def broadcast(self, text):
        message = (text + "\r\n").encode()
        for client in Chat.clients:
            if client is not self:
                client.transport.write(message)


async def main():
    server = await asyncio.get_running_loop().create_server(Chat, "127.0.0.1", int(sys.argv[1]))
    print(f"asyncio-chat listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
