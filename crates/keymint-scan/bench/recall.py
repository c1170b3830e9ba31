#!/usr/bin/env python3
"""Recall and false findings of a scanner's report against planted.jsonl.

usage: recall.py CORPUS_DIR TOOL REPORT
TOOL: keymint (JSON lines), kingfisher (JSON), betterleaks (JSON),
ripsecrets (path:line:text), detect-secrets (JSON)

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


def main():
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
