"""The compliance report's HTML in a real browser (Debian's Chromium, Playwright).

Driven by crates/keymint/tests/it/report.rs, which writes the report with
`keymint report --format html --out FILE`. Input (environment):
KEYMINT_REPORT_HTML (the file), KEYMINT_AXE_JS (axe.min.js),
KEYMINT_CHROMIUM, KEYMINT_SCREENSHOT (where to save a full-page PNG).
Prints one JSON line of findings; exits non-zero on the first failed check.
"""

import json
import os
import sys

from playwright.sync_api import sync_playwright

HTML = os.environ["KEYMINT_REPORT_HTML"]
AXE = os.environ["KEYMINT_AXE_JS"]
CHROMIUM = os.environ.get("KEYMINT_CHROMIUM", "/usr/bin/chromium")
SHOT = os.environ["KEYMINT_SCREENSHOT"]

found = {"checks": [], "console": [], "requests": []}


def check(cond, what):
    if not cond:
        print(json.dumps({"failed": what, **found}))
        sys.exit(1)
    found["checks"].append(what)


with sync_playwright() as p:
    browser = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                args=["--no-sandbox"])
    # JavaScript off first: the page must need none.
    ctx = browser.new_context(java_script_enabled=False, viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.on("console", lambda m: found["console"].append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: found["console"].append(f"pageerror: {e}"))
    page.on("request", lambda r: found["requests"].append(r.url))
    page.goto("file://" + HTML)
    page.wait_for_load_state("load")
    check(page.title() == "keymint compliance report", "the page has its title")
    h1 = page.locator("h1").all_inner_texts()
    check(h1 == ["keymint compliance report"], "one h1")
    h2 = page.locator("h2").all_inner_texts()
    for want in [
        "Summary",
        "Evidence",
        "OWASP Non-Human Identities Top 10 (2025)",
        "OWASP Top 10 for Agentic Applications (2026)",
        "NIST AI RMF 1.0 (AI 100-1) with the Generative AI Profile (AI 600-1)",
        "NIST Cybersecurity Framework 2.0",
    ]:
        check(want in h2, f"a heading `{want}`")
    check(page.locator("table caption").count() >= 6, "every table has a caption")
    check(page.locator("svg[role=img] title").count() == 3, "three charts, each with a title")
    check(page.locator("script").count() == 0, "no script element (stored strings escaped)")
    check(page.locator("img").count() == 0, "no img element (stored strings escaped)")
    check(page.get_by_text("<script>window.pwned = 1</script>", exact=False).count() >= 1,
          "the hostile purpose shows as text")
    ctx.close()

    # JavaScript on: nothing runs, nothing is fetched, no console error;
    # axe-core finds no serious or critical violation.
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    page.on("console", lambda m: found["console"].append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: found["console"].append(f"pageerror: {e}"))
    page.on("request", lambda r: found["requests"].append(r.url))
    page.goto("file://" + HTML)
    page.wait_for_load_state("load")
    check(page.evaluate("window.pwned === undefined"), "no injected code ran")
    errors = [c for c in found["console"] if c.startswith(("error", "pageerror"))]
    check(not errors, f"no console errors: {errors}")
    others = [u for u in found["requests"] if not u.startswith("file://")]
    check(not others, f"nothing fetched: {others}")
    page.screenshot(path=SHOT)
    page.add_script_tag(path=AXE)
    result = page.evaluate("async () => await axe.run(document)")
    bad = [
        {"id": v["id"], "impact": v["impact"], "nodes": [n["target"] for n in v["nodes"]][:3]}
        for v in result["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    found["axe"] = len(result["violations"])
    check(not bad, f"axe: {bad}")
    browser.close()

print(json.dumps({"ok": True, **found}))
