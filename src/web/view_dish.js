// The browser viewer's dish grid: redrawn when one of its embryos changes (a new frame, an
// edit), without a reload. Served as /view/dish.js; it long-polls the change feed from the
// position the page was read at, and on a change of one of its embryos reads the page again
// and swaps the grid in. docs/web.md describes it.
'use strict';
(function () {
  var grid = document.getElementById('grid');
  var live = document.getElementById('live');
  if (!grid || !live) return;
  var after = Number(grid.dataset.seq);
  function embryos() {
    return new Set(Array.from(grid.querySelectorAll('.embryo')).map(function (e) {
      return e.dataset.embryo;
    }));
  }
  function json(response) {
    var type = response.headers.get('content-type') || '';
    if (type.indexOf('application/json') < 0) throw new Error('the session ended; log in again');
    return response.json().then(function (body) { return { status: response.status, body: body }; });
  }
  function redraw(changes) {
    // live=1: the page's own read does not count as use of the session.
    var url = location.href + (location.search ? '&' : '?') + 'live=1';
    return fetch(url, { credentials: 'same-origin' }).then(function (response) {
      if (!response.ok) throw new Error('status ' + response.status);
      return response.text();
    }).then(function (html) {
      // Parsed, not run: the page's policy lets no script in it execute.
      var fresh = new DOMParser().parseFromString(html, 'text/html').getElementById('grid');
      if (!fresh) throw new Error('the session ended; log in again');
      grid.replaceChildren.apply(grid, Array.from(fresh.childNodes).map(function (node) {
        return document.importNode(node, true);
      }));
      live.textContent = 'Updated ' + new Date().toLocaleTimeString() + ': ' +
        changes.map(function (c) { return c.summary; }).join('; ');
    });
  }
  function poll() {
    var asked = performance.now();
    var next = 0;
    fetch('/view/changes?after=' + after + '&wait=25&limit=200', { credentials: 'same-origin' })
      .then(json)
      .then(function (r) {
        // The page's position is gone (the log moved on, or the data was restored).
        if (r.status === 410) { location.reload(); return; }
        if (r.status !== 200) throw new Error(r.body.message || ('status ' + r.status));
        // An empty answer that came at once (the server had no room to wait): not straight again.
        if (!r.body.items.length && performance.now() - asked < 1000) next = 2000;
        var mine = embryos();
        var changes = r.body.items.filter(function (c) {
          return (c.entity === 'embryo' || c.entity === 'acquisition') && mine.has(c.id);
        });
        if (!changes.length) { after = r.body.next_after; return; }
        // Moved on only once the grid is redrawn: a failed read is tried again.
        return redraw(changes).then(function () { after = r.body.next_after; });
      })
      .then(function () { setTimeout(poll, next); }, function (error) {
        live.textContent = 'Live updates paused: ' + error.message + '. Retrying...';
        setTimeout(poll, 5000);
      });
  }
  live.textContent = 'Live: new frames and edits appear here.';
  poll();
})();
