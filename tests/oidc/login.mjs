// A browser login through the gateway, in headless Chromium (playwright-core, Debian's
// /usr/bin/chromium). Run it inside a pod: it opens a protected URL, follows the gateway's
// redirect to the provider, logs in and consents on oidc-provider's devInteractions pages, and
// waits until the browser is back on the protected origin.
//
//   node login.mjs --url URL [--login alice] [--password pw] [--map HOST=ADDR ...]
//                  [--then URL ...] [--timeout-ms 20000] [--user-data-dir DIR]
//
// --map HOST=ADDR  resolve HOST to ADDR (Chromium --host-resolver-rules "MAP HOST ADDR"): the
//                  protected host names point at the service VIP, as cluster DNS would.
// --then URL       after the login, open URL too (same browser, same cookies) and report it.
//
// Prints one JSON line and exits 0 when the browser ended on the protected origin with a status
// below 400, 1 otherwise:
//   {"ok","final_url","status","text","cookies":[...],"navigations":[{url,status}],"via_provider",
//    "then":[{"url","final_url","status","text"}],"blocked":[urls],"error","elapsed_ms","trace"}
// A fresh --user-data-dir is made (and removed) unless one is given.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

function parseArgs(argv) {
  const out = { login: 'alice', password: 'pw', map: [], then: [], timeoutMs: 20000, url: null, userDataDir: null };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    switch (flag) {
      case '--url': out.url = value; break;
      case '--login': out.login = value; break;
      case '--password': out.password = value; break;
      case '--map': out.map.push(value); break;
      case '--then': out.then.push(value); break;
      case '--timeout-ms': out.timeoutMs = Number(value); break;
      case '--user-data-dir': out.userDataDir = value; break;
      default: throw new Error(`unknown flag ${flag}`);
    }
  }
  if (!out.url) throw new Error('--url is required');
  return out;
}

const opts = parseArgs(process.argv.slice(2));
const target = new URL(opts.url);
const ownDir = !opts.userDataDir;
const userDataDir = opts.userDataDir ?? fs.mkdtempSync(path.join(os.tmpdir(), 'ng-chromium-'));
const mapped = opts.map.map((m) => {
  const [host, addr] = m.split('=');
  if (!host || !addr) throw new Error(`--map wants HOST=ADDR, got ${m}`);
  return [host, addr];
});
const rules = mapped.map(([host, addr]) => `MAP ${host} ${addr}`);
// Requests the browser may make: the protected host, the mapped names and IP literals (the
// provider listens on a pod address). Anything else is aborted before any DNS lookup and listed
// in `blocked` (oidc-provider's dev pages @import Google Fonts: ~13 s of DNS timeouts a page
// otherwise), so a redirect off the origin shows up there.
const allowedHosts = new Set([target.hostname, ...mapped.map(([host]) => host)]);
const isIpLiteral = (host) => /^[0-9.]+$/.test(host) || host.startsWith('[');

const result = { ok: false, final_url: null, status: null, text: null, cookies: [], navigations: [], blocked: [], then: [], error: null };
const started = Date.now();
const deadline = started + opts.timeoutMs;
// Progress on stderr, so that a run killed at its deadline still shows where it was.
const traced = [];
const trace = (what) => {
  const line = `+${Date.now() - started}ms ${what}`;
  traced.push(line);
  process.stderr.write(`login.mjs ${line}\n`);
};
const left = () => Math.max(1, deadline - Date.now());

let context;
try {
  trace('launch');
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: '/usr/bin/chromium',
    headless: true,
    timeout: left(),
    args: [
      '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      ...(rules.length ? [`--host-resolver-rules=${rules.join(', ')}`] : []),
    ],
  });
  await context.route('**/*', (route) => {
    const url = new URL(route.request().url());
    const web = url.protocol === 'http:' || url.protocol === 'https:';
    if (web && (allowedHosts.has(url.hostname) || isIpLiteral(url.hostname))) return route.continue();
    result.blocked.push(url.href);
    return route.abort();
  });
  const page = context.pages()[0] ?? await context.newPage();
  page.setDefaultTimeout(left());
  page.on('response', (response) => {
    const req = response.request();
    if (req.isNavigationRequest() && req.frame() === page.mainFrame()) {
      result.navigations.push({ url: response.url(), status: response.status() });
    }
  });

  trace(`goto ${opts.url}`);
  await page.goto(opts.url, { waitUntil: 'load', timeout: left() });
  // Provider pages until the browser is back on the protected origin.
  for (let step = 0; step < 10; step += 1) {
    const here = new URL(page.url());
    trace(`at ${page.url()}`);
    if (here.origin === target.origin) break;
    if (await page.locator('input[name=login]').count() > 0) {
      await page.fill('input[name=login]', opts.login);
      await page.fill('input[name=password]', opts.password);
    } else if (await page.locator('button[type=submit]').count() === 0) {
      throw new Error(`stuck on ${page.url()}: no login form and no consent button`);
    }
    const before = page.url();
    await Promise.all([
      page.waitForURL((u) => u.toString() !== before, { timeout: left(), waitUntil: 'load' }),
      page.click('button[type=submit]'),
    ]);
  }
  await page.waitForLoadState('load', { timeout: left() });
  result.final_url = page.url();
  result.status = result.navigations.at(-1)?.status ?? null;
  result.text = await page.evaluate(() => document.body?.innerText ?? '');
  result.via_provider = result.navigations.some((n) => new URL(n.url).origin !== target.origin);
  const home = new URL(result.final_url).origin === target.origin;
  result.ok = home && result.status !== null && result.status < 400;
  if (!home) result.error = `the login ended on ${result.final_url}, not on ${target.origin}`;
  else if (!result.ok) result.error = `${result.final_url} answered ${result.status}`;

  for (const url of opts.then) {
    const response = await page.goto(url, { waitUntil: 'load', timeout: left() });
    result.then.push({
      url,
      final_url: page.url(),
      status: result.navigations.at(-1)?.status ?? response?.status() ?? null,
      text: await page.evaluate(() => document.body?.innerText ?? ''),
    });
  }
  result.cookies = await context.cookies();
  trace('done');
} catch (err) {
  trace(`error: ${err?.message ?? err}`);
  result.error = String(err?.message ?? err);
  try {
    const page = context?.pages()[0];
    if (page) {
      result.final_url = page.url();
      result.text = await page.evaluate(() => document.body?.innerText ?? '');
    }
  } catch { /* the page is gone */ }
}
// The report first: closing a loaded browser can take long, and the caller has a deadline.
result.elapsed_ms = Date.now() - started;
result.trace = traced;
process.stdout.write(`${JSON.stringify(result)}\n`);
await Promise.race([context?.close().catch(() => {}), new Promise((r) => { setTimeout(r, 5000); })]);
if (ownDir) fs.rmSync(userDataDir, { recursive: true, force: true });
process.exit(result.ok ? 0 : 1);
