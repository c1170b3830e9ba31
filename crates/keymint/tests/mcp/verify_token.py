"""Validates the tokens an MCP server received from keymint the way an MCP
server that trusts keymint would: PyJWT against keymint's JWKS, found
through its authorization server metadata (tests/it/mcp.rs).

stdin: {"issuer": ..., "audience": ..., "tokens": [...]};
stdout: {"claims": [...]} or {"error": ...} for the first that fails.
"""
import json
import sys
import urllib.request

import jwt


def main():
    inp = json.load(sys.stdin)
    with urllib.request.urlopen(inp["issuer"] + "/.well-known/oauth-authorization-server") as r:
        meta = json.load(r)
    jwks = jwt.PyJWKClient(meta["jwks_uri"])
    out = []
    for tok in inp["tokens"]:
        try:
            if jwt.get_unverified_header(tok).get("typ") != "at+jwt":
                raise jwt.InvalidTokenError("not an RFC 9068 access token")
            key = jwks.get_signing_key_from_jwt(tok)
            claims = jwt.decode(
                tok,
                key.key,
                algorithms=["ES256", "EdDSA", "RS256"],
                audience=inp["audience"],
                issuer=meta["issuer"],
                options={"require": ["exp", "iat", "sub", "aud", "iss", "jti"]},
            )
        except Exception as e:
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}))
            return
        out.append(claims)
    print(json.dumps({"claims": out}))


main()
