#!/usr/bin/env python3
"""A corpus of secrets under environment variables' names, for no provider
that a rule names (design 0004, "a secret under an environment variable's
name"), with decoys beside them.

usage: gen_env_corpus.py DIR [SEED]

Writes DIR/files/NNN/<name> and DIR/planted.jsonl in the shape recall.py
reads ({"file", "line", "rule", "secret"}). Each file holds one planted
secret: a random value (base62, hex, base64url; 24 to 48 characters) under
an upper-case name that ends in a secret's word (`ACME_API_KEY`,
`PARTNER_TOKEN`, `LEDGER_DB_PASSWORD`), written the way a `.env` file, a
shell script, `docker run`, a Dockerfile, a compose file or a workflow
writes it. Every other line is a decoy: references (`${X}`, `$X`,
`${{ secrets.X }}`), placeholders, digests and ids under secret-ish names
(`API_KEY_SHA256`, `TOKEN_ID`), URLs, public values (`NEXT_PUBLIC_…`),
settings. Values are generated here and are not, and never were,
credentials.
"""
import json
import os
import random
import string
import sys
import uuid

B62 = string.ascii_letters + string.digits
HEX = "0123456789abcdef"
B64U = B62 + "-_"

SERVICES = ["ACME", "PARTNER", "BILLING", "CRM", "LEDGER", "TICKETS", "GEOCODE",
            "SEARCH", "NOTIFY", "PAYROLL", "INVOICE", "SHIPPING", "ANALYTICS",
            "WEATHER", "TRANSLATE", "SMS", "MAPS", "QUOTES", "RISK", "KYC"]
WORDS = ["API_KEY", "APIKEY", "TOKEN", "SECRET", "ACCESS_KEY", "SECRET_KEY",
         "AUTH_TOKEN", "DB_PASSWORD", "PASSWORD", "CLIENT_SECRET", "SERVICE_TOKEN",
         "CREDENTIALS", "PRIVATE_KEY", "WEBHOOK_SECRET"]


def value(rng):
    kind = rng.choice(["b62", "b62", "hex", "b64u"])
    n = rng.choice([24, 32, 40, 48])
    alphabet = {"b62": B62, "hex": HEX, "b64u": B64U}[kind]
    while True:
        v = "".join(rng.choice(alphabet) for _ in range(n))
        # Two character classes at least, as a real key has (a hex value of
        # digits only is possible but not what this corpus is about).
        if sum(any(c in s for c in v) for s in (string.ascii_lowercase, string.ascii_uppercase, string.digits)) >= 2:
            return v


def decoys(rng, svc):
    return [
        "LOG_LEVEL=info",
        f"{svc}_API_KEY=${{{svc}_API_KEY}}",
        f"{svc}_TOKEN=${svc}_TOKEN",
        f"{svc}_TOKEN_URL=https://auth.{svc.lower()}.internal/oauth/token",
        f"BUILD_SHA={''.join(rng.choice(HEX) for _ in range(40))}",
        f"{svc}_API_KEY_SHA256={''.join(rng.choice(HEX) for _ in range(64))}",
        f"{svc}_TOKEN_ID={uuid.UUID(int=rng.getrandbits(128))}",
        f"NEXT_PUBLIC_{svc}_API_KEY={''.join(rng.choice(B62) for _ in range(32))}",
        f"{svc}_API_KEY=your-{svc.lower()}-api-key-here",
        f"{svc}_PASSWORD=changeme",
        f"{svc}_SECRET_NAME=prod-{svc.lower()}-credentials",
        f"SESSION_TIMEOUT=3600",
        f"{svc}_API_KEY=<set me>",
        f"{svc}_TOKEN_FILE=/run/secrets/{svc.lower()}_token",
        f"CACHE_KEY={''.join(rng.choice(B62) for _ in range(32))}",
    ]


def render(shape, lines, planted_name, planted_value):
    """The file's text and the 1-based line of the planted value."""
    if shape == ".env":
        body = lines[:]
        at = len(body) // 2
        body.insert(at, f"{planted_name}={planted_value}")
        return "\n".join(["# service settings"] + body) + "\n", at + 2
    if shape == "deploy.sh":
        body = [f"export {l}" if "=" in l else l for l in lines]
        at = len(body) // 2
        body.insert(at, f'export {planted_name}="{planted_value}"')
        return "\n".join(["#!/bin/sh", "set -eu"] + body + ["exec ./server"]) + "\n", at + 3
    if shape == "run.sh":
        args = [f"  -e {l} \\" for l in lines[:6]]
        at = 3
        args.insert(at, f"  -e {planted_name}={planted_value} \\")
        return "\n".join(["docker run --rm \\"] + args + ["  registry.internal/app:1.4"]) + "\n", at + 2
    if shape == "Dockerfile":
        body = [f"ENV {l}" for l in lines[:8]]
        at = 4
        body.insert(at, f"ENV {planted_name}={planted_value}")
        return "\n".join(["FROM debian:bookworm-slim"] + body + ['CMD ["/app"]']) + "\n", at + 2
    if shape == "compose.yml":
        env = [f"      {l.split('=', 1)[0]}: \"{l.split('=', 1)[1]}\"" for l in lines[:10]]
        at = 5
        env.insert(at, f"      {planted_name}: {planted_value}")
        head = ["services:", "  app:", "    image: registry.internal/app:1.4", "    environment:"]
        return "\n".join(head + env) + "\n", at + len(head) + 1
    if shape == "workflow.yml":
        env = [f"  {l.split('=', 1)[0]}: {l.split('=', 1)[1]}" for l in lines[:10]]
        at = 6
        env.insert(at, f"  {planted_name}: '{planted_value}'")
        head = ["name: deploy", "on: [push]", "env:"]
        tail = ["jobs:", "  deploy:", "    runs-on: ubuntu-latest", "    steps:", "      - run: ./deploy.sh"]
        return "\n".join(head + env + tail) + "\n", at + len(head) + 1
    raise ValueError(shape)


def main():
    out = sys.argv[1]
    rng = random.Random(int(sys.argv[2]) if len(sys.argv) > 2 else 30)
    shapes = [".env", "deploy.sh", "run.sh", "Dockerfile", "compose.yml", "workflow.yml"]
    planted = []
    for i in range(120):
        svc = rng.choice(SERVICES)
        name = f"{svc}_{rng.choice(WORDS)}"
        v = value(rng)
        shape = shapes[i % len(shapes)]
        lines = decoys(rng, svc)
        rng.shuffle(lines)
        text, line = render(shape, lines, name, v)
        rel = f"files/{i:03d}/{shape}"
        os.makedirs(os.path.join(out, os.path.dirname(rel)), exist_ok=True)
        with open(os.path.join(out, rel), "w", encoding="utf-8") as f:
            f.write(text)
        assert text.splitlines()[line - 1].find(v) >= 0, (shape, line)
        planted.append({"file": rel, "line": line, "rule": "generic.env-assignment", "secret": v})
    with open(os.path.join(out, "planted.jsonl"), "w", encoding="utf-8") as f:
        for p in planted:
            f.write(json.dumps(p) + "\n")
    print(f"{len(planted)} files, {len(planted)} planted values")


if __name__ == "__main__":
    main()
