// The browser viewer's embryo page: the time-lapse player, the annotations, and the live
// updates. Served as /view/player.js (the page's policy allows no inline script). It uses
// fetch for JSON and <img> for the frames, nothing else; docs/web.md describes it.
'use strict';
(function () {
  var root = document.getElementById('player');
  if (!root) return;
  var embryoId = root.dataset.embryo;
  var csrf = root.dataset.csrf;
  var canEdit = root.dataset.edit === '1';
  var PREFETCH_AHEAD = 40;     // frames loaded ahead of the one shown
  var IN_FLIGHT_MAX = 6;       // frame requests at once
  var KEPT_MAX = 400;          // loaded frames kept (per plane and position)
  var $ = function (id) { return document.getElementById(id); };
  var img = $('frame'), when = $('when'), scrub = $('scrub'), playButton = $('play');
  var speedSelect = $('speed'), planeSelect = $('plane'), statusLine = $('status');

  var state = {
    embryo: null, version: 0, insemination: 0, frames: [], planes: [], plane: 0,
    index: 0, playing: false, timer: null, lastSeq: 0, editBase: null,
  };
  // What the tests and the measurement read: frames shown, stalls, the first frame's time.
  var stats = { shown: 0, stalls: 0, firstFrameMs: null, playStarted: null, playShown: 0,
                lastUpdate: null, updates: 0, requested: 0, playFps: null,
                playFirstAt: null, playLastAt: null };
  window.esPlayer = { stats: stats, state: state };
  var started = performance.now();

  function hours(at) { return ((at - state.insemination) / 3600000).toFixed(1); }
  function planeOf(frame) {
    // The plane asked for, or the frame's nearest.
    var best = frame.planes[0];
    frame.planes.forEach(function (p) {
      if (Math.abs(p - state.plane) < Math.abs(best - state.plane)) best = p;
    });
    return best;
  }
  function urlOf(i) {
    var f = state.frames[i];
    return '/view/frame?embryo=' + encodeURIComponent(embryoId) + '&at=' + f.at +
      '&plane=' + planeOf(f);
  }

  // ---- the frame cache: url -> {image, loaded, failed}
  var cache = new Map();
  var inFlight = 0;
  function load(i) {
    if (i < 0 || i >= state.frames.length) return null;
    var url = urlOf(i);
    var entry = cache.get(url);
    if (entry) return entry;
    if (inFlight >= IN_FLIGHT_MAX) return null;
    var image = new Image();
    entry = { image: image, loaded: false, failed: false };
    cache.set(url, entry);
    inFlight++;
    stats.requested++;
    image.onload = function () { inFlight--; entry.loaded = true; prefetch(); onLoaded(url); };
    image.onerror = function () { inFlight--; entry.failed = true; prefetch(); onLoaded(url); };
    image.src = url;
    if (cache.size > KEPT_MAX) {
      // Forget the oldest loaded ones (the browser's own cache may still hold them).
      for (var key of cache.keys()) {
        if (cache.size <= KEPT_MAX) break;
        var old = cache.get(key);
        if (old.loaded || old.failed) cache.delete(key);
      }
    }
    return entry;
  }
  function prefetch() {
    for (var k = 0; k <= PREFETCH_AHEAD && inFlight < IN_FLIGHT_MAX; k++) {
      var i = state.index + k;
      if (i >= state.frames.length) break;
      load(i);
    }
  }
  var waitingFor = null;
  function onLoaded(url) {
    if (waitingFor === url) { waitingFor = null; show(state.index); }
  }

  function show(i) {
    if (!state.frames.length) return;
    i = Math.max(0, Math.min(state.frames.length - 1, i));
    state.index = i;
    scrub.value = String(i);
    var entry = load(i);
    var f = state.frames[i];
    when.textContent = hours(f.at) + ' h since insemination · frame ' + (i + 1) + ' of ' +
      state.frames.length + ' · plane ' + planeOf(f);
    var atHours = $('at-hours');
    if (atHours) atHours.textContent = hours(f.at) + ' h';
    if (entry && (entry.loaded || entry.failed)) {
      img.src = entry.image.src;
      img.classList.toggle('missing', entry.failed);
      stats.shown++;
      if (stats.firstFrameMs === null) stats.firstFrameMs = performance.now() - started;
      if (state.playing) {
        var now = performance.now();
        if (stats.playFirstAt === null) stats.playFirstAt = now;
        stats.playLastAt = now;
        stats.playShown++;
      }
      waitingFor = null;
    } else {
      waitingFor = urlOf(i);
    }
    prefetch();
  }

  // ---- playback: the next frame is shown when it is loaded; a wait for one is a stall
  // Each frame has its slot, one every 1/speed after the one before was shown (a clock, not
  // a chain of timer delays, so the timers' lateness does not add up).
  var due = 0, stalledFrame = -1;
  function tick() {
    state.timer = null;
    if (!state.playing) return;
    if (state.index >= state.frames.length - 1) {
      var seconds = (stats.playLastAt - stats.playFirstAt) / 1000;
      stats.playFps = seconds > 0 ? (stats.playShown - 1) / seconds : 0;
      pause();
      statusLine.textContent = 'End of the time-lapse (' + stats.playFps.toFixed(1) + ' frames/s).';
      return;
    }
    var next = load(state.index + 1);
    var slot = 1000 / Number(speedSelect.value);
    if (next && (next.loaded || next.failed)) {
      show(state.index + 1);
      statusLine.textContent = '';
      var now = performance.now();
      due += slot;
      if (now - due > slot) due = now;  // after a stall: the slots start again from here
      state.timer = setTimeout(tick, Math.max(0, due + slot - now));
    } else {
      if (stalledFrame !== state.index + 1) { stalledFrame = state.index + 1; stats.stalls++; }
      statusLine.textContent = 'Loading...';
      state.timer = setTimeout(tick, 20);
    }
  }
  function play() {
    if (!state.frames.length) return;
    if (state.index >= state.frames.length - 1) show(0);
    state.playing = true;
    stats.playStarted = performance.now();
    stats.playShown = 0;
    stats.stalls = 0;
    stats.playFps = null;
    stats.playFirstAt = null;
    stats.playLastAt = null;
    stalledFrame = -1;
    playButton.textContent = 'Pause';
    due = performance.now();
    state.timer = setTimeout(tick, 1000 / Number(speedSelect.value));
  }
  function pause() {
    state.playing = false;
    if (state.timer) clearTimeout(state.timer);
    state.timer = null;
    playButton.textContent = 'Play';
  }
  playButton.addEventListener('click', function () { state.playing ? pause() : play(); });
  $('back').addEventListener('click', function () { pause(); show(state.index - 1); });
  $('next').addEventListener('click', function () { pause(); show(state.index + 1); });
  scrub.addEventListener('input', function () { pause(); show(Number(scrub.value)); });
  planeSelect.addEventListener('change', function () {
    state.plane = Number(planeSelect.value);
    show(state.index);
  });
  document.addEventListener('keydown', function (e) {
    if (e.target && (e.target.tagName === 'INPUT' || e.target.tagName === 'SELECT')) return;
    if (e.key === 'ArrowLeft') { pause(); show(state.index - 1); }
    else if (e.key === 'ArrowRight') { pause(); show(state.index + 1); }
    else if (e.key === ' ') { e.preventDefault(); state.playing ? pause() : play(); }
  });

  // ---- the embryo: frames, planes, annotations
  function text(tag, value) {
    var cell = document.createElement(tag);
    cell.textContent = value;
    return cell;
  }
  function renderAnnotations() {
    var body = document.querySelector('#annotations tbody');
    body.replaceChildren();
    state.embryo.annotations.forEach(function (a) {
      var row = document.createElement('tr');
      row.dataset.id = a.annotation_id;
      row.appendChild(text('td', a.name));
      row.appendChild(text('td', a.value));
      row.appendChild(text('td', a.hours === null ? '' : a.hours.toFixed(1) + ' h'));
      row.appendChild(text('td', a.set_by));
      if (canEdit) {
        var cell = document.createElement('td');
        var change = text('button', 'Change');
        change.type = 'button';
        change.className = 'change';
        change.addEventListener('click', function () { startChange(a); });
        cell.appendChild(change);
        row.appendChild(cell);
      }
      body.appendChild(row);
    });
    $('fate').textContent = state.embryo.fate;
    var scores = state.embryo.scores.map(function (s) { return s.model + ' ' + s.value; });
    $('scores').textContent = 'Scores: ' + (scores.length ? scores.join(', ') : 'none');
  }
  function apply(data, first) {
    // A read that started before this page's own save may end after it: it does not roll
    // the embryo back (its frames are as new as any).
    if (first || data.version >= state.version) {
      state.embryo = data.embryo;
      state.version = data.version;
    }
    state.insemination = data.insemination_at_ms;
    var atEnd = state.index >= state.frames.length - 1;
    state.frames = data.acquisitions;
    var planes = new Set();
    state.frames.forEach(function (f) { f.planes.forEach(function (p) { planes.add(p); }); });
    var list = Array.from(planes).sort(function (a, b) { return a - b; });
    if (list.join() !== state.planes.join()) {
      state.planes = list;
      planeSelect.replaceChildren();
      list.forEach(function (p) {
        var option = text('option', String(p));
        option.value = String(p);
        planeSelect.appendChild(option);
      });
      if (first) state.plane = list.indexOf(0) >= 0 ? 0 : (list[Math.floor(list.length / 2)] || 0);
      planeSelect.value = String(state.plane);
    }
    scrub.max = String(Math.max(0, state.frames.length - 1));
    renderAnnotations();
    if (!state.frames.length) { when.textContent = 'No image yet.'; return; }
    if (data.truncated) statusLine.textContent = 'Only the first ' + state.frames.length + ' acquisitions are shown.';
    // The latest frame first; a newer one follows while the user is not elsewhere.
    if (first || (atEnd && !state.playing)) show(state.frames.length - 1);
    else scrub.value = String(state.index);
  }
  function fetchJson(url, options) {
    return fetch(url, Object.assign({ credentials: 'same-origin' }, options || {}))
      .then(function (response) {
        var type = response.headers.get('content-type') || '';
        if (type.indexOf('application/json') < 0) {
          throw new Error('the session ended; log in again');
        }
        return response.json().then(function (body) { return { status: response.status, body: body }; });
      });
  }
  function reload(first) {
    // A read the page makes on its own (live) does not count as use of the session.
    var url = '/view/embryo.json?id=' + encodeURIComponent(embryoId) + (first ? '' : '&live=1');
    return fetchJson(url).then(function (r) {
      if (r.status !== 200) throw new Error(r.body.message || ('status ' + r.status));
      if (first) state.lastSeq = r.body.last_seq;
      apply(r.body, first);
    });
  }

  // ---- annotations: add or change, with the version the user started from
  var form = $('annotate'), message = $('message');
  function say(textValue, kind) {
    message.textContent = textValue;
    message.className = 'message ' + (kind || '');
  }
  function startChange(a) {
    $('annotation-id').value = a.annotation_id;
    $('annotation-name').value = a.name;
    $('annotation-value').value = a.value;
    // A timing keeps its time unless the user moves to another frame: go to its frame.
    var at = a.event_at ? Date.parse(a.event_at) : NaN;
    $('annotation-at-frame').checked = !isNaN(at);
    if (!isNaN(at) && state.frames.length) {
      var best = 0;
      state.frames.forEach(function (f, i) {
        if (Math.abs(f.at - at) < Math.abs(state.frames[best].at - at)) best = i;
      });
      pause();
      show(best);
    }
    $('cancel-change').hidden = false;
    $('save').textContent = 'Save change';
    state.editBase = state.version;
  }
  function resetForm() {
    form.reset();
    $('annotation-id').value = '';
    $('cancel-change').hidden = true;
    $('save').textContent = 'Save';
    state.editBase = null;
  }
  if (form) {
    form.addEventListener('input', function () {
      if (state.editBase === null) state.editBase = state.version;
    });
    $('cancel-change').addEventListener('click', resetForm);
    form.addEventListener('submit', function (e) {
      e.preventDefault();
      var id = $('annotation-id').value;
      var name = $('annotation-name').value.trim();
      var body = {
        embryo_id: embryoId,
        version: state.editBase === null ? state.version : state.editBase,
        name: name,
        value: $('annotation-value').value,
      };
      if (id) body.annotation_id = Number(id);
      if ($('annotation-at-frame').checked && state.frames.length) {
        body.event_at_ms = state.frames[state.index].at;
      }
      say('Saving...');
      fetchJson('/view/annotate', {
        method: 'POST',
        headers: { 'content-type': 'application/json', 'x-csrf-token': csrf },
        body: JSON.stringify(body),
      }).then(function (r) {
        if (r.status === 200) {
          state.embryo = r.body;
          state.version = r.body.version;
          renderAnnotations();
          resetForm();
          say('Saved ' + name + '.', 'ok');
        } else if (r.status === 412 && r.body.current) {
          // Someone changed the embryo since this edit started: show what it is now.
          var current = r.body.current;
          state.embryo = current;
          state.version = current.version;
          state.editBase = current.version;
          renderAnnotations();
          var same = current.annotations.filter(function (a) {
            return id ? String(a.annotation_id) === id : a.name.toLowerCase() === name.toLowerCase();
          }).pop();
          var now = 'not set';
          if (same) {
            var parts = [];
            if (same.value) parts.push('"' + same.value + '"');
            if (same.hours !== null) parts.push('at ' + same.hours.toFixed(1) + ' h');
            parts.push('set by ' + same.set_by);
            now = parts.join(' ');
          }
          var advice = id ? 'Your entry is kept in the form: save again to replace it.'
            : (same ? 'Your entry is kept in the form: saving again adds another ' + name +
                      '; to correct that one, use its Change button.'
                    : 'Your entry is kept in the form: save again to add it.');
          say('Not saved: the embryo was changed by another user meanwhile (now version ' +
            current.version + '). ' + name + ' is now ' + now + '. ' + advice, 'err conflict');
        } else {
          say('Not saved: ' + (r.body.message || ('status ' + r.status)), 'err');
        }
      }).catch(function (error) { say('Not saved: ' + error.message, 'err'); });
    });
  }

  // ---- live: the change feed, long-polled
  var live = $('live');
  var planeRetry = null;
  function poll() {
    var asked = performance.now();
    var next = 0;
    fetchJson('/view/changes?after=' + state.lastSeq + '&wait=25&limit=200').then(function (r) {
      if (r.status === 410) {
        // The page's position is gone (the log moved on, or the data was restored): read the
        // embryo again and follow from its new position.
        return reload(true);
      }
      if (r.status !== 200) throw new Error(r.body.message || ('status ' + r.status));
      // An empty answer that came at once (the server had no room to wait): not straight again.
      if (!r.body.items.length && performance.now() - asked < 1000) next = 2000;
      var mine = r.body.items.filter(function (c) {
        return c.id === embryoId && (c.entity === 'embryo' || c.entity === 'acquisition');
      });
      if (!mine.length) { state.lastSeq = r.body.next_after; return; }
      var what = mine.map(function (c) { return c.summary; }).join('; ');
      return reload(false).then(function () {
        // Moved on only once the change is shown: a failed read is tried again.
        state.lastSeq = r.body.next_after;
        stats.updates++;
        stats.lastUpdate = what;
        live.textContent = 'Updated ' + new Date().toLocaleTimeString() + ': ' + what;
        if (state.editBase !== null && state.editBase !== state.version) {
          say('This embryo was changed while you were editing; saving now will show the conflict.', 'err');
        }
        // A new acquisition's other planes come after its first, with no change of their own.
        var last = state.frames[state.frames.length - 1];
        if (last && last.planes.length < state.planes.length && !planeRetry) {
          planeRetry = setTimeout(function () { planeRetry = null; reload(false).catch(function () {}); }, 5000);
        }
      });
    }).then(function () { setTimeout(poll, next); }, function (error) {
      live.textContent = 'Live updates paused: ' + error.message + '. Retrying...';
      setTimeout(poll, 5000);
    });
  }

  reload(true).then(function () {
    live.textContent = 'Live: new frames and edits appear here.';
    poll();
  }, function (error) { when.textContent = 'Cannot load the time-lapse: ' + error.message; });
})();
