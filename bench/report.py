#!/usr/bin/env python3
"""Turns the raw outputs of bench/compare.sh (one directory) into Markdown
tables for docs/benchmarks.md: medians over the rounds, then every run."""

import json
import re
import statistics
import sys
from pathlib import Path

RES = Path(sys.argv[1])
META = dict(
    line.split("=", 1) for line in (RES / "meta.txt").read_text().splitlines() if "=" in line
)
LABELS = {"before": META.get("before_label", "before"), "after": META.get("after_label", "after")}

BROKER = re.compile(
    r"issued (\d+) tokens in ([\d.]+)s .*?: ([\d.]+)/s; latency p50 ([\d.]+) ms, p99 ([\d.]+) ms"
    r"(?:; errors (\d+))?"
)
ISSUE = re.compile(
    r"issued (\d+) tokens in ([\d.]+)s .*?: ([\d.]+)/s; latency p50 ([\d.]+) ms, p90 ([\d.]+) ms, "
    r"p99 ([\d.]+) ms, max ([\d.]+) ms; errors (\d+)"
)
UNIT = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def rounds(prefix):
    """{round: path} for files `prefix.N.*`."""
    out = {}
    for p in RES.glob(prefix + ".*"):
        m = re.fullmatch(re.escape(prefix) + r"\.(\d+)\.(out|wrk)", p.name)
        if m:
            out[int(m.group(1))] = p
    return out


def broker(path):
    m = BROKER.search(path.read_text())
    if not m:
        return None
    return {
        "rate": float(m.group(3)),
        "p50": float(m.group(4)),
        "p90": None,
        "p99": float(m.group(5)),
        "errors": int(m.group(6)) if m.group(6) else None,
    }


def issue(path):
    m = ISSUE.search(path.read_text())
    if not m:
        return None
    return {
        "rate": float(m.group(3)),
        "p50": float(m.group(4)),
        "p90": float(m.group(5)),
        "p99": float(m.group(6)),
        "errors": int(m.group(8)),
    }


def wrk(path):
    t = path.read_text()
    m = re.search(r"Requests/sec:\s+([\d.]+)", t)
    if not m:
        return None
    r = {"rate": float(m.group(1)), "errors": 0}
    for pct, v, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s)\s*$", t, re.M):
        r["p" + pct] = float(v) * UNIT[unit]
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
    if m:
        r["errors"] += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
    if m:
        r["errors"] += sum(int(x) for x in m.groups())
    m = re.search(r"(\d+) requests in", t)
    r["requests"] = int(m.group(1)) if m else None
    return r


def collect(prefix, parse):
    """(median figures, [per-round figures]) of the runs `prefix.N`."""
    runs = {}
    for n, p in sorted(rounds(prefix).items()):
        f = parse(p)
        if f is not None:
            runs[n] = f
    if not runs:
        return None, runs
    med = {}
    for k in ("rate", "p50", "p90", "p99"):
        vals = [f[k] for f in runs.values() if f.get(k) is not None]
        med[k] = statistics.median(vals) if vals else None
    errs = [f["errors"] for f in runs.values() if f.get("errors") is not None]
    med["errors"] = sum(errs) if errs else None
    return med, runs


def num(v):
    return "–" if v is None else f"{v:,.0f}"


def ms(v):
    if v is None:
        return "–"
    return f"{v * 1000:.0f} µs" if v < 1 else f"{v:.2f} ms"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "–"
    return f"{a / b:.2f}"


def errs(v):
    return "–" if v is None else str(v)


n_rounds = META.get("rounds", "?")
print(f"### Side by side: {LABELS['before']} and {LABELS['after']} ({META.get('date', '?')})")
print()
print(
    f"`bench/compare.sh`, {n_rounds} round{'' if n_rounds == '1' else 's'}, each run of {LABELS['before']} directly "
    f"followed by the same run of {LABELS['after']}; figures are the medians over the rounds "
    f"(errors are summed). {META.get('cpus', '?')} cores; load average "
    f"{META.get('load_start', '?')} at the start, {META.get('load_end', '?')} at the end; "
    f"{META.get('seconds', '?')} s in all."
)
print()
print(f"- {LABELS['before']}: `{META.get('before', '?')}` ({META.get('before_version', '?')})")
print(f"- {LABELS['after']}: `{META.get('after', '?')}` ({META.get('after_version', '?')})")
print()

def acct(prefix):
    """{round: document} of the `prefix.N.cpu` files."""
    out = {}
    for p in RES.glob(prefix + ".*.cpu"):
        m = re.fullmatch(re.escape(prefix) + r"\.(\d+)\.cpu", p.name)
        if m:
            out[int(m.group(1))] = json.loads(p.read_text())
    return out


def med_per_req(docs, f):
    vals = [f(d) / d["requests"] for d in docs.values() if d.get("requests")]
    vals = [v for v in vals if v is not None]
    return statistics.median(vals) if vals else None


def group_per_req(docs, grp, k):
    """Median per request of counter `k` of process group `grp`."""
    return med_per_req(docs, lambda d: d["groups"].get(grp, {}).get(k))


def cpu_per_req(docs, groups=None):
    """Median per request of user + system time of `groups` (all by default)."""
    return med_per_req(
        docs,
        lambda d: sum(
            v.get("user", 0) + v.get("sys", 0)
            for g, v in d["groups"].items()
            if groups is None or g in groups
        ),
    )


def us(v):
    return "–" if v is None else f"{v * 1e6:.1f}"


def count(v):
    return "–" if v is None else f"{v:.2f}"


# Issuance ---------------------------------------------------------------------
ISSUANCE = [
    ("broker", broker, "in-process, 64 in flight"),
    ("http-closed", issue, "HTTP, closed loop, 64 in flight"),
    ("http-open", issue, "HTTP, open loop, 2,000/s target"),
    ("http-wrk", wrk, "HTTP, closed loop, 64 connections, wrk as the client"),
]
issuance = {}
for key, parse, name in ISSUANCE:
    for lab in ("before", "after"):
        issuance[(key, lab)] = collect(f"{key}.{lab}", parse)
if any(v[0] for v in issuance.values()):
    print("| issuance | binary | throughput | p50 | p90 | p99 | errors |")
    print("|---|---|---|---|---|---|---|")
    for key, _, name in ISSUANCE:
        for lab in ("before", "after"):
            med, _ = issuance[(key, lab)]
            if med is None:
                print(f"| {name} | {LABELS[lab]} | not measured | | | | |")
                continue
            print(
                f"| {name} | {LABELS[lab]} | {num(med['rate'])}/s | {ms(med['p50'])} | "
                f"{ms(med['p90'])} | {ms(med['p99'])} | {errs(med['errors'])} |"
            )
    print()
    parts = []
    for key, _, name in ISSUANCE:
        b, a = issuance[(key, "before")][0], issuance[(key, "after")][0]
        if a and b:
            parts.append(
                f"{name}: throughput ×{ratio(a['rate'], b['rate'])}, p99 ×{ratio(a['p99'], b['p99'])}"
            )
    if parts:
        print(f"{LABELS['after']} / {LABELS['before']}: " + "; ".join(parts) + ".")
        print()

issue_cpu = {lab: acct(f"http-wrk.{lab}") for lab in ("before", "after")}
if any(issue_cpu.values()):
    print(
        "CPU per issuance in the wrk runs (µs; the server's user and system time from /proc, "
        "wrk's from `times`, divided by the answers wrk counted; medians over the rounds):"
    )
    print()
    print("| binary | issued/s | server user | server sys | wrk user + sys | all |")
    print("|---|---|---|---|---|---|")
    for lab in ("before", "after"):
        docs = issue_cpu[lab]
        if not docs:
            continue
        rate = collect(f"http-wrk.{lab}", wrk)[0]
        print(
            f"| {LABELS[lab]} | {num(rate['rate']) if rate else '–'} | "
            f"{us(group_per_req(docs, 'keymint', 'user'))} | {us(group_per_req(docs, 'keymint', 'sys'))} | "
            f"{us(cpu_per_req(docs, ['wrk']))} | {us(cpu_per_req(docs))} |"
        )
    print()

# Proxy ------------------------------------------------------------------------
proxy = {}
for who in ("nginx", "before", "after", "direct"):
    for kind in ("tput", "lat"):
        proxy[(who, kind)] = collect(f"proxy-{kind}.{who}", wrk)
if any(v[0] for v in proxy.values()):
    nginx_t = proxy[("nginx", "tput")][0]
    direct_l = proxy[("direct", "lat")][0]
    NAMES = {
        "nginx": "nginx reverse proxy",
        "before": f"keymint proxy, {LABELS['before']}",
        "after": f"keymint proxy, {LABELS['after']}",
        "direct": "upstream alone (no proxy)",
    }
    print("| proxy load | req/s | p50 | p90 | p99 | vs nginx (req/s) | p50 added to the upstream's | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, what in (("tput", "32 connections"), ("lat", "1 connection")):
        for who in ("direct", "nginx", "before", "after"):
            med, _ = proxy[(who, kind)]
            if med is None:
                continue
            vs = "–"
            if kind == "tput" and nginx_t:
                vs = ratio(med["rate"], nginx_t["rate"])
            added = "–"
            if kind == "lat" and who != "direct" and direct_l and med.get("p50") is not None:
                added = ms(med["p50"] - direct_l["p50"])
            print(
                f"| {NAMES[who]}, {what} | {num(med['rate'])} | {ms(med.get('p50'))} | "
                f"{ms(med.get('p90'))} | {ms(med.get('p99'))} | {vs} | {added} | "
                f"{errs(med['errors'])} |"
            )
    print()
    print("What the keymint proxy metered (its `/metrics` after each round's two wrk runs):")
    print()
    for lab in ("before", "after"):
        for p in sorted(RES.glob(f"proxy-metrics.{lab}.*.txt")):
            rnd = p.name.split(".")[2]
            m = {}
            for line in p.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2:
                    m[parts[0]] = float(parts[1])
            reqs = sum(v for k, v in m.items() if k.startswith("keymint_proxy_requests_total"))
            spend = sum(v for k, v in m.items() if k.startswith("keymint_proxy_spend_nanodollars_total"))
            denied = {k: v for k, v in m.items() if k.startswith("keymint_proxy_denials_total") and v}
            sent = sum(
                (collect(f"proxy-{kind}.{lab}", wrk)[1].get(int(rnd)) or {}).get("requests") or 0
                for kind in ("tput", "lat")
            )
            print(
                f"- {LABELS[lab]}, round {rnd}: {reqs:,.0f} requests metered (wrk counted {sent:,} answers, "
                f"plus one probe and those in flight at the end), {spend / 1e9:.4f} USD spent, "
                f"denials: {', '.join(f'{k} {v:.0f}' for k, v in denied.items()) or 'none'}"
            )
    print()

# CPU per request (bench/acct.py) ------------------------------------------------
WHO = {"nginx": "nginx", "before": f"keymint {LABELS['before']}", "after": f"keymint {LABELS['after']}"}
cpu = {w: acct(f"proxy-tput.{w}") for w in WHO}
if any(cpu.values()):
    print(
        "CPU per request during the 32-connection runs (µs; user and system time of each process "
        "and all its threads from /proc/PID/stat over wrk's run, wrk's own from `times`, divided by "
        "the requests wrk counted; medians over the rounds):"
    )
    print()
    print("| proxy | req/s | proxy user | proxy sys | upstream nginx user | upstream sys | wrk user | wrk sys | all | proxy vol./invol. switches |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for w, name in WHO.items():
        docs = cpu[w]
        if not docs:
            continue
        front = "nginx" if w == "nginx" else "keymint"

        def g(grp, k, docs=docs):
            return group_per_req(docs, grp, k)

        total = cpu_per_req(docs)
        rate = collect(f"proxy-tput.{w}", wrk)[0]
        print(
            f"| {name} | {num(rate['rate']) if rate else '–'} | {us(g(front, 'user'))} | {us(g(front, 'sys'))} | "
            f"{us(g('upstream', 'user'))} | {us(g('upstream', 'sys'))} | {us(g('wrk', 'user'))} | "
            f"{us(g('wrk', 'sys'))} | {us(total)} | {count(g(front, 'vcs'))} / {count(g(front, 'ivcs'))} |"
        )
    print()
sysc = {w: acct(f"proxy-sys.{w}") for w in WHO}
if any(d.get("syscalls") for docs in sysc.values() for d in docs.values()):
    print(
        "Per request under `perf stat` (a separate 32-connection run; syscalls and context "
        "switches of each process group, all threads; medians over the rounds):"
    )
    print()
    NAMES_SYS = ["read", "write", "readv", "writev", "recvfrom", "sendto", "epoll_wait", "epoll_pwait",
                 "epoll_ctl", "futex", "sched_yield", "pwrite64", "fdatasync"]
    print("| process | syscalls | context switches | migrations | " + " | ".join(NAMES_SYS) + " |")
    print("|---|---|---|---|" + "---|" * len(NAMES_SYS))
    for w, name in WHO.items():
        docs = sysc[w]
        if not docs:
            continue
        groups = ["nginx" if w == "nginx" else "keymint", "upstream", "wrk"]
        for grp in groups:

            def ev(e, docs=docs, grp=grp):
                return med_per_req(docs, lambda d: d.get("syscalls", {}).get(grp, {}).get(e))

            label = {"upstream": f"upstream nginx (with {name})", "wrk": f"wrk (with {name})"}.get(grp, name)
            print(
                f"| {label} | {count(ev('raw_syscalls:sys_enter'))} | {count(ev('context-switches'))} | "
                f"{count(ev('cpu-migrations'))} | "
                + " | ".join(count(ev('syscalls:sys_enter_' + n)) for n in NAMES_SYS)
                + " |"
            )
    print()

# Every run --------------------------------------------------------------------
print("<details><summary>Every run</summary>")
print()
print("| run | round | throughput | p50 | p99 | errors |")
print("|---|---|---|---|---|---|")
for key, _, name in ISSUANCE:
    for lab in ("before", "after"):
        for n, f in issuance[(key, lab)][1].items():
            print(
                f"| {name}, {LABELS[lab]} | {n} | {num(f['rate'])}/s | {ms(f['p50'])} | "
                f"{ms(f['p99'])} | {errs(f['errors'])} |"
            )
for kind, what in (("tput", "32 connections"), ("lat", "1 connection")):
    for who in ("direct", "nginx", "before", "after"):
        for n, f in proxy.get((who, kind), (None, {}))[1].items():
            label = {"direct": "upstream alone", "nginx": "nginx"}.get(who, f"keymint {LABELS.get(who, who)}")
            print(
                f"| proxy {what}, {label} | {n} | {num(f['rate'])}/s | {ms(f.get('p50'))} | "
                f"{ms(f.get('p99'))} | {errs(f['errors'])} |"
            )
print()
print("</details>")
print()

# Commands ---------------------------------------------------------------------
dur, lat = META.get("dur", "10"), META.get("lat_dur", "5")
tls = META.get("tls") == "1"
front = "https" if tls else "http"
print("```sh")
print("cargo build --release   # in each of the two trees")
print(
    f"{'TLS=1 ' if tls else ''}ROUNDS={n_rounds} DUR={dur} LAT_DUR={lat} "
    "bench/compare.sh BEFORE/keymint AFTER/keymint"
)
print("# what it runs, per round, BEFORE then AFTER (fresh data directory each run):")
print(f"keymint bench broker --concurrency 64 --duration {dur}s --data-dir FRESH")
print("keymint dev --data-dir FRESH --listen 127.0.0.1:PORT &")
print(f"keymint bench issue --concurrency 64 --duration {dur}s                # KEYMINT_ADDR, KEYMINT_TOKEN")
print(f"keymint bench issue --concurrency 32 --duration {dur}s --rate 2000    # on another fresh dev")
print("curl -H 'Authorization: Bearer ADMIN' -d '{\"workload\":\"bench\",\"role\":\"demo\",...}' http://127.0.0.1:PORT/v1/tasks   # on a third")
print(f"wrk -t2 -c64 -d{dur}s --latency -s issue.lua http://127.0.0.1:PORT/v1/tasks/TASK/leases   # POST {{}} with the admin token")
print(
    f"nginx -p UP -c nginx.conf      # upstream: `return 200` of a chat completion ({len(META.get('chat_json', ''))} bytes, with usage)"
)
print(
    "nginx -p FRONT -c nginx.conf   # comparator: proxy_pass to UP, HTTP/1.1 keepalive 64"
    + ("; listen ... ssl, a self-signed P-256 certificate" if tls else "")
)
print(
    "keymint server --config keymint.toml &   # upstream `openai` = UP; role `gpt` with budgets and prices"
    + ("; [server.tls] with the same certificate" if tls else "")
)
print("keymint upstream set openai --key-file fake.key")
print("keymint task start --role gpt --workload bench --ttl 1h --issue -o json   # the kmt_ token")
print(f"wrk -t2 -c32 -d{dur}s --latency -s post.lua {front}://127.0.0.1:PORT/proxy/openai/chat/completions")
print(f"wrk -t1 -c1  -d{lat}s  --latency -s post.lua {front}://127.0.0.1:PORT/proxy/openai/chat/completions")
print("# the same two wrk runs against FRONT/v1/chat/completions, and one 1-connection run against UP")
print("```")
print()
print(f"Request body (`post.lua`, with `Authorization: Bearer kmt_…`): `{META.get('chat_body', '?')}`.")
print(
    f"nginx {META.get('nginx', '?')}, wrk {META.get('wrk', '?')}. The role's `[roles.proxy]`: "
    "`max_requests = 1000000000`, `max_input_tokens` and `max_output_tokens` 10^12, "
    '`max_spend_usd = 1000000.0` with `[prices."gpt-4o-mini"]` 0.15/0.60 USD per million tokens, '
    "secret screening at its default (block)."
)
