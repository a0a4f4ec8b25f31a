"""Serve MCP over stdin/stdout from the event loop, without a thread hop per message.

The SDK's stdio transport reads and writes through worker threads (anyio.wrap_file): every message
in and out waits for a thread handoff, about 0.2 ms of the 0.7 ms a bare call costs here. MCP
clients launch servers with pipes, and pipes can be served by the event loop directly. When stdin
or stdout is something else (a file, /dev/null, a terminal), or the SDK's internals are not what
this module was written against, the SDK's own transport is used.

Like the SDK, the wire gets private descriptors while serving: fd 0 reads /dev/null and fd 1 goes
to stderr, so a stray print or a child process cannot corrupt the protocol stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import re
import stat
import sys
from collections.abc import Iterator

from mcp.server.mcpserver import MCPServer
from mcp.server.stdio import stdio_server
from mcp.types import CallToolResult, TextContent

MAX_LINE_BYTES = 64 << 20  # one JSON-RPC message per line; an image read can be several MB
# (a smaller limit, for tests: what happens beyond it, without sending 64 MiB)
LIMIT_ENV = "TETHER_MCP_MAX_LINE_BYTES"
# The members a request's line starts with, as JSON-RPC clients write them ("jsonrpc", "id",
# "method" first, params last): enough to answer a request too long to parse.
_HEAD_MEMBER = re.compile(rb'\s*"(jsonrpc|id|method)"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)\s*,')
# ... or at its end, as the TypeScript SDK writes them (`{...request, jsonrpc, id}`: params first).
# (Inside a JSON string a '"' is escaped: `,"id":` cannot be part of one.)
_TAIL_MEMBER = re.compile(rb'[,{]\s*"(jsonrpc|id|method)"\s*:\s*("(?:[^"\\]|\\.)*"|-?\d+)\s*\Z')


def _separate_pipes() -> bool:
    """stdin and stdout are pipes or sockets (what epoll can watch: not files, not /dev/null), and
    not one socket: asyncio's write transport reads its descriptor to notice the peer going away,
    which on a shared socket would swallow requests."""
    try:
        fin, fout = os.fstat(0), os.fstat(1)
    except OSError:
        return False
    pipe_like = all(stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode) for st in (fin, fout))
    return pipe_like and (fin.st_dev, fin.st_ino) != (fout.st_dev, fout.st_ino)


async def serve_stdio(server: MCPServer) -> None:
    lowlevel = getattr(server, "_lowlevel_server", None)
    if lowlevel is None or not _separate_pipes():
        await server.run_stdio_async()
        return
    with _claimed_stdio() as (wire_in, wire_out):
        loop = asyncio.get_running_loop()
        limit = int(os.environ.get(LIMIT_ENV) or MAX_LINE_BYTES)
        reader = asyncio.StreamReader(limit=limit)
        read_transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), wire_in)
        write_transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, wire_out)
        writer = asyncio.StreamWriter(write_transport, protocol, None, loop)
        lines_out = _LineWriter(writer)
        lines_in = _LineReader(reader, limit, lines_out)
        try:
            async with stdio_server(lines_in, lines_out) as (read_stream, write_stream):  # type: ignore[arg-type]
                await lowlevel.run(read_stream, write_stream, lowlevel.create_initialization_options())
        finally:
            read_transport.close()
            write_transport.close()


@contextlib.contextmanager
def _claimed_stdio() -> Iterator[tuple[object, object]]:
    """The wire as private files; fd 0 reads /dev/null and fd 1 goes to stderr from now on. The
    wire's descriptors are non-blocking while served (the event loop needs that) and blocking again
    afterwards, for whoever else holds them."""
    sys.stdout.flush()
    wire_in, wire_out = (fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3) for fd in (0, 1))
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    try:
        with (
            open(wire_in, "rb", buffering=0, closefd=False) as fin,
            open(wire_out, "wb", buffering=0, closefd=False) as fout,
        ):
            yield fin, fout
    finally:
        for fd in (wire_in, wire_out):
            with contextlib.suppress(OSError):
                os.set_blocking(fd, True)
                os.close(fd)


class _LineReader:
    """What stdio_server reads: an async iterator of lines. A line over the reader's limit is dropped
    whole. A request whose id and method are at its start or its end (as clients write them) is answered here,
    so the client's call ends; any other line is replaced by text that is not JSON, which the
    session reports as a parse error (with id null: the id is not known).

    A request with a lone surrogate escape ("\\ud800", which JavaScript's JSON.stringify can send)
    is answered here with an error: the SDK's parser refuses such a line and answers nothing, and
    the client would wait for that call forever."""

    def __init__(self, reader: asyncio.StreamReader, limit: int, answer: _LineWriter | None = None) -> None:
        self._reader = reader
        self._limit = limit
        self._answer = answer

    def __aiter__(self) -> _LineReader:
        return self

    async def __anext__(self) -> str:
        skipping, head, tail = False, b"", b""
        while True:
            try:
                line = await self._reader.readuntil(b"\n")
            except asyncio.IncompleteReadError as exc:  # end of input
                if skipping or not exc.partial:
                    raise StopAsyncIteration from None
                line = exc.partial
            except asyncio.LimitOverrunError as exc:
                dropped = await self._reader.readexactly(exc.consumed)
                head = head or dropped[:4096]
                tail = (tail + dropped)[-4096:]
                skipping = True
                continue
            if skipping:
                if await self._refused_oversized(head, (tail + line)[-4096:]):
                    skipping, head, tail = False, b"", b""
                    continue
                return f"(a message over {self._limit} bytes was dropped)"
            if (b"\\ud" in line or b"\\uD" in line) and await self._refused_surrogates(line):
                continue
            return line.decode("utf-8", "replace")

    async def _refused_oversized(self, head: bytes, tail: bytes) -> bool:
        """Whether the line that began with `head` and ended with `tail` (and was too long) is a
        request, now answered: a tool call with an error result (what an agent reads), another
        request with an error."""
        head, rest = head.lstrip(), tail.rstrip()
        found, at = [], 1 if head.startswith(b"{") else 0
        while at and (member := _HEAD_MEMBER.match(head, at)):
            found.append(member)
            at = member.end()
        rest = rest[:-1] if rest.endswith(b"}") else b""
        while member := _TAIL_MEMBER.search(rest):
            found.append(member)
            rest = rest[: member.start()]
        members = {}
        for member in found:
            try:
                members[member[1].decode()] = json.loads(member[2])
            except ValueError:  # (a string with a bad escape)
                return False
        if "id" not in members or not isinstance(members.get("method"), str) or self._answer is None:
            return False
        message = (
            f"the request is over this server's limit for one message ({self._limit} bytes); "
            "copy large files with `tether cp` (or write them in parts, or produce them in the sandbox with run)"
        )
        if members["method"] == "tools/call":
            result = CallToolResult(content=[TextContent(type="text", text=message)], is_error=True)
            answer = {"result": result.model_dump(by_alias=True, exclude_none=True, mode="json")}
        else:
            answer = {"error": {"code": -32600, "message": message}}
        await self._answer.write(json.dumps({"jsonrpc": "2.0", "id": members["id"], **answer}) + "\n")
        await self._answer.flush()
        return True

    async def _refused_surrogates(self, line: bytes) -> bool:
        """Whether `line` is a request holding a lone surrogate, now answered with an error."""
        try:
            message = json.loads(line)  # (Python's parser accepts lone surrogates; pydantic's does not)
            json.dumps(message, ensure_ascii=False).encode("utf-8")
            return False
        except UnicodeEncodeError:
            pass
        except (ValueError, RecursionError):
            return False  # not JSON, or nested too deep: the session reports that itself
        if not isinstance(message, dict) or "id" not in message or self._answer is None:
            return True  # a notification: nothing to answer
        error = {
            "code": -32602,
            "message": "the request holds a lone UTF-16 surrogate (an escape like \\ud800 without its pair), "
            "which is not Unicode text; send valid text and call again",
        }
        reply = {"jsonrpc": "2.0", "id": message["id"], "error": error}
        await self._answer.write(json.dumps(reply) + "\n")  # (ASCII: the id itself may hold the surrogate)
        await self._answer.flush()
        return True


class _LineWriter:
    """What stdio_server writes to: write + flush coroutines."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer

    # A client that died (killed, its pipe gone) can no longer be answered: its replies are
    # dropped, and the end of its input ends the server as a clean close would, traceback-free.
    async def write(self, text: str) -> None:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            self._writer.write(text.encode("utf-8"))

    async def flush(self) -> None:
        with contextlib.suppress(ConnectionResetError, BrokenPipeError):
            await self._writer.drain()
