// The status page in a real headless Chromium, driven by playwright-core. tests/ui.rs starts
// TerraPeak (with access control) against a fake upstream, makes a known sequence of requests,
// and runs this with what the page must show; this prints a JSON summary and exits non-zero on
// the first failed check. Environment:
//   TP_BASE           TerraPeak's base URL (http://127.0.0.1:port)
//   TP_READ_TOKEN     a token with the read scope
//   TP_ADMIN_TOKEN    a token with the admin scope
//   TP_EXPECT         JSON: what the metrics say, and the unit to look at and purge
//   TP_OUT            where the screenshots go
//   TERRAPEAK_TEST_CHROMIUM, TERRAPEAK_TEST_PLAYWRIGHT: the browser and the driver
'use strict';

const path = require('path');
const fs = require('fs');
const { chromium } = require(process.env.TERRAPEAK_TEST_PLAYWRIGHT);

const base = process.env.TP_BASE;
const expect = JSON.parse(process.env.TP_EXPECT);
const out = process.env.TP_OUT;
fs.mkdirSync(out, { recursive: true });

function check(cond, what) {
  if (!cond) throw new Error('check failed: ' + what);
}

async function shot(page, name) {
  const file = path.join(out, name + '.png');
  await page.screenshot({ path: file, fullPage: true });
  return file;
}

async function ready(page, name) {
  await page.waitForSelector(`main[data-ready="${name}"]`, { timeout: 15000 });
}

async function figure(page, name) {
  return page.getAttribute(`[data-figure="${name}"]`, 'data-value');
}

async function signIn(page, token) {
  await page.waitForSelector('#signin:not([hidden])');
  await page.fill('#token', token);
  await page.press('#token', 'Enter');
  await page.waitForSelector('#signin', { state: 'hidden' });
}

// Every form control has a label and every button a name.
async function accessible(page, where) {
  const unnamed = await page.evaluate(() => {
    const bad = [];
    for (const el of document.querySelectorAll('input, select, textarea')) {
      if (el.type === 'hidden') continue;
      if (!(el.labels && el.labels.length) && !el.getAttribute('aria-label')) bad.push(el.outerHTML);
    }
    for (const b of document.querySelectorAll('button, a')) {
      if (b.offsetParent === null) continue;
      if (!(b.textContent.trim() || b.getAttribute('aria-label'))) bad.push(b.outerHTML);
    }
    return bad;
  });
  check(unnamed.length === 0, where + ': controls without a label: ' + unnamed.join(' '));
  // Text contrast against its background, WCAG AA (4.5:1).
  const low = await page.evaluate(() => {
    const rgb = (c) => (c.match(/[\d.]+/g) || []).map(Number);
    const lum = ([r, g, b]) => {
      const f = (v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : Math.pow((v + 0.055) / 1.055, 2.4); };
      return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const background = (el) => {
      for (let e = el; e; e = e.parentElement) {
        const c = rgb(getComputedStyle(e).backgroundColor);
        if (c.length === 3 || (c.length === 4 && c[3] > 0)) return c.slice(0, 3);
      }
      return [255, 255, 255];
    };
    const bad = [];
    for (const el of document.querySelectorAll('body *')) {
      if (el.offsetParent === null && el.tagName !== 'BODY') continue;
      const own = [...el.childNodes].some((n) => n.nodeType === 3 && n.textContent.trim());
      if (!own) continue;
      const fg = lum(rgb(getComputedStyle(el).color).slice(0, 3));
      const bg = lum(background(el));
      const ratio = (Math.max(fg, bg) + 0.05) / (Math.min(fg, bg) + 0.05);
      if (ratio < 4.5) bad.push(el.tagName + ' "' + el.textContent.trim().slice(0, 30) + '" ' + ratio.toFixed(2));
    }
    return bad;
  });
  check(low.length === 0, where + ': text below 4.5:1 contrast: ' + low.join('; '));
}

let current = null;

(async () => {
  const browser = await chromium.launch({
    executablePath: process.env.TERRAPEAK_TEST_CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 } });
  const requests = [];
  context.on('request', (r) => requests.push(r.url()));
  const errors = [];
  const page = await context.newPage();
  current = page;
  page.on('pageerror', (e) => errors.push(e.message));
  // A refused data request (401 before a token is given) is expected; anything else is not.
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().includes('status of 401')) errors.push(m.text());
  });
  const summary = { screenshots: [] };

  // 1. Without a token: the page asks for one, shows no data and offers no action.
  await page.goto(base + '/ui/');
  await page.waitForSelector('#signin:not([hidden])');
  check(await page.locator('[data-action]').count() === 0, 'no actions without a token');
  check(await page.locator('[data-figure]').count() === 0, 'no figures without a token');
  summary.screenshots.push(await shot(page, 'signin'));
  // Keyboard: the token field has the focus, so a token can be typed and sent with Enter.
  check(await page.evaluate(() => document.activeElement.id) === 'token', 'the token field has the focus');

  // 2. With the read token: the overview shows what the metrics show.
  await signIn(page, process.env.TP_READ_TOKEN);
  await ready(page, 'overview');
  await accessible(page, 'overview');
  const hitRatio = Number(await figure(page, 'hit-ratio'));
  check(Math.abs(hitRatio - expect.hit_ratio) < 1e-9, `hit ratio ${hitRatio} = ${expect.hit_ratio}`);
  check(Number(await figure(page, 'bytes-saved')) === expect.bytes_from_cache,
    'bytes saved = terrapeak_sent_bytes_total{source="cache"}');
  const upstreamRequests = Number(await page.getAttribute(
    `[data-upstream="${expect.host}"] [data-figure="upstream-requests"]`, 'data-value'));
  check(upstreamRequests === expect.upstream_requests, `upstream requests ${upstreamRequests} = ${expect.upstream_requests}`);
  check(await page.textContent('[data-figure="backend"]') === 'file', 'the store backend is shown');
  check(await page.locator('[data-action]').count() === 0, 'no actions for a read token');
  summary.overview = { hit_ratio: hitRatio, upstream_requests: upstreamRequests };
  summary.screenshots.push(await shot(page, 'overview'));

  // 3. Search, by keyboard: the provider is found, and only what matches.
  await page.click('nav a[data-page="browse"]');
  await ready(page, 'browse');
  await accessible(page, 'browse');
  await page.focus('#q');
  await page.keyboard.type(expect.search);
  await page.keyboard.press('Enter');
  await page.waitForFunction(() => location.hash.includes('q='));
  await ready(page, 'browse');
  await page.waitForSelector(`tr[data-unit="${expect.search_finds}"]`);
  const found = await page.$$eval('#units tbody tr', (rows) => rows.map((r) => r.dataset.unit));
  check(found.includes(expect.search_finds), 'search finds ' + expect.search_finds + ' in ' + found);
  check(found.every((u) => expect.search.split(' ').every((w) => u.toLowerCase().includes(w.toLowerCase()))),
    'search shows only matches: ' + found);
  check(await page.locator('[data-action]').count() === 0, 'no actions for a read token on the browse page');
  summary.found = found;
  summary.screenshots.push(await shot(page, 'browse'));

  // 4. The provider's verification record.
  await page.goto(base + '/ui/#/provider/' + expect.provider_path);
  await ready(page, 'provider');
  check(await page.textContent('[data-field="sha256"]') === expect.zip_sha256, 'the record shows the stored sha256');
  check(await page.textContent('[data-field="sums_entry"]') === expect.zip_sha256, 'the record shows the SHA256SUMS entry');
  check(await page.textContent('[data-field="agrees"]') === 'yes', 'the record says the hashes agree');
  check((await page.textContent('[data-field="signed_by"]')).length >= 8, 'the record names the signing key');
  summary.screenshots.push(await shot(page, 'provider'));

  // 5. A git module's record names the commit it was packed from.
  await page.goto(base + '/ui/#/module/' + expect.module_path);
  await ready(page, 'module');
  check(await page.textContent('[data-field="git_commit"]') === expect.module_commit, 'the module record shows the commit');
  summary.screenshots.push(await shot(page, 'module'));

  // 6. Recent problems, with the message the client saw.
  await page.click('nav a[data-page="problems"]');
  await ready(page, 'problems');
  const messages = await page.$$eval('#problems td.message', (tds) => tds.map((t) => t.textContent));
  check(messages.includes(expect.problem_message), 'the problems page shows: ' + expect.problem_message + ' in ' + JSON.stringify(messages));
  summary.screenshots.push(await shot(page, 'problems'));

  // 7. An admin purges one platform of one version: it disappears from the list.
  await page.click('#signout');
  await page.waitForLoadState('load');
  await page.click('#signin-open');
  await signIn(page, process.env.TP_ADMIN_TOKEN);
  await page.goto(base + '/ui/#/browse?q=' + encodeURIComponent(expect.purge_search));
  await ready(page, 'browse');
  const row = page.locator(`tr[data-unit="${expect.purge_unit}"]`);
  await row.waitFor();
  check(await page.locator('[data-action="purge"]').count() > 0, 'an admin is offered actions');
  await accessible(page, 'browse as admin');
  summary.screenshots.push(await shot(page, 'browse-admin'));
  await row.locator('[data-action="purge"]').click();
  await row.locator('[data-action="purge"]', { hasText: 'Confirm purge' }).click();
  await page.waitForSelector(`tr[data-unit="${expect.purge_unit}"]`, { state: 'detached' });
  await page.waitForSelector('#action-status.ok');
  check((await page.textContent('#action-status')).startsWith('Purged'), 'the page says it purged');
  summary.purged = expect.purge_unit;
  summary.screenshots.push(await shot(page, 'browse-after-purge'));

  // 8. Nothing was asked of any host but TerraPeak's own.
  const origin = new URL(base).origin;
  const foreign = requests.filter((u) => !u.startsWith(origin + '/') && !u.startsWith('data:'));
  check(foreign.length === 0, 'requests to other hosts: ' + foreign.join(' '));
  check(errors.length === 0, 'no errors in the page: ' + errors.join(' | '));
  summary.requests = requests.length;
  await browser.close();
  console.log(JSON.stringify(summary));
})().catch(async (e) => {
  console.error(e && e.stack ? e.stack : String(e));
  if (current) {
    // What the page showed when the check failed.
    await current.screenshot({ path: path.join(out, 'failure.png'), fullPage: true }).catch(() => {});
    console.error('page at failure: ' + current.url() + '\n' +
      await current.evaluate(() => document.body.innerText).catch(() => ''));
  }
  process.exit(1);
});
