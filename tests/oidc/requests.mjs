// Several HTTP requests on one connection, one after the other, optionally paced: HTTP/1.1
// keep-alive (`h1`) or HTTP/2 with prior knowledge (`h2c`; curl 7.88 cannot reuse an h2c
// connection: "Error in the HTTP2 framing layer"). Node built-ins only.
//
//   node requests.mjs h1|h2c REQUESTS.json
//       REQUESTS: [{"method","url","headers":["Name: value", ...],"body"?,"delay_ms"?}, ...];
//       every url names the same ip:port. `delay_ms` waits before sending that request (the
//       connection stays open meanwhile). A `Host` header becomes `:authority` in h2c.
//
// Prints one JSON array: [{"status","headers":[[name,value]],"body","local","reused","error"}].
import fs from 'node:fs';
import http from 'node:http';
import http2 from 'node:http2';
import { setTimeout as sleep } from 'node:timers/promises';

const [protocol, file] = process.argv.slice(2);
const requests = JSON.parse(fs.readFileSync(file, 'utf8'));
const results = [];

function parseHeaders(lines) {
  const out = [];
  for (const line of lines ?? []) {
    const i = line.indexOf(':');
    out.push([line.slice(0, i).trim(), line.slice(i + 1).trim()]);
  }
  return out;
}

async function h1() {
  const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });
  for (const r of requests) {
    if (r.delay_ms) await sleep(r.delay_ms);
    results.push(await new Promise((resolve) => {
      const url = new URL(r.url);
      const out = { status: 0, headers: [], body: '', local: null, reused: false, error: null };
      // Raw header pairs keep duplicates and spelling.
      const headers = parseHeaders(r.headers).flat();
      const req = http.request({
        host: url.hostname, port: url.port || 80, method: r.method ?? 'GET',
        path: url.pathname + url.search, agent, headers, setHost: !headers.some((h, i) => i % 2 === 0 && h.toLowerCase() === 'host'),
      });
      req.on('socket', (socket) => {
        const record = () => { out.local = `${socket.localAddress}:${socket.localPort}`; };
        if (socket.localPort) record(); else socket.once('connect', record);
      });
      req.on('response', (res) => {
        out.reused = req.reusedSocket;
        out.status = res.statusCode;
        for (let i = 0; i < res.rawHeaders.length; i += 2) out.headers.push([res.rawHeaders[i], res.rawHeaders[i + 1]]);
        res.setEncoding('utf8');
        res.on('data', (d) => { out.body += d; });
        res.on('end', () => resolve(out));
      });
      req.on('error', (err) => { out.error = String(err?.message ?? err); resolve(out); });
      req.setTimeout(10000, () => { out.error = 'timeout'; req.destroy(); });
      req.end(r.body ?? undefined);
    }));
  }
  agent.destroy();
}

async function h2c() {
  const session = http2.connect(new URL(requests[0].url).origin);
  session.on('error', () => {});
  await new Promise((resolve) => { session.once('connect', resolve); session.once('error', resolve); });
  for (const [n, r] of requests.entries()) {
    if (r.delay_ms) await sleep(r.delay_ms);
    if (session.closed || session.destroyed) {
      results.push({ status: 0, headers: [], body: '', local: null, reused: false, error: 'connection closed' });
      continue;
    }
    results.push(await new Promise((resolve) => {
      const url = new URL(r.url);
      const headers = { ':method': r.method ?? 'GET', ':path': url.pathname + url.search, ':authority': url.host };
      for (const [name, value] of parseHeaders(r.headers)) {
        const key = name.toLowerCase();
        if (key === 'host') headers[':authority'] = value;
        else if (headers[key] === undefined) headers[key] = value;
        else headers[key] = [].concat(headers[key], value);
      }
      const local = session.socket ? `${session.socket.localAddress}:${session.socket.localPort}` : null;
      const out = { status: 0, headers: [], body: '', local, reused: n > 0, error: null };
      let req;
      try {
        req = session.request(headers, { endStream: r.body === undefined || r.body === null });
      } catch (err) {
        out.error = String(err?.message ?? err);
        resolve(out);
        return;
      }
      req.setEncoding('utf8');
      req.on('response', (h) => {
        out.status = h[':status'];
        out.headers = Object.entries(h).filter(([k]) => !k.startsWith(':')).map(([k, v]) => [k, String(v)]);
      });
      req.on('data', (d) => { out.body += d; });
      req.on('end', () => resolve(out));
      req.on('error', (err) => { out.error = String(err?.message ?? err); resolve(out); });
      req.setTimeout(10000, () => { out.error = 'timeout'; req.close(); resolve(out); });
      if (r.body !== undefined && r.body !== null) req.end(r.body);
    }));
  }
  session.close();
}

if (protocol === 'h1') await h1();
else if (protocol === 'h2c') await h2c();
else { process.stderr.write('usage: node requests.mjs h1|h2c REQUESTS.json\n'); process.exit(2); }
process.stdout.write(`${JSON.stringify(results)}\n`);
