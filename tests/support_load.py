"""The client side of tests/system/test_load.py, run as a child process so that it neither shares
the server's interpreter lock nor counts in its memory: `python support_load.py URL` sends one
wave of CLIENTS clients at once, prints FIRST_429 as soon as one is refused, then the statuses as
one JSON line."""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter

KEY = "load-key-0123456789"
CLIENTS, REQUESTS_EACH = 1000, 2
TASKS = {"c0": "classify", "c1": "classify", "e0": "embed", "base": "embed"}
FIRST_429 = "first-429"


async def wave(url: str) -> dict:
    """CLIENTS clients at once, each with its own connection making REQUESTS_EACH requests.
    Plain HTTP/1.1 over asyncio streams: a pooled client's bookkeeping grows with the number of
    connections, and would measure itself rather than the server."""
    host, port = url.removeprefix("http://").split(":")
    statuses: Counter = Counter()
    problems: list[str] = []
    go = asyncio.Event()
    announced: list[int] = []
    connected: list[int] = []

    async def client(n: int) -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        connected.append(n)
        if len(connected) == CLIENTS:  # the last one in starts them all
            go.set()
        await go.wait()
        try:
            for i in range(REQUESTS_EACH):
                task = list(TASKS)[(n + i) % len(TASKS)]
                body = json.dumps({"texts": [f"client {n} {i}"]}).encode()
                writer.write(f"POST /v1/tasks/{task}/{TASKS[task]} HTTP/1.1\r\nHost: {host}\r\n"
                             f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
                await writer.drain()
                status = int((await reader.readline()).split()[1])
                headers = {}
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers["content-length"]))
                statuses[status] += 1
                if status == 429 and not announced:
                    announced.append(n)
                    print(FIRST_429, flush=True)
                if status == 429 and int(headers.get("retry-after", "0")) < 1:
                    problems.append(f"client {n}: 429 without Retry-After")
                if headers.get("connection") == "close":
                    problems.append(f"client {n}: the server closed the connection")
                    return
        except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
            problems.append(f"client {n}: {exc!r}")
        finally:
            writer.close()

    clients = [asyncio.create_task(client(n)) for n in range(CLIENTS)]
    await asyncio.gather(*clients)
    return {"statuses": {str(k): v for k, v in statuses.items()}, "problems": problems}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(wave(sys.argv[1]))))
