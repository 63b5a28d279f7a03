// Drives the control plane's dashboard in headless Chromium (Debian's, at
// /usr/bin/chromium) for tests/tests/it/dashboard.rs, which runs the system and
// kills processes; this script only looks at the page.
//
//   node tests/browser/dashboard.mjs <control-plane-url>
//
// Opens <url>/dashboard, waits for its first drawing and prints `ready`. Then
// reads commands on stdin, one per line, and answers each with one line on
// stdout, `ok …` or `fail …`:
//
//   services NAME[,NAME…] [TIMEOUT_MS]      every service is listed
//   health INSTANCE up|down [TIMEOUT_MS]    the instance shows in that health
//   errors                                  script errors and CSP violations seen
//   quit                                    close the browser and exit
//
// Every wait is bounded (10 s by default); the script exits by itself after
// MAX_RUN_MS or when stdin closes. Install what it needs with scripts/browser.
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const MAX_RUN_MS = 300_000;
const DEFAULT_WAIT_MS = 10_000;
const LOAD_WAIT_MS = 20_000;

const base = process.argv[2];
if (!base) {
  console.error('usage: node dashboard.mjs <control-plane-url>');
  process.exit(2);
}

const say = (line) => process.stdout.write(`${line}\n`);

let browser = null;
async function finish(code) {
  if (browser) await browser.close().catch(() => {});
  process.exit(code);
}
setTimeout(() => {
  say(`fail the browser script ran longer than ${MAX_RUN_MS} ms`);
  finish(3);
}, MAX_RUN_MS).unref();

// Flags this machine needs: no sandbox (root in a container), and nothing that
// reaches for the network on its own (the closed network refuses it).
browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  args: [
    '--headless',
    '--no-sandbox',
    '--disable-gpu',
    '--disable-quic',
    '--no-first-run',
    '--disable-background-networking',
    '--disable-component-update',
    '--disable-sync',
  ],
  timeout: LOAD_WAIT_MS,
});
const page = await browser.newPage();

// Script errors and policy violations; a missing endpoint's 404 is not one (the
// page shows "unavailable" for it, by design).
const errors = [];
page.on('pageerror', (e) => errors.push(`pageerror: ${e.message}`));
page.on('console', (m) => {
  const text = m.text();
  if (m.type() === 'error' && !text.startsWith('Failed to load resource')) errors.push(`console: ${text}`);
});

try {
  const res = await page.goto(`${base}/dashboard`, { timeout: LOAD_WAIT_MS });
  if (!res || res.status() !== 200) throw new Error(`GET /dashboard answered ${res ? res.status() : 'nothing'}`);
  await page.waitForSelector('body[data-ready="true"]', { timeout: LOAD_WAIT_MS });
  say('ready');
} catch (e) {
  say(`fail the dashboard did not load: ${e.message.split('\n')[0]}`);
  await finish(1);
}

/** Wait for `selector`; `ok NAME MS` or `fail NAME WHY`. */
async function expect(name, selector, timeout, describe) {
  const t0 = Date.now();
  try {
    await page.waitForSelector(selector, { timeout, state: 'attached' });
    return `ok ${name} ${Date.now() - t0}`;
  } catch (_) {
    return `fail ${name} after ${timeout} ms: ${await describe()}`;
  }
}

async function run(line) {
  const [cmd, ...args] = line.trim().split(/\s+/);
  switch (cmd) {
    case 'services': {
      const names = (args[0] || '').split(',').filter(Boolean);
      const timeout = Number(args[1] || DEFAULT_WAIT_MS);
      if (!names.length) return 'fail usage: services NAME[,NAME…] [TIMEOUT_MS]';
      // Every one: wait for each in turn within the one budget.
      const t0 = Date.now();
      for (const n of names) {
        const left = Math.max(1, timeout - (Date.now() - t0));
        const r = await expect('services', `[data-service="${n}"]`, left, async () => {
          const listed = await page.$$eval('[data-service]', (els) => els.map((e) => e.dataset.service));
          return `${n} is not listed (listed: ${listed.join(', ') || 'none'})`;
        });
        if (r.startsWith('fail')) return r;
      }
      return `ok services ${Date.now() - t0}`;
    }
    case 'health': {
      const [id, want, ms] = args;
      if (!id || !['up', 'down'].includes(want)) return 'fail usage: health INSTANCE up|down [TIMEOUT_MS]';
      return expect('health', `[data-instance="${id}"][data-health="${want}"]`, Number(ms || DEFAULT_WAIT_MS), async () => {
        const now = await page.$$eval(`[data-instance="${id}"]`, (els) =>
          els.map((e) => `${e.dataset.health} (${e.querySelector('.reason')?.textContent || ''})`),
        );
        return `${id} is ${now.join(', ') || 'not shown'}`;
      });
    }
    case 'errors':
      return `ok errors ${JSON.stringify(errors)}`;
    case 'quit':
      await finish(0);
      return '';
    default:
      return `fail unknown command ${JSON.stringify(cmd)}`;
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  say(await run(line));
}
// stdin closed: the test is gone.
await finish(0);
