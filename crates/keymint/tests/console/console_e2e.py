"""The operator console in a real browser (Debian's Chromium, Playwright).

Driven by crates/keymint/tests/it/console.rs, which starts the server,
prepares tasks and held requests, and checks the API's side afterwards.
Input (environment): KEYMINT_URL, KEYMINT_ADMIN_TOKEN,
KEYMINT_OPERATOR_TOKEN, KEYMINT_TASK (to end), KEYMINT_SUBTASK (below it),
KEYMINT_APPROVAL (to approve), KEYMINT_OWN_APPROVAL (the operator's own),
KEYMINT_AXE_JS (axe.min.js), KEYMINT_CHROMIUM, and KEYMINT_SCREENSHOTS
(a folder; screenshots only when set). Prints one JSON line of findings;
exits non-zero on the first failed check.
"""

import http.server
import json
import os
import sys
import tempfile
import threading

from playwright.sync_api import sync_playwright

URL = os.environ["KEYMINT_URL"]
ADMIN = os.environ["KEYMINT_ADMIN_TOKEN"]
OPERATOR = os.environ["KEYMINT_OPERATOR_TOKEN"]
TASK = os.environ["KEYMINT_TASK"]
SUBTASK = os.environ["KEYMINT_SUBTASK"]
APPROVAL = os.environ["KEYMINT_APPROVAL"]
OWN_APPROVAL = os.environ["KEYMINT_OWN_APPROVAL"]
AXE = os.environ["KEYMINT_AXE_JS"]
CHROMIUM = os.environ.get("KEYMINT_CHROMIUM", "/usr/bin/chromium")
SHOTS = os.environ.get("KEYMINT_SCREENSHOTS", "")

PAGES = [
    "/ui",
    "/ui/tasks",
    f"/ui/tasks/{TASK}",
    f"/ui/tasks/{TASK}/end",
    "/ui/leases",
    "/ui/approvals",
    f"/ui/approvals/{APPROVAL}",
    "/ui/audit",
    "/ui/audit/verify",
    "/ui/audit/export",
    "/ui/upstreams",
    "/ui/entries",
    "/ui/no-such-page",
]

found = {"axe": {}, "checks": []}
current = {"page": None}


def check(cond, what):
    if not cond:
        where = current["page"]
        seen = ""
        if where is not None:
            seen = where.url + " " + where.locator("main").inner_text(timeout=2000)[:400]
        print(json.dumps({"failed": what, "page": seen, **found}))
        sys.exit(1)
    found["checks"].append(what)


def text(page, selector):
    """The text of the first match, or "" when there is none."""
    current["page"] = page
    loc = page.locator(selector)
    return loc.first.inner_text() if loc.count() else ""


def axe(page, name):
    """axe-core on the page as it is: no serious or critical violations."""
    page.add_script_tag(path=AXE)
    result = page.evaluate("async () => await axe.run(document)")
    bad = [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:3]}
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    found["axe"][name] = len(result["violations"])
    check(not bad, f"axe on {name}: {bad}")


def shot(page, name):
    if SHOTS:
        page.screenshot(path=os.path.join(SHOTS, f"{name}.png"), full_page=True)


class Forger(http.server.BaseHTTPRequestHandler):
    """Another web page: serves `PAGES[path]` as HTML."""

    PAGES = {}

    def do_GET(self):
        body = Forger.PAGES.get(self.path, "").encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def forged_pages(action, fields):
    """A form that submits itself, and a `no-cors` fetch with the cookie."""
    inputs = "".join(f'<input name="{k}" value="{v}">' for k, v in fields.items())
    body = "&".join(f"{k}={v}" for k, v in fields.items())
    return {
        "/form": f'<form id="f" method="post" action="{URL}{action}">{inputs}</form>'
                 '<script>document.getElementById("f").submit()</script>',
        "/fetch": f'<script>fetch("{URL}{action}", {{method: "POST", mode: "no-cors", '
                  f'credentials: "include", headers: {{"Content-Type": '
                  f'"application/x-www-form-urlencoded"}}, body: "{body}"}})'
                  '.finally(() => { document.title = "sent"; })</script>',
    }


def sign_in(page, token):
    current["page"] = page
    page.goto(URL + "/ui/login")
    page.get_by_label("Token", exact=True).fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_load_state()


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                args=["--no-sandbox"])

    # ---- without a session: every page sends the browser to sign in ----
    anon = browser.new_context()
    page = anon.new_page()
    for path in PAGES:
        page.goto(URL + path)
        check(page.url == URL + "/ui/login", f"{path} without a session redirects to sign-in")
    # A state change without a session is refused outright.
    r = anon.request.post(URL + f"/ui/tasks/{TASK}/end", form={"reason": "x"},
                          headers={"Origin": URL}, max_redirects=0)
    check(r.status == 401, "a POST without a session is refused")

    # The CSP holds in the browser: an inline script does not run.
    page.goto(URL + "/ui/login")
    try:
        page.add_script_tag(content="window.injected = true")
    except Exception:
        pass
    check(page.evaluate("window.injected === undefined"), "the CSP blocks inline script")

    # ---- the login page: labels, keyboard, accessibility ----
    # axe is injected as a script tag: these contexts bypass the CSP for it.
    anon.close()
    anon = browser.new_context(bypass_csp=True)
    page = anon.new_page()
    page.goto(URL + "/ui/login")
    axe(page, "login")
    page.goto(URL + "/ui/login")
    page.keyboard.press("Tab")
    check(page.evaluate("document.activeElement.className") == "skip",
          "the first Tab reaches the skip link")
    page.keyboard.press("Tab")
    check(page.evaluate("document.activeElement.id") == "token",
          "the next Tab reaches the labelled token field")
    outline = page.evaluate("getComputedStyle(document.activeElement).outlineStyle")
    check(outline not in ("", "none"), "the focused field shows a focus ring")
    shot(page, "login")

    # ---- a wrong token does not sign in ----
    fake = "kma_" + "0" * 40
    sign_in(page, fake)
    check(page.url == URL + "/ui/login", "a wrong token stays on the sign-in page")
    check("sign-in refused" in text(page, "#login-error"),
          "a wrong token is told it was refused")
    check(not [c for c in anon.cookies() if c["name"] == "keymint_session"],
          "a wrong token gets no session cookie")
    # A task token is not an operator.
    # ---- a sign-in POST from another origin is refused ----
    r = anon.request.post(URL + "/ui/login", form={"token": ADMIN},
                          headers={"Origin": "http://evil.example"}, max_redirects=0)
    check(r.status == 403, "a sign-in POST from another origin is refused")
    check(not [c for c in anon.cookies() if c["name"] == "keymint_session"],
          "the foreign sign-in set no cookie")
    anon.close()

    # ---- the admin signs in ----
    admin = browser.new_context(accept_downloads=True, bypass_csp=True)
    page = admin.new_page()
    sign_in(page, ADMIN)
    check(page.url == URL + "/ui", "the admin lands on the overview")
    cookies = [c for c in admin.cookies() if c["name"] == "keymint_session"]
    check(len(cookies) == 1, "one session cookie")
    c = cookies[0]
    check(c["httpOnly"] and c["sameSite"] == "Strict" and c["path"] == "/ui",
          f"the cookie is HttpOnly, SameSite=Strict, Path=/ui: {c}")
    check(ADMIN not in json.dumps(admin.cookies()), "the token is not in the cookie")
    csp = page.evaluate("() => fetch('/ui').then(r => r.headers.get('content-security-policy'))")
    check("default-src 'self'" in csp and "frame-ancestors 'none'" in csp, "a strict CSP")
    check(page.get_by_role("heading", name="Overview").is_visible(), "the overview shows")
    axe(page, "overview")
    shot(page, "overview")

    # ---- tasks: filter, the tree, end a task with confirmation ----
    page.goto(URL + "/ui/tasks")
    page.get_by_label("Workload", exact=True).fill("planner")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_load_state()
    check(page.locator(f"a[href='/ui/tasks/{TASK}']").count() >= 1, "the filter finds the task")
    check(page.locator(f"a[href='/ui/tasks/{SUBTASK}']").count() == 0,
          "the filter leaves out other workloads")
    axe(page, "tasks")
    page.goto(URL + "/ui/tasks")
    shot(page, "tasks")
    page.get_by_label("Search (an id or a workload)").fill(TASK)
    page.get_by_role("button", name="Filter").click()
    page.wait_for_load_state()
    check(page.url == URL + f"/ui/tasks/{TASK}", "searching an id opens the task")
    check(page.locator(f"ul.tree a[href='/ui/tasks/{SUBTASK}']").count() == 1,
          "the task tree shows the sub-agent")
    axe(page, "task")
    shot(page, "task")

    # CSRF: the session's cookie rides along, the token or origin does not.
    csrf = page.goto(URL + f"/ui/tasks/{TASK}/end") and \
        page.locator("input[name=csrf]").first.get_attribute("value")
    r = admin.request.post(URL + f"/ui/tasks/{TASK}/end", form={"reason": "csrf"},
                           headers={"Origin": URL}, max_redirects=0)
    check(r.status == 403, "a POST without the CSRF token is refused")
    r = admin.request.post(URL + f"/ui/tasks/{TASK}/end",
                           form={"reason": "csrf", "csrf": csrf},
                           headers={"Origin": "http://evil.example"}, max_redirects=0)
    check(r.status == 403, "a POST from a foreign origin is refused")
    # Another first character: "x" + csrf[1:] was the token itself when
    # it began with "x" (1 run in 64), and the POST then ended the task.
    wrong = ("y" if csrf[0] == "x" else "x") + csrf[1:]
    r = admin.request.post(URL + f"/ui/tasks/{TASK}/end",
                           form={"reason": "csrf", "csrf": wrong},
                           headers={"Origin": URL}, max_redirects=0)
    check(r.status == 403, "a POST with a wrong CSRF token is refused")
    page.goto(URL + f"/ui/tasks/{TASK}")
    check(text(page, "dl.facts .badge") == "active",
          "the refused POSTs changed nothing")

    # Forged in the browser itself, from other pages: a page on another
    # port of this host is the same site (ports do not count), so the
    # SameSite=Strict cookie rides along and the origin check and the
    # CSRF token must refuse; a page on `localhost` is another site.
    forger = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Forger)
    threading.Thread(target=forger.serve_forever, daemon=True).start()
    port = forger.server_address[1]
    Forger.PAGES = forged_pages(f"/ui/tasks/{TASK}/end", {"reason": "forged"})
    for origin in (f"http://127.0.0.1:{port}", f"http://localhost:{port}"):
        for kind in ("/form", "/fetch"):
            forged = admin.new_page()
            forged.goto(origin + kind)
            if kind == "/fetch":
                forged.wait_for_function("document.title === 'sent'")
            else:
                forged.wait_for_url(URL + "/**")
            forged.close()
            page.goto(URL + f"/ui/tasks/{TASK}")
            check(text(page, "dl.facts .badge") == "active",
                  f"a {kind[1:]} POST forged on {origin} changed nothing")
    forger.shutdown()

    page.get_by_role("link", name="End this task…").click()
    page.wait_for_load_state()
    axe(page, "end-task-confirm")
    page.get_by_label("Reason (for the audit trail)").fill("ended from the console test")
    page.get_by_role("button", name="End the task and revoke its leases").click()
    page.wait_for_load_state()
    check("The task was ended" in text(page, "p.notice"), "the task is ended")
    check(text(page, "dl.facts .badge") == "revoked", "it shows revoked")

    # ---- leases, upstreams, entries, approvals (read) ----
    for path, name in [("/ui/leases", "leases"), ("/ui/upstreams", "upstreams"),
                       ("/ui/entries", "entries"), ("/ui/approvals", "approvals")]:
        page.goto(URL + path)
        check(page.locator("h1").count() == 1, f"{name} renders")
        axe(page, name)
        shot(page, name)

    # ---- audit: browse, filter, verify, export ----
    page.goto(URL + "/ui/audit")
    axe(page, "audit")
    shot(page, "audit")
    page.get_by_label("Kind (e.g. task.ended, or lease. for all)").fill("task.ended")
    page.get_by_role("button", name="Filter").click()
    page.wait_for_load_state()
    kinds = page.locator("tbody tr td:nth-child(3)").all_inner_texts()
    check(kinds and all(k == "task.ended" for k in kinds), f"the kind filter: {kinds}")
    page.get_by_role("link", name="Verify the chain").click()
    page.wait_for_load_state()
    check("intact" in text(page, "#verify-result"), "the chain verifies")
    axe(page, "audit-verify")
    page.goto(URL + "/ui/audit")
    with page.expect_download() as dl:
        page.get_by_role("link", name="Export as JSON lines").click()
    path = os.path.join(tempfile.mkdtemp(), "audit.jsonl")
    dl.value.save_as(path)
    with open(path) as f:
        events = [json.loads(line) for line in f if line.strip()]
    check(events and [e["seq"] for e in events] == list(range(1, len(events) + 1)),
          "the export is the whole chain in order")
    check(all(events[i]["prev"] == events[i - 1]["hash"] for i in range(1, len(events))),
          "each exported event names the hash of the one before")
    found["exported"] = len(events)

    # ---- sign out: the session is gone ----
    page.goto(URL + "/ui")
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_load_state()
    check(page.url == URL + "/ui/login", "sign-out returns to sign-in")
    page.goto(URL + "/ui/tasks")
    check(page.url == URL + "/ui/login", "after sign-out the pages need a new sign-in")
    admin.close()

    # ---- the operator decides ----
    op = browser.new_context(bypass_csp=True)
    page = op.new_page()
    sign_in(page, OPERATOR)
    check(page.url == URL + "/ui", "the operator lands on the overview")
    page.goto(URL + "/ui/tasks")
    check("admin" in text(page, "[role=alert]"),
          "an operator is refused the task list with the broker's reason")
    page.goto(URL + "/ui/approvals")
    page.locator(f"a[href='/ui/approvals/{APPROVAL}']").click()
    page.wait_for_load_state()
    check("llm:embeddings" in text(page, "pre.json"),
          "the held request is shown")
    axe(page, "approval")
    shot(page, "approval")
    page.get_by_label("Note for the requester and the audit trail (optional)").fill("ok for today")
    page.get_by_role("button", name="Approve").click()
    page.wait_for_load_state()
    check("approved" in text(page, "p.notice"), "the request is approved")
    # Their own request: the broker refuses, the page says why.
    page.goto(URL + f"/ui/approvals/{OWN_APPROVAL}")
    page.get_by_role("button", name="Approve").click()
    page.wait_for_load_state()
    err = text(page, "#decide-error")
    check("of their own" in err, f"an operator cannot decide their own request: {err}")
    op.close()
    browser.close()

print(json.dumps({"ok": True, **found}))
