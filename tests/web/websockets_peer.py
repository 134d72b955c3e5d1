"""A dashboard on the `websockets` library, run as a subprocess by the tests.

Usage: python websockets_peer.py URL TOKEN ORIGIN
Connects like a browser would (token as the subprotocol bearer.<token>, an
Origin header), then copies JSON lines from stdin to the socket and every
message from the socket to stdout as a JSON line. Stdin closed: a clean
close. Refused or closed: one last line {"refused": status, "reason": ...}
or {"closed": code, "reason": ...}.
"""

import asyncio
import json
import sys

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus


def emit(message) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


async def pump_stdin(ws) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    while line := await reader.readline():
        await ws.send(line.decode().strip())
    await ws.close()


async def main(url: str, token: str, origin: str) -> None:
    try:
        ws = await connect(url, subprotocols=["ssp-broker.v1.json", "bearer." + token],
                           origin=origin or None, proxy=None, open_timeout=10)
    except InvalidStatus as refused:
        emit({"refused": refused.response.status_code,
              "reason": refused.response.reason_phrase})
        return
    emit({"open": ws.subprotocol})
    sender = asyncio.ensure_future(pump_stdin(ws))
    try:
        async for message in ws:
            emit(json.loads(message))
    except ConnectionClosed:
        pass
    sender.cancel()
    emit({"closed": ws.close_code, "reason": ws.close_reason})


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
