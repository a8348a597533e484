"""The OIP front's HTTP/1.1 server (daemon/oip/http_server.py) on a real loopback socket, with a
handler of the test's own: keep-alive, HEAD, pipelined requests answered in order, chunked bodies,
413 for a body over the limit, 400 for a malformed request, 431 for a head that never ends, idle
connections closed, a request
under way answered through close(grace), and the time per request recorded when asked."""
from __future__ import annotations

import asyncio
import json
import re

import pytest

from inferd.daemon.oip.http_server import MAX_HEAD_BYTES, HttpServer, Response
from inferd.daemon.oip.timings import Timings

pytestmark = pytest.mark.timeout(60)
_LENGTH = re.compile(rb"(?im)^content-length: *(\d+)")


async def _echo(request):
    if request.path == "/slow":
        await asyncio.sleep(0.3)                                # noqa: sleep-ok (a request still under way)
    body = json.dumps({"method": request.method, "path": request.path, "size": len(request.body),
                       "x": request.headers.get("x-thing", "")}).encode()
    return Response(200, body, "application/json", {"X-Echo": "1"})


async def _serving(max_body=1 << 16, idle=30.0):
    server = HttpServer(_echo, max_body=max_body, idle_timeout_s=idle)
    port = await server.start(host="127.0.0.1", port=0)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    return server, reader, writer


async def _reply(reader) -> tuple[bytes, dict | bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    body = await asyncio.wait_for(reader.readexactly(int(_LENGTH.search(head).group(1))), 10)
    return head, (json.loads(body) if body else body)


async def _closed(reader) -> bool:
    return await asyncio.wait_for(reader.read(), 10) == b""


def test_keep_alive_head_and_pipelined_requests_in_order():
    async def main():
        server, reader, writer = await _serving()
        try:
            writer.write(b"POST /a%20b?q=1 HTTP/1.1\r\nHost: x\r\nX-Thing: yes\r\nContent-Length: 5\r\n\r\nhello")
            head, body = await _reply(reader)
            assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"X-Echo: 1\r\n" in head and b"Date: " in head
            assert body == {"method": "POST", "path": "/a b", "size": 5, "x": "yes"}
            writer.write(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n")
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert int(_LENGTH.search(head).group(1)) > 0           # the GET's length, and no body follows
            # three requests in one write, the first slow: answered in the order sent
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
                         b"POST /3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            paths = [(await _reply(reader))[1] for _ in range(3)]
            assert [(p["path"], p["size"]) for p in paths] == [("/slow", 0), ("/2", 0), ("/3", 5)]
            writer.write(b"GET /last HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            head, _ = await _reply(reader)
            assert b"Connection: close" in head and await _closed(reader)
        finally:
            writer.close()
            await server.close(1.0)
    asyncio.run(main())


def test_a_body_over_the_limit_is_413_and_a_malformed_request_400():
    async def main():
        server, reader, writer = await _serving(max_body=1000)
        try:
            writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"z" * 5000)
            head, body = await _reply(reader)
            assert head.startswith(b"HTTP/1.1 413") and "oip.max_request_bytes" in body["error"]
            assert await _closed(reader)
            writer.close()
            # chunked: the size is known only as it arrives
            reader, writer = await asyncio.open_connection("127.0.0.1", server._server.sockets[0].getsockname()[1])
            writer.write(b"POST /big HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + b"".join(b"200\r\n" + b"z" * 512 + b"\r\n" for _ in range(4)) + b"0\r\n\r\n")
            head, body = await _reply(reader)
            assert head.startswith(b"HTTP/1.1 413") and await _closed(reader)
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", server._server.sockets[0].getsockname()[1])
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
            head, body = await _reply(reader)
            assert head.startswith(b"HTTP/1.1 400") and body["error"] and await _closed(reader)
            writer.close()
            # a head that never ends: refused once it passes MAX_HEAD_BYTES, not held in memory
            reader, writer = await asyncio.open_connection("127.0.0.1", server._server.sockets[0].getsockname()[1])
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: ")
            try:
                for _ in range(MAX_HEAD_BYTES // 65536 + 2):
                    writer.write(b"a" * 65536)
                    await writer.drain()
                head, body = await _reply(reader)
                assert head.startswith(b"HTTP/1.1 431") and await _closed(reader)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass        # closed with the sender's bytes unread, the kernel resets: closed all the same
        finally:
            writer.close()
            await server.close(1.0)
    asyncio.run(main())


def test_expect_100_continue_is_answered_before_the_body():
    async def main():
        server, reader, writer = await _serving()
        try:
            writer.write(b"POST /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
            assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10) == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(b"abc")
            _, body = await _reply(reader)
            assert body["size"] == 3
        finally:
            writer.close()
            await server.close(1.0)
    asyncio.run(main())


def test_an_idle_connection_is_closed_and_one_under_way_answers_through_close():
    async def main():
        server, reader, writer = await _serving(idle=0.2)
        try:
            writer.write(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
            await _reply(reader)
            assert await _closed(reader)                # idle 0.2 s after its reply: closed by the server
            writer.close()
            reader, writer = await asyncio.open_connection("127.0.0.1", server._server.sockets[0].getsockname()[1])
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            while not server.connections or not next(iter(server.connections)).busy():
                await asyncio.sleep(0.01)               # noqa: sleep-ok (polls until the request is under way)
            closing = asyncio.ensure_future(server.close(5.0))
            head, body = await _reply(reader)
            assert body["path"] == "/slow" and b"Connection: close" in head and await _closed(reader)
            await asyncio.wait_for(closing, 10)
        finally:
            writer.close()
            await server.close(1.0)
    asyncio.run(main())


def test_the_time_a_request_takes_is_recorded_when_asked():
    async def main():
        server, reader, writer = await _serving()
        server.timings = Timings()
        try:
            for path in ("/slow", "/fast"):
                writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                await _reply(reader)
            (slow, _), (fast, _) = server.timings.samples
            assert 0.3 <= slow < 5 and fast < 0.3
        finally:
            writer.close()
            await server.close(1.0)
    asyncio.run(main())


def test_the_recorder_writes_what_was_recorded_since_it_last_wrote(tmp_path, monkeypatch):
    from inferd.daemon.oip import timings
    path = tmp_path / "t.json"
    monkeypatch.setenv(timings.ENV, str(path))
    recorder = timings.Recorder.from_env()
    recorder.doors["http"].add(0.0, 0.25)
    recorder.dump()
    first = json.loads(path.read_text())
    assert len(first["http"]) == 1 and first["http"][0][1] == 0.25 and first["grpc"] == []
    recorder.doors["grpc"].add(0.0, 0.5)
    recorder.dump()
    second = json.loads(path.read_text())
    assert second["http"] == [] and len(second["grpc"]) == 1 and second["grpc"][0][1] == 0.5
    monkeypatch.delenv(timings.ENV)
    assert timings.Recorder.from_env() is None


def test_a_body_larger_than_the_head_limit_is_read_whole():
    """Only the request line and headers count against MAX_HEAD_BYTES, never the body."""
    async def main():
        server, reader, writer = await _serving(max_body=4 * MAX_HEAD_BYTES)
        try:
            size = 2 * MAX_HEAD_BYTES + 1
            writer.write(f"POST /big HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
            for at in range(0, size, 65536):
                writer.write(b"b" * min(65536, size - at))
                await writer.drain()
            head, body = await _reply(reader)
            assert head.startswith(b"HTTP/1.1 200") and body["size"] == size
        finally:
            writer.close()
            await server.close(1.0)
    asyncio.run(main())
