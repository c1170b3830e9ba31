// keymint console: live updates. Every element with `data-refresh="N"` is
// reloaded from the same URL every N seconds while the "Live updates" box
// is ticked, the tab is visible and focus is not inside it. No other
// script runs on these pages (Content-Security-Policy: script-src 'self').
(function () {
  "use strict";
  function live() {
    var box = document.getElementById("live-toggle");
    return !box || box.checked;
  }
  function refresh(el) {
    if (!live() || document.hidden || el.contains(document.activeElement)) return;
    // X-Keymint-Refresh: not the operator's activity, so an unattended
    // page does not keep its session past the idle limit.
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html", "X-Keymint-Refresh": "1" } })
      .then(function (r) {
        if (r.redirected || !r.ok) { return null; }
        return r.text();
      })
      .then(function (text) {
        if (text === null) return;
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById(el.id);
        if (fresh) { el.replaceChildren.apply(el, Array.from(fresh.childNodes)); }
      })
      .catch(function () { /* the next tick tries again */ });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-refresh]").forEach(function (el) {
      var secs = parseInt(el.getAttribute("data-refresh"), 10);
      if (secs > 0 && el.id) { setInterval(function () { refresh(el); }, secs * 1000); }
    });
  });
})();
