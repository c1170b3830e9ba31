"""The official `mcp` SDK's streamable HTTP client calls tools through
keymint's MCP route with a keymint access token (tests/it/mcp.rs).

stdin: {"url": ..., "token": ...}; stdout: what the calls returned and the
session ids keymint handed out.

With "hijack_session" in the input, the client instead sends that session
id on every request (an agent that stole another agent's session id) and
reports whether the SDK got anywhere with it.
"""
import asyncio
import json
import sys

import httpx2
from mcp import ClientSession
from mcp.client.streamable_http import streamable_http_client


async def main():
    inp = json.load(sys.stdin)
    out = {"session_ids": []}
    headers = {"Authorization": "Bearer " + inp["token"]}
    stolen = inp.get("hijack_session")

    async def on_request(request):
        if stolen:
            request.headers["mcp-session-id"] = stolen

    async def on_response(response):
        sid = response.headers.get("mcp-session-id")
        if sid and sid not in out["session_ids"]:
            out["session_ids"].append(sid)

    hooks = {"request": [on_request], "response": [on_response]}
    async with httpx2.AsyncClient(headers=headers, timeout=30, event_hooks=hooks) as http:
        if stolen:
            try:
                async with streamable_http_client(inp["url"], http_client=http, terminate_on_close=False) as streams:
                    async with ClientSession(streams[0], streams[1]) as session:
                        await session.initialize()
                        tools = await session.list_tools()
                        out["hijack"] = {"raised": False, "tools": sorted(t.name for t in tools.tools)}
            except BaseException as e:  # the SDK raises (or its task group wraps the error)
                out["hijack"] = {"raised": True, "kind": type(e).__name__, "message": repr(e)}
            print(json.dumps(out))
            return
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
                if inp.get("resources"):
                    for uri in inp["resources"]:
                        try:
                            r = await session.read_resource(uri)
                            out.setdefault("read", {})[uri] = {
                                "raised": False,
                                "text": [getattr(c, "text", None) for c in r.contents],
                            }
                        except Exception as e:
                            out.setdefault("read", {})[uri] = {"raised": True, "message": str(e)}
                    for name in inp.get("prompts", []):
                        try:
                            r = await session.get_prompt(name, {"topic": "keys"})
                            out.setdefault("prompt", {})[name] = {"raised": False, "n": len(r.messages)}
                        except Exception as e:
                            out.setdefault("prompt", {})[name] = {"raised": True, "message": str(e)}
    print(json.dumps(out))


asyncio.run(main())
