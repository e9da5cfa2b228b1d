// spendgate dashboard: the approvals list refreshes itself; the decision feed follows server-sent events.
// Rows come rendered (and escaped) by the server; nothing here builds HTML from data.
(function () {
  "use strict";
  var pending = document.getElementById("pending");
  if (pending) {
    setInterval(function () {
      // leave the list alone while someone is typing a max into it
      if (pending.contains(document.activeElement) && document.activeElement.tagName === "INPUT") return;
      fetch(pending.dataset.refresh, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : null; })
        .then(function (html) { if (html !== null && html !== pending.innerHTML) pending.innerHTML = html; })
        .catch(function () {});
    }, 2000);
  }
  var feed = document.getElementById("feed");
  if (feed && window.EventSource) {
    var live = document.getElementById("live");
    var source = new EventSource(feed.dataset.stream);
    source.onopen = function () { live.textContent = "live"; };
    source.onerror = function () { live.textContent = "reconnecting…"; };
    source.addEventListener("row", function (ev) {
      var empty = document.getElementById("feed-empty");
      if (empty) empty.remove();
      feed.insertAdjacentHTML("afterbegin", ev.data);
      if (feed.firstElementChild) feed.firstElementChild.classList.add("fresh");
    });
  }
})();
