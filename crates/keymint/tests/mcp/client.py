"""The official `mcp` SDK's streamable HTTP client calls tools through
keymint's MCP route with a keymint access token (tests/it/mcp.rs).

stdin: {"url": ..., "token": ...}; stdout: what the calls returned.
"""
import asyncio
import json
import sys

import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client


async def main():
    inp = json.load(sys.stdin)
    out = {}
    headers = {"Authorization": "Bearer " + inp["token"]}
    async with httpx2.AsyncClient(headers=headers, timeout=30) as http:
        async with streamable_http_client(inp["url"], http_client=http) as streams:
            read, write = streams[0], streams[1]
            async with ClientSession(read, write) as session:
                await session.initialize()
                tools = await session.list_tools()
                out["tools"] = sorted(t.name for t in tools.tools)
                r = await session.call_tool("add", {"a": 2, "b": 40})
                out["add"] = {
                    "is_error": bool(r.is_error),
                    "text": [c.text for c in r.content if getattr(c, "type", "") == "text"],
                    "structured": r.structured_content,
                }
                try:
                    r = await session.call_tool("delete_everything", {"confirm": True})
                    out["forbidden"] = {"raised": False, "is_error": bool(r.is_error)}
                except Exception as e:  # the SDK raises on a JSON-RPC error
                    out["forbidden"] = {"raised": True, "kind": type(e).__name__, "message": str(e)}
    print(json.dumps(out))


asyncio.run(main())
