// TerraPeak status page. Plain JavaScript, no dependencies, nothing fetched from anywhere but
// this TerraPeak. Text from the server is always set as text, never parsed as HTML.
'use strict';

const TOKEN_KEY = 'terrapeak-token';
const main = document.getElementById('main');
let session = null;
let refreshTimer = null;

// ---- small helpers -------------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function bytes(n) {
  if (n === null || n === undefined) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = Number(n);
  while (v >= 1024 && i < units.length - 1) { v /= 1024; i++; }
  return (i === 0 ? String(v) : v.toFixed(1)) + ' ' + units[i];
}

function percent(r) {
  return r === null || r === undefined ? '–' : (r * 100).toFixed(1) + ' %';
}

function when(secs) {
  if (!secs) return '–';
  return new Date(secs * 1000).toISOString().replace('T', ' ').replace(/\.\d+Z$/, ' UTC');
}

function duration(secs) {
  const s = Math.floor(secs);
  if (s < 120) return s + ' s';
  if (s < 7200) return Math.floor(s / 60) + ' min';
  if (s < 172800) return Math.floor(s / 3600) + ' h';
  return Math.floor(s / 86400) + ' days';
}

function token() { return sessionStorage.getItem(TOKEN_KEY); }

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options) {
  const headers = { Accept: 'application/json' };
  const t = token();
  if (t) headers.Authorization = 'Bearer ' + t;
  const resp = await fetch(path, Object.assign({ headers, cache: 'no-store' }, options || {}));
  let body = null;
  try { body = await resp.json(); } catch (_) { body = null; }
  if (!resp.ok) {
    const msg = body && Array.isArray(body.errors) ? body.errors.join('; ') : resp.statusText;
    throw new HttpError(resp.status, msg);
  }
  return body;
}

function figure(name, label, value, shown, note) {
  return h('div', { class: 'figure', 'data-figure': name, 'data-value': value === null ? '' : value },
    h('dt', {}, label), h('dd', {}, shown), note ? h('dd', { class: 'note' }, note) : null);
}

// Replaces the page's content; absent parts (null, false) are left out.
function render(...nodes) {
  main.replaceChildren(...nodes.flat(Infinity).filter((n) => n !== null && n !== undefined && n !== false));
}

function setTitle(text) {
  document.title = text + ' · TerraPeak';
  return h('h1', {}, text);
}

function showError(e) {
  if (e instanceof HttpError && (e.status === 401 || e.status === 403)) {
    askForToken(e.message);
    render(h('p', { class: 'notice' }, 'A token is needed to see this page.'));
    return;
  }
  render(h('p', { class: 'error', role: 'alert' }, 'Could not load this page: ' + e.message));
}

// ---- session and token ----------------------------------------------------------------------

function askForToken(why) {
  const box = document.getElementById('signin');
  document.getElementById('signin-why').textContent = why ||
    'This TerraPeak needs a token with the read or admin scope to show its status.';
  box.hidden = false;
  document.getElementById('token').focus();
}

async function loadSession() {
  session = await api('/ui/api/session');
  const who = document.getElementById('who');
  const parts = [];
  if (!session.auth) parts.push(h('span', {}, 'No access control'));
  else if (session.caller && session.caller !== 'anonymous') parts.push(h('span', { 'data-caller': session.caller }, 'Token: ' + session.caller));
  if (session.admin) parts.push(h('span', { class: 'badge admin' }, 'admin'));
  if (token()) {
    parts.push(h('button', { type: 'button', class: 'link', id: 'signout', onclick: () => {
      sessionStorage.removeItem(TOKEN_KEY);
      location.reload();
    } }, 'Forget token'));
  } else if (session.auth) {
    parts.push(h('button', { type: 'button', class: 'link', id: 'signin-open', onclick: () => askForToken() }, 'Enter token'));
  }
  who.replaceChildren(...parts);
  document.getElementById('version').textContent = 'TerraPeak ' + session.version;
}

document.getElementById('signin-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const input = document.getElementById('token');
  sessionStorage.setItem(TOKEN_KEY, input.value.trim());
  input.value = '';
  document.getElementById('signin').hidden = true;
  await loadSession().catch(() => {});
  route();
});

// ---- overview ---------------------------------------------------------------------------------

async function overview() {
  const o = await api('/ui/api/overview');
  const hour = o.last_hour || {};
  const minute = o.last_minute || {};
  const s = o.since_start;
  const store = o.store;
  const used = store.max_size ? Math.min(1, store.stored_bytes / store.max_size) : null;
  const cards = h('dl', { class: 'figures' },
    figure('hit-ratio', 'Hit ratio since start', s.hit_ratio, percent(s.hit_ratio), s.hits + ' hits, ' + s.misses + ' misses'),
    figure('hit-ratio-hour', 'Hit ratio, last hour', hour.hit_ratio ?? null, percent(hour.hit_ratio), hour.seconds !== undefined ? 'over ' + duration(hour.seconds) : ''),
    figure('bytes-saved', 'Bytes saved since start', s.bytes_from_cache, bytes(s.bytes_from_cache), bytes(s.bytes_from_upstream) + ' from upstream'),
    figure('bytes-saved-hour', 'Bytes saved, last hour', hour.bytes_from_cache ?? null, bytes(hour.bytes_from_cache)),
    figure('requests-per-second', 'Requests per second', minute.requests_per_second ?? null,
      minute.requests_per_second === null || minute.requests_per_second === undefined ? '–' : minute.requests_per_second.toFixed(1),
      minute.seconds !== undefined ? 'over ' + duration(minute.seconds) : ''),
    figure('requests', 'Requests since start', s.requests, String(s.requests), 'up ' + duration(o.uptime_seconds)));
  const storeBox = h('section', { class: 'panel', 'aria-labelledby': 'store-title' },
    h('h2', { id: 'store-title' }, 'Store'),
    h('dl', { class: 'facts' },
      h('dt', {}, 'Backend'), h('dd', { 'data-figure': 'backend' }, store.backend),
      h('dt', {}, 'State'), h('dd', { 'data-figure': 'ready', class: store.ready ? 'ok' : 'bad' },
        store.ready ? 'ready' : 'degraded', store.offline ? ' · sealed (cache.offline)' : ''),
      h('dt', {}, 'Stored'), h('dd', { 'data-figure': 'stored-bytes', 'data-value': store.stored_bytes },
        bytes(store.stored_bytes), store.max_size ? ' of ' + bytes(store.max_size) + ' (storage.max_size)' : ' (no storage.max_size)',
        ' · ' + store.objects + ' objects'),
      store.evict_unused_after_secs ? [h('dt', {}, 'Evicts unused after'), h('dd', {}, duration(store.evict_unused_after_secs))] : null),
    used === null ? null : h('progress', { max: '100', value: (used * 100).toFixed(1), 'aria-label': 'Store used' }),
    store.degraded.length ? h('ul', { class: 'bad' }, store.degraded.map((d) => h('li', {}, d.side + 's fail (' + d.reason + '): ' + d.error))) : null);
  const ups = h('section', { class: 'panel', 'aria-labelledby': 'up-title' },
    h('h2', { id: 'up-title' }, 'Upstreams'),
    h('table', {},
      h('thead', {}, h('tr', {}, ['Upstream', 'Requests', 'Errors', 'Mean latency', 'Circuit'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, o.upstreams.map((u) => h('tr', { 'data-upstream': u.host },
        h('th', { scope: 'row' }, u.host, u.default ? h('span', { class: 'badge' }, 'default') : null),
        h('td', { 'data-figure': 'upstream-requests', 'data-value': u.requests_total },
          String(u.requests_total), ' ', h('span', { class: 'note' }, Object.entries(u.requests).map(([k, v]) => k + ' ' + v).join(', '))),
        h('td', { 'data-figure': 'upstream-errors', 'data-value': u.errors_total },
          String(u.errors_total), ' ', h('span', { class: 'note' }, Object.entries(u.errors).map(([k, v]) => k + ' ' + v).join(', '))),
        h('td', {}, Object.entries(u.latency_ms).map(([k, v]) => k + ' ' + v.toFixed(1) + ' ms').join(', ') || '–'),
        h('td', { class: u.circuit_open ? 'bad' : 'ok' }, u.circuit_open ? 'open (failing fast)' : 'closed'))))),
    o.artifact_host_circuits_open ? h('p', { class: 'bad' }, o.artifact_host_circuits_open + ' artifact host circuit(s) open') : null);
  const fills = h('section', { class: 'panel', 'aria-labelledby': 'fills-title' },
    h('h2', { id: 'fills-title' }, 'Fills in progress'),
    o.fills.length === 0 ? h('p', { class: 'note', 'data-figure': 'fills', 'data-value': 0 }, 'None right now.') :
      h('table', { 'data-figure': 'fills', 'data-value': o.fills.length },
        h('thead', {}, h('tr', {}, ['Object', 'Progress', ''].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, o.fills.map((f) => h('tr', {},
          h('td', { class: 'mono' }, f.key),
          h('td', {}, f.total ? h('progress', { max: f.total, value: f.written, 'aria-label': 'Downloaded' }) : null,
            ' ' + bytes(f.written) + (f.total ? ' of ' + bytes(f.total) : '')),
          h('td', {}, f.passing ? 'passed through (store cannot keep it)' : ''))))));
  const problems = o.problems_total ? h('p', {}, h('a', { href: '#/problems' }, o.problems_total + ' problem(s) since start')) : null;
  render(setTitle('Overview'), cards, problems, storeBox, ups, fills);
}

// ---- browse and search ----------------------------------------------------------------------

function unitHref(u) {
  if (u.kind === 'provider') return '#/provider/' + [u.host, u.name, u.version, u.platform].join('/');
  return '#/module/' + [u.host, u.name, u.version].join('/');
}

function adminPaths(u) {
  const [os, ...arch] = (u.platform || '').split('_');
  if (u.kind === 'provider') {
    const base = [u.host, u.name, u.version].join('/');
    return {
      purge: '/admin/v1/providers/' + base + '/' + os + '/' + arch.join('_'),
      purgeVersion: '/admin/v1/providers/' + base,
      pin: '/admin/v1/pins/providers/' + base + '/' + os + '/' + arch.join('_'),
      refresh: '/admin/v1/refresh/providers/' + [u.host, u.name].join('/'),
    };
  }
  const base = [u.host, u.name, u.version].join('/');
  return {
    purge: '/admin/v1/modules/' + base,
    pin: '/admin/v1/pins/modules/' + base,
    refresh: '/admin/v1/refresh/modules/' + [u.host, u.name].join('/'),
  };
}

function status(text, bad) {
  const el = document.getElementById('action-status');
  if (el) { el.textContent = text; el.className = bad ? 'error' : 'ok'; }
}

// A button that asks once more before it acts.
function confirmButton(label, confirmLabel, act, attrs) {
  let armed = false;
  let timer = null;
  const b = h('button', Object.assign({ type: 'button', class: 'danger' }, attrs || {}), label);
  b.addEventListener('click', async () => {
    if (!armed) {
      armed = true;
      b.textContent = confirmLabel;
      timer = setTimeout(() => { armed = false; b.textContent = label; }, 6000);
      return;
    }
    clearTimeout(timer);
    b.disabled = true;
    await act();
  });
  return b;
}

function actions(u, after) {
  if (!session || !session.admin) return null;
  const p = adminPaths(u);
  const label = u.host + '/' + u.name + ' ' + u.version + (u.platform ? ' ' + u.platform : '');
  const run = async (method, path, done) => {
    try {
      await api(path, { method });
      await after();
      status(done);
    } catch (e) {
      status(e.message, true);
    }
  };
  return h('div', { class: 'actions', role: 'group', 'aria-label': 'Actions for ' + label },
    h('button', { type: 'button', 'data-action': u.pinned ? 'unpin' : 'pin',
      onclick: () => run(u.pinned ? 'DELETE' : 'PUT', p.pin, (u.pinned ? 'Unpinned ' : 'Pinned ') + label) },
    u.pinned ? 'Unpin' : 'Pin'),
    confirmButton('Purge', 'Confirm purge', () => run('DELETE', p.purge, 'Purged ' + label),
      { 'data-action': 'purge', 'aria-label': 'Purge ' + label }));
}

async function browse(params) {
  const q = params.get('q') || '';
  const kind = params.get('kind') || '';
  const host = params.get('host') || '';
  const pinned = params.get('pinned') === 'true';
  const query = new URLSearchParams({ limit: '200' });
  if (q) query.set('q', q);
  if (kind) query.set('kind', kind);
  if (host) query.set('host', host);
  if (pinned) query.set('pinned', 'true');
  const r = await api('/ui/api/units?' + query);
  const form = h('form', { class: 'search', role: 'search', id: 'search-form' },
    h('label', { for: 'q' }, 'Search'),
    h('input', { id: 'q', name: 'q', type: 'search', value: q, placeholder: 'hashicorp/aws 5.0', autocomplete: 'off' }),
    h('label', { for: 'kind' }, 'Kind'),
    h('select', { id: 'kind', name: 'kind' },
      [['', 'All'], ['provider', 'Providers'], ['module', 'Modules']].map(([v, t]) => h('option', { value: v, selected: v === kind }, t))),
    h('label', { for: 'host' }, 'Upstream'),
    h('select', { id: 'host', name: 'host' },
      h('option', { value: '' }, 'All'), r.hosts.map((x) => h('option', { value: x, selected: x === host }, x))),
    h('label', { class: 'check' }, h('input', { type: 'checkbox', name: 'pinned', id: 'pinned', checked: pinned }), ' Pinned only'),
    h('button', { type: 'submit' }, 'Search'));
  form.addEventListener('submit', (ev) => {
    ev.preventDefault();
    const next = new URLSearchParams();
    const data = new FormData(form);
    for (const k of ['q', 'kind', 'host']) if (data.get(k)) next.set(k, data.get(k));
    if (data.get('pinned')) next.set('pinned', 'true');
    location.hash = '#/browse' + (next.toString() ? '?' + next : '');
  });
  const reload = () => browse(params);
  const rows = r.items.map((u) => h('tr', { 'data-unit': u.kind + ':' + u.host + '/' + u.name + ' ' + u.version + (u.platform ? ' ' + u.platform : '') },
    h('td', {}, u.kind),
    h('th', { scope: 'row' }, h('a', { href: unitHref(u) }, u.host + '/' + u.name)),
    h('td', {}, u.version),
    h('td', {}, u.platform || ''),
    h('td', { class: 'num' }, bytes(u.size)),
    h('td', {}, when(u.last_access)),
    h('td', {}, u.pinned ? h('span', { class: 'badge' }, 'pinned') : ''),
    session && session.admin ? h('td', {}, actions(u, reload)) : null));
  const head = ['Kind', 'Name', 'Version', 'Platform', 'Size', 'Last access', 'Pinned'];
  if (session && session.admin) head.push('Actions');
  render(setTitle('Cached'), form,
    h('p', { id: 'action-status', role: 'status', 'aria-live': 'polite' }),
    h('p', { class: 'note', id: 'result-count' }, r.total + (r.total === 1 ? ' unit' : ' units') + (r.total > r.items.length ? ', first ' + r.items.length + ' shown' : '')),
    r.items.length ? h('table', { id: 'units' },
      h('thead', {}, h('tr', {}, head.map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, rows)) : h('p', {}, 'Nothing stored matches.'));
}

// ---- detail ---------------------------------------------------------------------------------

function facts(pairs) {
  return h('dl', { class: 'facts' }, pairs.filter(([, v]) => v !== undefined).map(([k, v, name]) =>
    [h('dt', {}, k), h('dd', { class: 'mono', 'data-field': name || null }, v === null || v === '' ? '–' : String(v))]));
}

async function detail(kind, parts) {
  const path = '/ui/api/units/' + (kind === 'provider' ? 'providers/' : 'modules/') + parts.map(encodeURIComponent).join('/');
  let r;
  try {
    r = await api(path);
  } catch (e) {
    if (e.status === 404) {
      render(setTitle('Not stored'), h('p', { role: 'alert' }, e.message), h('p', {}, h('a', { href: '#/browse' }, 'Back to what is cached')));
      return;
    }
    throw e;
  }
  const u = r.unit;
  const v = r.verification || {};
  const record = kind === 'provider' ? facts([
    ['File', v.filename, 'filename'],
    ['sha256 (stored bytes)', v.stored_sha256, 'sha256'],
    ['sha256 (registry answer)', v.registry_shasum, 'registry_shasum'],
    ['SHA256SUMS entry', v.sha256sums_entry, 'sums_entry'],
    ['All three agree', v.agrees ? 'yes' : 'no', 'agrees'],
    ['Signed by key', v.unsigned ? 'unsigned (upstream offers no signature)' : v.signed_by, 'signed_by'],
    ['Keys offered', (v.signing_key_ids || []).join(', '), 'key_ids'],
    ['Fetched at', when(v.fetched_at), 'fetched_at'],
    ['Origin URL', v.origin_url, 'origin_url'],
    ['SHA256SUMS from', v.sha256sums_url, 'sums_url'],
  ]) : facts([
    ['Source', v.source ? (v.source.url || v.source.location || '') + (v.source.reference ? ' (ref ' + v.source.reference + ')' : '') + (v.source.subdir ? ' //' + v.source.subdir : '') : null, 'source'],
    ['Source kind', v.source ? v.source.kind : null, 'source_kind'],
    ['Resolved commit', v.git_commit, 'git_commit'],
    ['Ref', v.git_ref, 'git_ref'],
    ['Archive', v.archive, 'archive'],
    ['sha256', v.sha256, 'sha256'],
    ['Fetched at', when(v.fetched_at), 'fetched_at'],
    ['Origin URL', v.origin_url, 'origin_url'],
  ]);
  const back = () => { location.hash = '#/browse?q=' + encodeURIComponent(u.name); };
  let admin = null;
  if (session && session.admin) {
    const p = adminPaths(u);
    const run = async (method, apiPath, done, then) => {
      try { await api(apiPath, { method }); await then(); status(done); } catch (e) { status(e.message, true); }
    };
    admin = h('section', { class: 'panel', 'aria-labelledby': 'actions-title' },
      h('h2', { id: 'actions-title' }, 'Actions'),
      h('div', { class: 'actions' },
        h('button', { type: 'button', 'data-action': u.pinned ? 'unpin' : 'pin',
          onclick: () => run(u.pinned ? 'DELETE' : 'PUT', p.pin, u.pinned ? 'Unpinned' : 'Pinned', () => detail(kind, parts)) }, u.pinned ? 'Unpin' : 'Pin'),
        confirmButton(kind === 'provider' ? 'Purge this platform' : 'Purge this version', 'Confirm purge',
          () => run('DELETE', p.purge, 'Purged', back), { 'data-action': 'purge' }),
        p.purgeVersion ? confirmButton('Purge every platform of ' + u.version, 'Confirm purge',
          () => run('DELETE', p.purgeVersion, 'Purged', back), { 'data-action': 'purge-version' }) : null,
        h('button', { type: 'button', 'data-action': 'refresh',
          onclick: () => run('POST', p.refresh, 'Version list refreshed from upstream', async () => {}) }, 'Refresh version list')));
  }
  render(setTitle(r.label),
    h('p', { id: 'action-status', role: 'status', 'aria-live': 'polite' }),
    h('section', { class: 'panel', 'aria-labelledby': 'unit-title' },
      h('h2', { id: 'unit-title' }, 'Stored'),
      facts([
        ['Upstream', u.host], ['Name', u.name], ['Version', u.version], ['Platform', u.platform || undefined],
        ['Size', bytes(u.size)], ['Stored at', when(u.stored_at)], ['Last access', when(u.last_access)],
        ['Pinned', u.pinned ? 'yes' : 'no', 'pinned'],
      ])),
    h('section', { class: 'panel', 'aria-labelledby': 'verify-title' }, h('h2', { id: 'verify-title' }, 'Verification record'), record),
    admin,
    h('section', { class: 'panel', 'aria-labelledby': 'objects-title' },
      h('h2', { id: 'objects-title' }, 'Objects'),
      h('table', {},
        h('thead', {}, h('tr', {}, ['Key', 'Size', 'sha256', 'Fetched'].map((t) => h('th', { scope: 'col' }, t)))),
        h('tbody', {}, r.objects.map((o) => h('tr', {},
          h('td', { class: 'mono' }, o.key), h('td', { class: 'num' }, bytes(o.size)),
          h('td', { class: 'mono small' }, o.sha256), h('td', {}, when(o.fetched_at))))))));
}

// ---- problems -------------------------------------------------------------------------------

async function problemsPage() {
  const r = await api('/ui/api/problems');
  render(setTitle('Recent problems'),
    h('p', { class: 'note' }, r.total + ' since start; the latest ' + r.items.length + ' are kept, newest first.'),
    r.items.length ? h('table', { id: 'problems' },
      h('thead', {}, h('tr', {}, ['When', 'Kind', 'Status', 'Upstream', 'Request', 'What the client was told'].map((t) => h('th', { scope: 'col' }, t)))),
      h('tbody', {}, r.items.map((p) => h('tr', { 'data-class': p.class },
        h('td', {}, when(p.at)), h('td', {}, p.class), h('td', {}, p.status === null ? 'cut' : String(p.status)),
        h('td', {}, p.upstream || ''), h('td', { class: 'mono' }, p.path), h('td', { class: 'message' }, p.message))))) :
      h('p', {}, 'No problems since start.'));
}

// ---- routing --------------------------------------------------------------------------------

async function route() {
  clearInterval(refreshTimer);
  refreshTimer = null;
  const raw = location.hash.replace(/^#/, '') || '/';
  const [path, qs] = raw.split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  const page = parts[0] || 'overview';
  for (const a of document.querySelectorAll('nav a')) {
    if (a.dataset.page === page || (a.dataset.page === 'browse' && (page === 'provider' || page === 'module'))) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
  try {
    if (page === 'overview') {
      await overview();
      refreshTimer = setInterval(() => overview().catch(showError), 5000);
    } else if (page === 'browse') await browse(new URLSearchParams(qs || ''));
    else if (page === 'provider' && parts.length >= 6) await detail('provider', [parts[1], parts[2], parts[3], parts[4], parts[5]]);
    else if (page === 'module' && parts.length >= 6) await detail('module', [parts[1], parts[2], parts[3], parts[4], parts[5]]);
    else if (page === 'problems') await problemsPage();
    else render(setTitle('Not found'), h('p', {}, h('a', { href: '#/' }, 'Overview')));
    main.dataset.ready = page;
  } catch (e) {
    showError(e);
  }
}

window.addEventListener('hashchange', () => { route(); main.focus(); });
loadSession().catch(showError).finally(route);
