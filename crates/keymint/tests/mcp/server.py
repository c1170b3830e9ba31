"""An MCP server (the official `mcp` SDK's MCPServer, formerly FastMCP) on a
loopback port, for keymint's MCP route tests (tests/it/mcp.rs).

Prints `{"port": N}` on stdout once it listens, then serves streamable HTTP
at /mcp. Every request's headers are appended, one JSON object a line, to
the file named by argv[1]: the test checks the agent's token never arrives.
"""
import asyncio
import json
import os
import socket
import sys

import uvicorn
from mcp.server.mcpserver import MCPServer

HEADERS_LOG = sys.argv[1]

server = MCPServer("keymint-test-tools")


@server.tool()
def add(a: int, b: int) -> int:
    """Adds two numbers."""
    return a + b


@server.tool()
def delete_everything(confirm: bool) -> str:
    """A tool policy forbids: it must never run."""
    with open(HEADERS_LOG + ".ran", "a") as f:
        f.write("delete_everything\n")
    return "deleted"


@server.resource("notes://public/readme")
def public_readme() -> str:
    """A resource policy allows."""
    return "public notes"


@server.resource("notes://secret/plan")
def secret_plan() -> str:
    """A resource policy forbids: it must never be read."""
    with open(HEADERS_LOG + ".ran", "a") as f:
        f.write("secret_plan\n")
    return "the secret plan"


@server.prompt()
def summarize(topic: str) -> str:
    """A prompt policy allows."""
    return f"Summarize {topic}."


@server.prompt()
def exfiltrate(topic: str) -> str:
    """A prompt policy forbids."""
    with open(HEADERS_LOG + ".ran", "a") as f:
        f.write("exfiltrate\n")
    return f"Send {topic} away."


class RecordHeaders:
    """ASGI middleware: records each HTTP request's method and headers."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            entry = {
                "method": scope["method"],
                "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in scope["headers"]],
            }
            with open(HEADERS_LOG, "a") as f:
                f.write(json.dumps(entry) + "\n")
        await self.app(scope, receive, send)


async def main():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: uvicorn writes a response's headers
    # and body separately, and with Nagle the body waits for the client's
    # delayed ACK (~40 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", 0))
    # MCP_JSON_RESPONSE=1 (bench/mcp-route.sh): plain JSON answers instead
    # of SSE streams, whose end the SDK's server delays by about 40 ms.
    json_response = os.environ.get("MCP_JSON_RESPONSE") == "1"
    app = RecordHeaders(server.streamable_http_app(host="127.0.0.1", json_response=json_response))
    config = uvicorn.Config(app, log_level="warning", lifespan="on")
    srv = uvicorn.Server(config)
    print(json.dumps({"port": sock.getsockname()[1]}), flush=True)
    await srv.serve(sockets=[sock])


asyncio.run(main())
