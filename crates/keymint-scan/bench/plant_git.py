#!/usr/bin/env python3
"""Plants generated keys into a bare git repository's history the ways real
leaks happen, and writes the ground truth.

usage: plant_git.py REPO KEYS_JSONL TRUTH_JSONL

KEYS_JSONL is `gen_corpus --keys` output (random keys, one of each kind in
turn); each planting class takes the next `len(keys) // len(CLASSES)` of
them, so every class gets every kind when there are 65 per class. The
repository is changed in place (commits, refs, a `git gc`); TRUTH_JSONL gets
one line per key: class, rule, secret, commit, blob, path.

Classes:
  deleted        added to the default branch in one commit, deleted in the next
  renamed        added to the default branch, then the file renamed
  side-branch    only on a branch that is never merged
  tag-only       only in a commit that an annotated tag reaches, no branch
  large-file     spread through a 24 MiB log file on the default branch
  packed-delta   inserted into an existing large file, stored as a delta after `git gc`
  unreachable-packed  on a branch deleted before `git gc` (kept in a cruft pack)
  unreachable-loose   a dangling commit made after `git gc` (loose object)
"""
import json
import os
import subprocess
import sys

CLASSES = [
    "deleted",
    "renamed",
    "side-branch",
    "tag-only",
    "large-file",
    "packed-delta",
    "unreachable-packed",
    "unreachable-loose",
]

ENV = dict(
    os.environ,
    GIT_AUTHOR_NAME="Leaky Tester",
    GIT_AUTHOR_EMAIL="leaky@example.invalid",
    GIT_COMMITTER_NAME="Leaky Tester",
    GIT_COMMITTER_EMAIL="leaky@example.invalid",
    GIT_AUTHOR_DATE="2026-12-01T12:00:00Z",
    GIT_COMMITTER_DATE="2026-12-01T12:00:00Z",
)


class Repo:
    def __init__(self, path, index):
        self.path = path
        self.env = dict(ENV, GIT_INDEX_FILE=index)

    def git(self, *args, data=None):
        out = subprocess.run(
            ["git", "-C", self.path, *args],
            input=data,
            env=self.env,
            capture_output=True,
        )
        if out.returncode != 0:
            raise SystemExit(f"git {' '.join(args)}: {out.stderr.decode().strip()}")
        return out.stdout.decode().strip()

    def blob(self, text):
        return self.git("hash-object", "-w", "--stdin", data=text.encode())

    def commit(self, parent, msg, add=(), remove=()):
        """A commit on top of `parent` with files added ((path, blob)) and removed."""
        self.git("read-tree", parent)
        # --index-info works without a work tree (the clone is bare); mode 0
        # removes the path.
        info = "".join(f"0 {'0' * 40}\t{path}\n" for path in remove)
        info += "".join(f"100644 {blob}\t{path}\n" for path, blob in add)
        self.git("update-index", "--index-info", data=info.encode())
        tree = self.git("write-tree")
        return self.git("commit-tree", tree, "-p", parent, "-m", msg)


def main():
    repo_path, keys_path, truth_path = sys.argv[1:4]
    keys = [json.loads(l) for l in open(keys_path, encoding="utf-8")]
    per = len(keys) // len(CLASSES)
    if per == 0:
        raise SystemExit(f"need at least {len(CLASSES)} keys")
    batch = {c: keys[i * per : (i + 1) * per] for i, c in enumerate(CLASSES)}
    text = {c: "\n".join(k["line"] for k in batch[c]) + "\n" for c in CLASSES}
    r = Repo(repo_path, truth_path + ".index")
    truth = []

    def record(cls, commit, path, blob):
        for k in batch[cls]:
            truth.append(dict(cls=cls, rule=k["rule"], secret=k["secret"], commit=commit, path=path, blob=blob))

    branch = r.git("symbolic-ref", "HEAD")
    base = r.git("rev-parse", branch)
    tip = base

    # Added in one commit, deleted in the next.
    p = "deploy/.env.production"
    b = r.blob(text["deleted"])
    c = r.commit(tip, "deploy: production settings", add=[(p, b)])
    record("deleted", c, p, b)
    tip = r.commit(c, "deploy: remove production settings", remove=[p])

    # Added, then the file renamed (same blob under a new path).
    p, p2 = "config/secrets.yaml", "config/secrets.yaml.orig"
    b = r.blob(text["renamed"])
    c = r.commit(tip, "config: local secrets", add=[(p, b)])
    record("renamed", c, p, b)
    tip = r.commit(c, "config: keep the old secrets aside", add=[(p2, b)], remove=[p])

    # Keys spread through a large log file.
    log = r.git("log", "--stat", "-n", "3000", base).encode()
    lines = []
    size = 0
    while size < 24 << 20:
        for line in log.split(b"\n"):
            lines.append(line)
            size += len(line) + 1
    step = len(lines) // (len(batch["large-file"]) + 1)
    for i, k in enumerate(batch["large-file"]):
        lines.insert((i + 1) * step + i, k["line"].encode())
    p = "ci/logs/integration-run.log"
    b = r.git("hash-object", "-w", "--stdin", data=b"\n".join(lines) + b"\n")
    tip = r.commit(tip, "ci: keep the integration log", add=[(p, b)])
    record("large-file", tip, p, b)

    # Inserted into the middle of the largest existing text file: after
    # `git gc` the new blob is a delta against the old one.
    big = max(
        (l.split(None, 4) for l in r.git("ls-tree", "-r", "-l", tip).splitlines()),
        key=lambda f: int(f[3]) if f[3].isdigit() and f[4].endswith((".md", ".rst", ".txt", ".py")) else 0,
    )
    old = r.git("cat-file", "blob", big[2]).split("\n")
    mid = len(old) // 2
    b = r.blob("\n".join(old[:mid] + text["packed-delta"].rstrip("\n").split("\n") + old[mid:]) + "\n")
    tip = r.commit(tip, f"docs: update {big[4]}", add=[(big[4], b)])
    record("packed-delta", tip, big[4], b)
    r.git("update-ref", branch, tip)

    # Only on a side branch.
    p = "notes/credentials.txt"
    b = r.blob(text["side-branch"])
    c = r.commit(base, "wip: credentials for the staging run", add=[(p, b)])
    r.git("update-ref", "refs/heads/wip/staging-credentials", c)
    record("side-branch", c, p, b)

    # Only in a commit an annotated tag reaches.
    p = "release/signing.env"
    b = r.blob(text["tag-only"])
    c = r.commit(base, "release: signing settings", add=[(p, b)])
    r.git("tag", "-a", "-m", "release candidate", "v0.0.0-rc.leak", c)
    record("tag-only", c, p, b)

    # A branch deleted before gc: the commit is unreachable, gc keeps it
    # (it is recent) in a cruft pack.
    p = "tmp/old.env"
    b = r.blob(text["unreachable-packed"])
    c = r.commit(base, "tmp: force-pushed away", add=[(p, b)])
    r.git("update-ref", "refs/heads/tmp/force-pushed", c)
    r.git("update-ref", "-d", "refs/heads/tmp/force-pushed")
    record("unreachable-packed", c, p, b)

    r.git("gc", "--quiet")

    # A dangling commit made after gc: a loose object that nothing reaches.
    p = "scratch/keys.env"
    b = r.blob(text["unreachable-loose"])
    c = r.commit(base, "scratch: keys (never pushed)", add=[(p, b)])
    record("unreachable-loose", c, p, b)

    os.unlink(truth_path + ".index")
    with open(truth_path, "w", encoding="utf-8") as out:
        for t in truth:
            out.write(json.dumps(t) + "\n")
    print(f"planted {len(truth)} keys in {len(CLASSES)} classes ({per} each) on {branch} at {base}")


if __name__ == "__main__":
    main()
