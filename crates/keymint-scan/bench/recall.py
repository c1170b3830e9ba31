#!/usr/bin/env python3
"""Recall and false findings of a scanner's report against planted.jsonl.

usage: recall.py CORPUS_DIR TOOL REPORT
       recall.py --git TRUTH_JSONL TOOL REPORT
TOOL: keymint (JSON lines), kingfisher (JSON), betterleaks (JSON),
ripsecrets (path:line:text), detect-secrets (JSON)

With --git (keymint, kingfisher, betterleaks; reports with the secrets
shown), a planted key (plant_git.py's ground truth) counts as found when a
reported secret is part of it or it is part of a reported secret, whatever
commit or path the tool attributes it to; every other reported secret is
another finding (a real secret of the repository, a test fixture or a false
one), listed with a sample to judge which.

A planted key counts as found when the tool reports its file and line. A
false finding is a reported (file, line) where nothing was planted: every
line of the corpus other than the planted ones is a decoy (placeholders,
documentation examples, hashes, UUIDs, base64, ordinary code and logs).
"""
import collections
import json
import sys


def norm(path):
    path = path.replace("\\", "/")
    i = path.find("files/")
    return path[i:] if i >= 0 else path


def reported(tool, report):
    seen = set()
    if tool == "keymint":
        for line in open(report, encoding="utf-8"):
            f = json.loads(line)
            for loc in f["locations"]:
                seen.add((norm(loc["path"]), loc["line"]))
    elif tool == "kingfisher":
        doc = json.load(open(report, encoding="utf-8"))
        for f in doc.get("findings", []):
            loc = f["finding"]
            seen.add((norm(loc["path"]), loc["line"]))
    elif tool == "betterleaks":
        doc = json.load(open(report, encoding="utf-8"))
        for f in doc.get("findings") or []:
            loc = f["location"]
            seen.add((norm(loc["path"]), loc["start_line"]))
    elif tool == "ripsecrets":
        for line in open(report, encoding="utf-8", errors="replace"):
            parts = line.split(":", 2)
            if len(parts) >= 2 and parts[1].isdigit():
                seen.add((norm(parts[0]), int(parts[1])))
    elif tool == "detect-secrets":
        doc = json.load(open(report, encoding="utf-8"))
        for path, results in doc.get("results", {}).items():
            for r in results:
                seen.add((norm(path), r["line_number"]))
    else:
        raise SystemExit(f"unknown tool {tool}")
    return seen


def reported_secrets(tool, report):
    """(rule, path, secret) of every finding in a report."""
    out = []
    if tool == "keymint":
        text = open(report, encoding="utf-8").read()
        doc = json.loads(text) if text.lstrip().startswith("{\"version") else {
            "findings": [json.loads(l) for l in text.splitlines() if l.strip()]}
        for f in doc.get("findings", []):
            path = f["locations"][0].get("path", "") if f.get("locations") else ""
            out.append((f["rule_id"], path, f.get("secret", "")))
    elif tool == "kingfisher":
        doc = json.load(open(report, encoding="utf-8"))
        for f in doc.get("findings", []):
            out.append((f["rule"]["id"], f["finding"].get("path", ""), f["finding"].get("snippet", "")))
    elif tool == "betterleaks":
        doc = json.load(open(report, encoding="utf-8"))
        for f in doc.get("findings") or []:
            out.append((f["rule_id"], f["location"].get("path", ""), f["match"].get("value") or f["match"].get("full", "")))
    else:
        raise SystemExit(f"unknown tool {tool} for --git")
    return out


def scanned(tool, report):
    """What the tool says it scanned, from its report (keymint: its summary line)."""
    try:
        doc = json.load(open(report, encoding="utf-8"))
    except (ValueError, OSError):
        return None
    if tool == "kingfisher":
        m = doc.get("metadata", {}).get("summary", {})
        return {"blobs": m.get("blobs_scanned"), "bytes": m.get("bytes_scanned")}
    if tool == "betterleaks":
        return {"bytes": doc.get("scan", {}).get("bytes_scanned")}
    return None


def squash(s):
    return "".join(s.split())


def git_main(truth_path, tool, report):
    truth = [json.loads(l) for l in open(truth_path, encoding="utf-8")]
    findings = reported_secrets(tool, report)
    got = [squash(s) for _, _, s in findings]
    got_long = [g for g in got if len(g) >= 10]

    def matches(secret, g):
        return g in secret or secret in g

    found = collections.Counter()
    planted = collections.Counter()
    missed_rules = collections.Counter()
    for t in truth:
        secret = squash(t["secret"])
        planted[t["cls"]] += 1
        if any(matches(secret, g) for g in got_long):
            found[t["cls"]] += 1
        else:
            missed_rules[t["rule"]] += 1
    secrets = [squash(t["secret"]) for t in truth]
    other = [(rule, path, s) for (rule, path, s), g in zip(findings, got)
             if not (len(g) >= 10 and any(matches(p, g) for p in secrets))]
    distinct = sorted(set(other))
    by_rule = collections.Counter(rule for rule, _, _ in distinct)
    print(json.dumps({
        "tool": tool,
        "planted": len(truth),
        "found": sum(found.values()),
        "recall": round(sum(found.values()) / max(1, len(truth)), 4),
        "by_class": {c: f"{found[c]}/{planted[c]}" for c in planted},
        "missed_by_rule": dict(sorted(missed_rules.items())),
        "scanned": scanned(tool, report),
        "other_findings": len(other),
        "other_distinct": len(distinct),
        "other_by_rule": dict(by_rule.most_common(15)),
        # Redacted: these may be the repository's real secrets.
        "other_sample": [f"{rule} {path} {s[:6]}…({len(s)})" for rule, path, s in distinct[:: max(1, len(distinct) // 12)][:12]],
    }))


def main():
    if sys.argv[1] == "--git":
        return git_main(*sys.argv[2:5])
    corpus, tool, report = sys.argv[1:4]
    planted = [json.loads(l) for l in open(f"{corpus}/planted.jsonl", encoding="utf-8")]
    want = {(p["file"], p["line"]): p["rule"] for p in planted}
    seen = reported(tool, report)
    found = [k for k in want if k in seen]
    false = [k for k in seen if k not in want]
    per_rule = collections.Counter(want.values())
    missed = collections.Counter(want[k] for k in want if k not in seen)
    print(json.dumps({
        "tool": tool,
        "planted": len(want),
        "found": len(found),
        "recall": round(len(found) / max(1, len(want)), 4),
        "false_findings": len(false),
        "missed_by_rule": {r: f"{missed[r]}/{per_rule[r]}" for r in sorted(missed)},
    }))


if __name__ == "__main__":
    main()
