#!/usr/bin/env python3
"""CPU time, context switches and syscalls per request of the processes in a
proxy benchmark run (bench/compare.sh, issue 19).

    acct.py snap OUT LABEL=PID ...        # counters now, of PID and its children
    acct.py diff BEFORE AFTER WRK_OUT WRK_TIMES OUT [PERF_FILES...]

`snap` reads, for each labelled process and its direct children (nginx's
workers), the user and system time of /proc/PID/stat (all threads, living
and exited) and the voluntary and involuntary context switches of every
living thread (/proc/PID/task/*/status). `diff` subtracts two snaps, adds
wrk's own CPU (the `times` of the subshell that ran it), divides by the
requests wrk counted and writes one JSON document. PERF_FILES are
`perf stat -x,` outputs named LABEL.perf (syscalls counted over the same
kind of run), added per label.
"""

import json
import os
import re
import sys
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def children(pid):
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[1] == str(pid):
            out.append(int(d.name))
    return out


def counters(pid):
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    # After the command: state is field 3, utime 14, stime 15.
    user, system = int(fields[11]) / TICK, int(fields[12]) / TICK
    vol = invol = threads = 0
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            text = (t / "status").read_text()
        except OSError:
            continue
        threads += 1
        vol += int(re.search(r"^voluntary_ctxt_switches:\s+(\d+)", text, re.M).group(1))
        invol += int(re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", text, re.M).group(1))
    return {"user": user, "sys": system, "vcs": vol, "ivcs": invol, "threads": threads}


def snap(out, specs):
    doc = {}
    for spec in specs:
        label, pid = spec.split("=", 1)
        total = {"user": 0.0, "sys": 0.0, "vcs": 0, "ivcs": 0, "threads": 0, "procs": 0}
        for p in [int(pid), *children(int(pid))]:
            c = counters(p)
            if c is None:
                continue
            total["procs"] += 1
            for k, v in c.items():
                total[k] += v
        doc[label] = total
    Path(out).write_text(json.dumps(doc))


def times(path):
    """Children's user and system seconds from bash's `times` (second line)."""
    lines = Path(path).read_text().split("\n")
    vals = re.findall(r"(\d+)m([\d.]+)s", lines[1])
    return [int(m) * 60 + float(s) for m, s in vals]


def perf(path):
    """{event: count} of a `perf stat -x,` output."""
    out = {}
    for line in Path(path).read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[0].strip().isdigit():
            out[parts[2]] = out.get(parts[2], 0) + int(parts[0])
    return out


def diff(before, after, wrk_out, wrk_times, out, perf_files):
    b = json.loads(Path(before).read_text())
    a = json.loads(Path(after).read_text())
    m = re.search(r"(\d+) requests in", Path(wrk_out).read_text())
    reqs = int(m.group(1)) if m else 0
    doc = {"requests": reqs, "groups": {}}
    for label in a:
        if label not in b:
            continue
        doc["groups"][label] = {
            k: a[label][k] - b[label][k] for k in ("user", "sys", "vcs", "ivcs")
        }
        doc["groups"][label]["threads"] = a[label]["threads"]
        doc["groups"][label]["procs"] = a[label]["procs"]
    user, system = times(wrk_times)
    doc["groups"]["wrk"] = {"user": user, "sys": system}
    for p in perf_files:
        label = Path(p).name.rsplit(".", 2)[-2]
        doc.setdefault("syscalls", {})[label] = perf(p)
    Path(out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    if sys.argv[1] == "snap":
        snap(sys.argv[2], sys.argv[3:])
    elif sys.argv[1] == "diff":
        diff(*sys.argv[2:7], sys.argv[7:])
    else:
        sys.exit("usage: acct.py snap OUT LABEL=PID ... | diff BEFORE AFTER WRK_OUT WRK_TIMES OUT [PERF...]")
