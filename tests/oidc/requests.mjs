// HTTP/2 with prior knowledge (h2c), several requests on one connection, one after the other.
// (curl 7.88 cannot reuse an h2c connection: "Error in the HTTP2 framing layer".) Node built-ins
// only.
//
//   node h2c.mjs REQUESTS.json
//       REQUESTS: [{"method","url","headers":["Name: value", ...],"body"?}, ...]; every url must
//       name the same ip:port (the connection). A `Host` header becomes `:authority`.
//
// Prints one JSON array: [{"status","headers":[[name,value]],"body","local","error"}, ...].
import fs from 'node:fs';
import http2 from 'node:http2';

const requests = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const origin = new URL(requests[0].url).origin;
const results = [];
const session = http2.connect(origin);
session.on('error', () => {});

function one(r) {
  return new Promise((resolve) => {
    const url = new URL(r.url);
    const headers = { ':method': r.method ?? 'GET', ':path': url.pathname + url.search, ':authority': url.host };
    for (const line of r.headers ?? []) {
      const i = line.indexOf(':');
      const name = line.slice(0, i).trim().toLowerCase();
      const value = line.slice(i + 1).trim();
      if (name === 'host') headers[':authority'] = value;
      else if (headers[name] === undefined) headers[name] = value;
      else headers[name] = [].concat(headers[name], value);
    }
    const local = session.socket ? `${session.socket.localAddress}:${session.socket.localPort}` : null;
    const out = { status: 0, headers: [], body: '', local, error: null };
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
  });
}

await new Promise((resolve) => {
  session.once('connect', resolve);
  session.once('error', resolve);
});
for (const r of requests) {
  if (session.closed || session.destroyed) {
    results.push({ status: 0, headers: [], body: '', local: null, error: 'connection closed' });
  } else {
    results.push(await one(r));
  }
}
session.close();
process.stdout.write(`${JSON.stringify(results)}\n`);
