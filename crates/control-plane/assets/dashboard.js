// The shoal dashboard: polls the control plane's JSON endpoints and draws each
// section. Plain DOM, no framework, nothing from another origin (the page's
// Content-Security-Policy allows this script and same-origin fetches only).
// Text from the system always goes in through textContent, never as markup.
//
// Endpoints, and what happens while one is missing (404, or the control plane is
// older than the page): the section says "unavailable" and the others go on.
//   /v1/dashboard/topology   services, instances, health, processes, routes (1 s)
//   /v1/metrics/summary      rate, errors, latency, breakers, outbox, sagas, topics (2 s)
//   /v1/alerts               alerts (2 s)
//   /v1/traces?limit=20      recent traces (3 s); /v1/traces/{id} on a click
//   /v1/logs?...             the log search, on demand (or every 2 s when asked)
'use strict';

(() => {
  const FETCH_TIMEOUT_MS = 5000;

  // ---- small helpers ------------------------------------------------------------

  const $ = (sel, root = document) => root.querySelector(sel);

  /** An element with attributes and children (strings become text nodes). */
  function el(tag, attrs, ...children) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === undefined || v === null || v === false) continue;
      if (k === 'class') e.className = v;
      else if (k === 'onclick') e.addEventListener('click', v);
      else e.setAttribute(k, v === true ? '' : String(v));
    }
    for (const c of children.flat()) {
      if (c === undefined || c === null) continue;
      e.append(c instanceof Node ? c : String(c));
    }
    return e;
  }

  /** Replace the children of `target` (an element or a selector). */
  function show(target, ...children) {
    const t = typeof target === 'string' ? $(target) : target;
    t.classList.remove('muted');
    t.replaceChildren(...children.flat().filter((c) => c !== undefined && c !== null));
  }

  function unavailable(target, what, res) {
    const t = typeof target === 'string' ? $(target) : target;
    t.classList.add('muted');
    t.replaceChildren(`${what} unavailable${res ? ` (${res.reason})` : ''}`);
  }

  const present = (v) => v !== undefined && v !== null;
  const fixed = (v, digits = 1) => (typeof v === 'number' ? v.toFixed(digits) : '');
  const percent = (v) => (typeof v === 'number' ? `${(v * 100).toFixed(1)} %` : '');
  const time = (ms) => (typeof ms === 'number' ? new Date(ms).toLocaleTimeString() : '');

  function ago(ms) {
    if (typeof ms !== 'number') return '';
    const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
    if (s < 60) return `${s} s ago`;
    if (s < 3600) return `${Math.round(s / 60)} min ago`;
    return `${Math.round(s / 3600)} h ago`;
  }

  /** GET a JSON endpoint: {ok, status, body, reason}; never throws. */
  async function getJSON(path) {
    const ctl = new AbortController();
    const timer = setTimeout(() => ctl.abort(), FETCH_TIMEOUT_MS);
    try {
      const res = await fetch(path, { signal: ctl.signal, headers: { accept: 'application/json' } });
      let body = null;
      try {
        body = await res.json();
      } catch (_) {
        body = null;
      }
      const message = body && body.error && body.error.message;
      return {
        ok: res.ok,
        status: res.status,
        body,
        reason: res.ok ? '' : message ? `${res.status}: ${message}` : `HTTP ${res.status}`,
      };
    } catch (e) {
      return { ok: false, status: 0, body: null, reason: e.name === 'AbortError' ? 'timed out' : 'unreachable' };
    } finally {
      clearTimeout(timer);
    }
  }

  /** Run `fn` now and then `ms` after each run ends (runs never overlap). */
  function every(ms, fn) {
    const tick = async () => {
      try {
        await fn();
      } catch (e) {
        console.warn('dashboard:', e);
      }
      setTimeout(tick, ms);
    };
    tick();
  }

  function table(headers, rows, attrs) {
    return el(
      'table',
      attrs,
      el('thead', null, el('tr', null, headers.map((h) => el('th', null, h)))),
      el('tbody', null, rows),
    );
  }

  /** A small line chart of `values` (numbers; others skipped). */
  function sparkline(values, label) {
    const ns = 'http://www.w3.org/2000/svg';
    const nums = values.filter((v) => typeof v === 'number');
    const svg = document.createElementNS(ns, 'svg');
    svg.setAttribute('class', 'spark');
    svg.setAttribute('viewBox', '0 0 100 20');
    svg.setAttribute('preserveAspectRatio', 'none');
    svg.setAttribute('role', 'img');
    svg.setAttribute('aria-label', label);
    if (nums.length < 2) return svg;
    const max = Math.max(...nums) || 1;
    const points = nums
      .map((v, i) => `${((i / (nums.length - 1)) * 100).toFixed(1)},${(19 - (v / max) * 18).toFixed(1)}`)
      .join(' ');
    const line = document.createElementNS(ns, 'polyline');
    line.setAttribute('points', points);
    svg.append(line);
    return svg;
  }

  // ---- topology -------------------------------------------------------------------

  let knownServices = [];

  function processText(p) {
    if (!p) return '';
    const parts = [p.state];
    if (p.restarts) parts.push(`${p.restarts} restart${p.restarts === 1 ? '' : 's'}`);
    if (p.last_exit) parts.push(`last exit: ${p.last_exit}`);
    return parts.join(', ');
  }

  function instanceRow(i) {
    return el(
      'tr',
      { 'data-instance': i.id, 'data-health': i.health, class: `health-${i.health}` },
      el('td', null, el('span', { class: `badge ${i.health}` }, i.health)),
      el('td', null, i.id),
      el('td', null, i.version || ''),
      el('td', null, i.addr || ''),
      el('td', null, present(i.pid) ? i.pid : ''),
      el('td', null, processText(i.process)),
      el('td', null, i.registered ? ago(i.registered_at_ms) : 'not registered'),
      el('td', { class: 'reason' }, i.reason || ''),
    );
  }

  function drawTopology(t) {
    const services = t.services || [];
    knownServices = services.map((s) => s.name);
    const cards = services.map((s) => {
      const up = s.instances.filter((i) => i.health === 'up').length;
      const versions = [...new Set(s.instances.map((i) => i.version).filter(Boolean))];
      const state = up === s.instances.length ? 'up' : up === 0 ? 'down' : 'degraded';
      return el(
        'div',
        { class: `service ${state}`, 'data-service': s.name, 'data-up': up, 'data-instances': s.instances.length },
        el(
          'h3',
          null,
          s.name,
          ' ',
          el('span', { class: `badge ${state}` }, `${up}/${s.instances.length} up`),
          versions.length ? el('small', { class: 'muted' }, ` versions ${versions.join(', ')}`) : null,
        ),
        table(['health', 'instance', 'version', 'address', 'pid', 'process', 'registered', 'why'], s.instances.map(instanceRow)),
      );
    });
    const platform = (t.platform || []).map((p) =>
      el(
        'span',
        { class: `badge ${p.state === 'running' ? 'up' : 'down'}`, 'data-process': p.name },
        `${p.name}: ${processText(p)}`,
      ),
    );
    show(
      '#topology .body',
      services.length ? cards : el('p', { class: 'muted' }, 'no service is registered'),
      t.supervised
        ? el('p', null, 'supervised by shoal up: ', platform)
        : el('p', { class: 'muted' }, 'not started by shoal up: health from the registry alone'),
    );

    if (t.routes) {
      show(
        '#routes',
        t.routes.length
          ? table(
              ['route', 'matches', 'services', 'weights'],
              t.routes.map((r) => {
                const entries = Object.entries(r.weights || {});
                const total = entries.reduce((a, [, w]) => a + w, 0);
                const weights = entries.length
                  ? el(
                      'div',
                      { class: 'weights' },
                      entries.map(([version, w]) => {
                        const bar = el('span', { class: 'weight', 'data-version': version }, `${version} ${w}`);
                        bar.style.width = `${total ? (w / total) * 100 : 0}%`;
                        return bar;
                      }),
                    )
                  : el('span', { class: 'muted' }, 'any version');
                return el(
                  'tr',
                  { 'data-route': r.name },
                  el('td', null, r.name),
                  el('td', null, r.matches),
                  el('td', null, (r.services || []).join(', ')),
                  el('td', null, weights),
                );
              }),
            )
          : el('span', { class: 'muted' }, 'no routes'),
      );
    } else if (t.routes_error) {
      unavailable('#routes', 'routes', { reason: t.routes_error });
    } else {
      unavailable('#routes', 'routes', { reason: 'the control plane was not given the system file' });
    }

    const names = $('#service-names');
    names.replaceChildren(
      ...['gateway', 'control-plane', ...knownServices].map((n) => el('option', { value: n })),
    );
  }

  async function pollTopology() {
    const res = await getJSON('/v1/dashboard/topology');
    const status = $('#status');
    if (!res.ok || !res.body) {
      status.textContent = `control plane ${res.reason}`;
      status.className = 'error';
      document.body.dataset.connected = 'false';
      return;
    }
    drawTopology(res.body);
    status.textContent = `updated ${time(res.body.at_ms)}`;
    status.className = 'muted';
    document.body.dataset.connected = 'true';
    document.body.dataset.ready = 'true';
  }

  // ---- metrics summary and alerts ----------------------------------------------------

  function drawTraffic(m) {
    if (!Array.isArray(m.services)) return unavailable('#traffic .body', 'per-service metrics');
    $('#metrics-at').textContent = m.at_ms ? `at ${time(m.at_ms)}, every ${fixed((m.interval_ms || 0) / 1000, 0)} s` : '';
    show(
      '#traffic .body',
      table(
        ['service', 'instances up', 'requests/s', 'errors', 'p50 ms', 'p99 ms', 'rate', 'p99'],
        m.services.map((s) => {
          const h = Array.isArray(s.history) ? s.history : [];
          return el(
            'tr',
            { 'data-metrics-service': s.service, class: s.error_rate > 0.05 ? 'bad' : null },
            el('td', null, s.service),
            el('td', null, present(s.instances_up) ? `${s.instances_up}/${present(s.instances) ? s.instances : '?'}` : ''),
            el('td', { class: 'num' }, fixed(s.rate_rps, 1)),
            el('td', { class: 'num' }, percent(s.error_rate)),
            el('td', { class: 'num' }, fixed(s.p50_ms, 1)),
            el('td', { class: 'num' }, fixed(s.p99_ms, 1)),
            el('td', null, h.length ? sparkline(h.map((p) => p.rate_rps), `${s.service} requests per second`) : ''),
            el('td', null, h.length ? sparkline(h.map((p) => p.p99_ms), `${s.service} p99 latency`) : ''),
          );
        }),
      ),
    );
  }

  function drawBreakers(m) {
    if (!Array.isArray(m.breakers)) return unavailable('#breakers .body', 'breakers');
    if (!m.breakers.length) return show('#breakers .body', el('span', { class: 'muted' }, 'no breakers reported'));
    show(
      '#breakers .body',
      table(
        ['state', 'service', 'instance', 'dependency', 'route'],
        m.breakers.map((b) =>
          el(
            'tr',
            { 'data-breaker': `${b.instance || b.service}/${b.dependency || ''}/${b.route || ''}`, 'data-state': b.state },
            el('td', null, el('span', { class: `badge breaker-${b.state}` }, b.state || '')),
            el('td', null, b.service || ''),
            el('td', null, b.instance || ''),
            el('td', null, b.dependency || ''),
            el('td', null, b.route || ''),
          ),
        ),
      ),
    );
  }

  function drawMessaging(m) {
    if (!Array.isArray(m.topics)) unavailable('#topics', 'topics');
    else if (!m.topics.length) show('#topics', el('span', { class: 'muted' }, 'no topics'));
    else
      show(
        '#topics',
        table(
          ['topic', 'group', 'lag'],
          m.topics.map((t) =>
            el(
              'tr',
              { 'data-topic': t.topic, class: t.lag > 0 ? 'warn' : null },
              el('td', null, t.topic),
              el('td', null, t.group || ''),
              el('td', { class: 'num' }, present(t.lag) ? t.lag : ''),
            ),
          ),
        ),
      );
    if (!Array.isArray(m.outbox)) unavailable('#outbox', 'outbox');
    else if (!m.outbox.length) show('#outbox', el('span', { class: 'muted' }, 'no outbox reported'));
    else
      show(
        '#outbox',
        table(
          ['service', 'backlog'],
          m.outbox.map((o) =>
            el(
              'tr',
              { 'data-outbox': o.service, class: o.backlog > 0 ? 'warn' : null },
              el('td', null, o.service),
              el('td', { class: 'num' }, present(o.backlog) ? o.backlog : ''),
            ),
          ),
        ),
      );
  }

  function drawSagas(m) {
    if (!Array.isArray(m.sagas)) return unavailable('#sagas .body', 'sagas');
    if (!m.sagas.length) return show('#sagas .body', el('span', { class: 'muted' }, 'no sagas reported'));
    show(
      '#sagas .body',
      table(
        ['service', 'saga', 'in flight', 'started/s', 'completed/s', 'compensated/s', 'stuck', 'steps'],
        m.sagas.map((s) =>
          el(
            'tr',
            { 'data-saga': `${s.service}/${s.saga}`, class: s.stuck > 0 ? 'bad' : null },
            el('td', null, s.service),
            el('td', null, s.saga),
            el('td', { class: 'num' }, present(s.running) ? s.running : ''),
            el('td', { class: 'num' }, fixed(s.started_per_s, 2)),
            el('td', { class: 'num' }, fixed(s.completed_per_s, 2)),
            el('td', { class: 'num' }, fixed(s.compensated_per_s, 2)),
            el('td', { class: 'num' }, present(s.stuck) ? s.stuck : ''),
            el(
              'td',
              null,
              el(
                'a',
                {
                  href: '#traces',
                  onclick: () => {
                    // Saga steps are spans named `saga <saga> step <step>`.
                    $('#trace-filter').value = `saga ${s.saga}`;
                    drawTraceList();
                  },
                },
                'traces',
              ),
            ),
          ),
        ),
      ),
    );
  }

  async function pollMetrics() {
    const res = await getJSON('/v1/metrics/summary');
    if (!res.ok || !res.body) {
      $('#metrics-at').textContent = '';
      for (const [sel, what] of [
        ['#traffic .body', 'metrics'],
        ['#breakers .body', 'metrics'],
        ['#topics', 'metrics'],
        ['#outbox', 'metrics'],
        ['#sagas .body', 'metrics'],
      ])
        unavailable(sel, what, res);
      return;
    }
    drawTraffic(res.body);
    drawBreakers(res.body);
    drawMessaging(res.body);
    drawSagas(res.body);
  }

  async function pollAlerts() {
    const res = await getJSON('/v1/alerts');
    if (!res.ok || !res.body || !Array.isArray(res.body.alerts)) return unavailable('#alerts .body', 'alerts', res);
    const active = res.body.alerts.filter((a) => a.state !== 'inactive');
    if (!active.length) return show('#alerts .body', el('span', { class: 'muted' }, 'no alert pending or firing'));
    show(
      '#alerts .body',
      table(
        ['state', 'alert', 'service', 'since', 'value', 'threshold', 'message'],
        active.map((a) =>
          el(
            'tr',
            { 'data-alert': a.name, 'data-state': a.state, class: a.state === 'firing' ? 'bad' : 'warn' },
            el('td', null, el('span', { class: `badge alert-${a.state}` }, a.state)),
            el('td', null, a.name, a.kind ? el('small', { class: 'muted' }, ` ${a.kind}`) : null),
            el('td', null, a.service || ''),
            el('td', null, ago(a.since_ms)),
            el('td', { class: 'num' }, present(a.value) ? fixed(a.value, 3) : ''),
            el('td', { class: 'num' }, present(a.threshold) ? fixed(a.threshold, 3) : ''),
            el('td', null, a.message || ''),
          ),
        ),
      ),
    );
  }

  // ---- traces -----------------------------------------------------------------------

  let traces = null;
  let traceReason = null;
  let openTrace = null;

  function drawTraceList() {
    if (!traces) return unavailable('#traces .body', 'traces', traceReason);
    const q = $('#trace-filter').value.trim().toLowerCase();
    const shown = traces.filter(
      (t) =>
        !q ||
        [t.trace_id, t.root, t.service, ...(t.services || [])].some((v) => typeof v === 'string' && v.toLowerCase().includes(q)),
    );
    if (!shown.length) return show('#traces .body', el('span', { class: 'muted' }, q ? 'no recent trace matches' : 'no traces yet'));
    show(
      '#traces .body',
      table(
        ['started', 'root', 'service', 'services', 'ms', 'spans', 'trace'],
        shown.map((t) =>
          el(
            'tr',
            {
              'data-trace': t.trace_id,
              class: `clickable${t.error ? ' bad' : ''}${t.trace_id === openTrace ? ' open' : ''}`,
              onclick: () => openWaterfall(t.trace_id),
            },
            el('td', null, present(t.start_unix_nanos) ? time(t.start_unix_nanos / 1e6) : ''),
            el('td', null, t.root || ''),
            el('td', null, t.service || ''),
            el('td', null, (t.services || []).join(', ')),
            el('td', { class: 'num' }, fixed(t.duration_ms, 1)),
            el('td', { class: 'num' }, present(t.spans) ? t.spans : ''),
            el('td', { class: 'mono' }, (t.trace_id || '').slice(0, 16)),
          ),
        ),
      ),
    );
  }

  async function pollTraces() {
    const res = await getJSON('/v1/traces?limit=20');
    if (res.ok && res.body && Array.isArray(res.body.traces)) {
      traces = res.body.traces;
      traceReason = null;
    } else {
      traces = null;
      traceReason = res;
    }
    drawTraceList();
  }

  /** Spans in tree order (parents before children, siblings by start), with depth. */
  function spanTree(spans) {
    const ids = new Set(spans.map((s) => s.span_id));
    const children = new Map();
    for (const s of spans) {
      const parent = s.parent_span_id && ids.has(s.parent_span_id) ? s.parent_span_id : '';
      if (!children.has(parent)) children.set(parent, []);
      children.get(parent).push(s);
    }
    for (const list of children.values()) list.sort((a, b) => a.start_unix_nanos - b.start_unix_nanos);
    const out = [];
    const seen = new Set();
    const walk = (parent, depth) => {
      for (const s of children.get(parent) || []) {
        if (seen.has(s.span_id)) continue;
        seen.add(s.span_id);
        out.push({ span: s, depth });
        walk(s.span_id, depth + 1);
      }
    };
    walk('', 0);
    return out;
  }

  async function openWaterfall(id) {
    openTrace = id;
    drawTraceList();
    const target = $('#waterfall');
    target.replaceChildren(el('p', { class: 'muted' }, `loading trace ${id}…`));
    const res = await getJSON(`/v1/traces/${encodeURIComponent(id)}`);
    if (openTrace !== id) return;
    if (!res.ok || !res.body || !Array.isArray(res.body.spans)) return unavailable(target, `trace ${id}`, res);
    const spans = res.body.spans;
    const start = Math.min(...spans.map((s) => s.start_unix_nanos));
    const end = Math.max(...spans.map((s) => s.end_unix_nanos));
    const total = Math.max(1, end - start);
    const rows = spanTree(spans).map(({ span: s, depth }) => {
      const label = el(
        'div',
        { class: 'span-label', title: `${s.service || ''} ${s.instance || ''} ${s.kind || ''}` },
        s.name,
        el('small', { class: 'muted' }, ` ${s.service || ''}`),
      );
      label.style.paddingLeft = `${depth * 14}px`;
      const bar = el('div', { class: `span-bar${s.status === 'error' ? ' error' : ''}` });
      bar.style.left = `${((s.start_unix_nanos - start) / total) * 100}%`;
      bar.style.width = `${Math.max(0.3, ((s.end_unix_nanos - s.start_unix_nanos) / total) * 100)}%`;
      const attrs = Object.entries(s.attributes || {})
        .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
        .join('\n');
      const row = el(
        'div',
        { class: 'span-row', 'data-span': s.span_id, title: attrs },
        label,
        el('div', { class: 'span-track' }, bar),
        el('div', { class: 'span-ms num' }, fixed((s.end_unix_nanos - s.start_unix_nanos) / 1e6, 2)),
      );
      return row;
    });
    target.replaceChildren(
      el(
        'h3',
        null,
        `trace ${id} `,
        el('small', { class: 'muted' }, `${fixed(total / 1e6, 1)} ms, ${spans.length} spans `),
        el(
          'a',
          {
            href: '#logs',
            onclick: () => {
              const f = $('#log-form');
              f.elements.trace.value = id;
              f.elements.since.value = '';
              searchLogs();
            },
          },
          'its logs',
        ),
        ' ',
        el('a', { href: '#traces', onclick: () => { openTrace = null; target.replaceChildren(); drawTraceList(); } }, 'close'),
      ),
      el('div', { class: 'waterfall', 'data-waterfall': id }, rows),
    );
  }

  // ---- log search -------------------------------------------------------------------

  const LOG_KEYS_SHOWN = new Set(['ts', 'level', 'service', 'instance', 'message', 'target']);

  function logRow(l) {
    if (!l.line) {
      return el(
        'tr',
        { class: 'text-line' },
        el('td', { class: 'mono' }, time(l.ts_ms)),
        el('td', null, ''),
        el('td', null, l.process),
        el('td', { class: 'mono' }, l.text),
      );
    }
    const m = l.line;
    const fields = Object.entries(m)
      .filter(([k]) => !LOG_KEYS_SHOWN.has(k))
      .map(([k, v]) => `${k}=${typeof v === 'string' ? v : JSON.stringify(v)}`)
      .join(' ');
    return el(
      'tr',
      { class: `level-${String(m.level || '').toLowerCase()}` },
      el('td', { class: 'mono' }, m.ts || time(l.ts_ms)),
      el('td', null, m.level || ''),
      el('td', null, m.instance || l.process),
      el('td', null, m.message || '', fields ? el('span', { class: 'fields mono' }, ` ${fields}`) : null),
    );
  }

  let searching = false;

  async function searchLogs() {
    if (searching) return;
    searching = true;
    try {
      const f = $('#log-form');
      const q = new URLSearchParams();
      for (const k of ['service', 'level', 'trace', 'grep', 'since', 'limit']) {
        const v = f.elements[k].value.trim();
        if (v) q.set(k, v);
      }
      const res = await getJSON(`/v1/logs?${q}`);
      const out = $('#log-results');
      if (!res.ok || !res.body || !Array.isArray(res.body.lines)) return unavailable(out, 'log search', res);
      const b = res.body;
      const notes = [];
      if (b.earlier) notes.push(`${b.earlier} earlier matching line(s) not shown (limit ${b.limit})`);
      if (b.truncated) notes.push('the oldest lines were left out to keep the answer small');
      if (b.hidden_text) notes.push(`${b.hidden_text} line(s) that are not JSON did not match`);
      show(
        out,
        el('p', { class: 'muted' }, `${b.lines.length} line(s) at ${new Date().toLocaleTimeString()}${notes.length ? `; ${notes.join('; ')}` : ''}`),
        b.lines.length ? table(['time', 'level', 'process', 'message'], b.lines.map(logRow), { class: 'logs' }) : null,
      );
    } finally {
      searching = false;
    }
  }

  // ---- start ------------------------------------------------------------------------

  document.addEventListener('DOMContentLoaded', () => {
    $('#log-form').addEventListener('submit', (e) => {
      e.preventDefault();
      searchLogs();
    });
    $('#trace-filter').addEventListener('input', drawTraceList);
    every(1000, pollTopology);
    every(2000, pollMetrics);
    every(2000, pollAlerts);
    every(3000, pollTraces);
    every(2000, async () => {
      if ($('#log-form').elements.follow.checked) await searchLogs();
    });
  });
})();
