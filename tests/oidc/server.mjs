// A real OpenID Connect provider (npm oidc-provider) for Nodegate's end-to-end tests.
//
//   node server.mjs [--host 127.0.0.1] [--port 0] [--redirect-uri URI ...] [--keys FILE]
//                   [--id-token-ttl 3600] [--access-token-ttl 3600]
//
// * Listens on --host (an address the pods of a simulated node can reach; port 0 = a free one,
//   picked before the issuer URL is fixed, so there is no race between choosing a port and
//   binding it) and prints one JSON line on stdout:
//     {"issuer","client_id","client_secret","audience","kid","keys_file","machines":{id:{secret,groups,team}}}
//   Everything else goes to stderr.
// * `gateway` (client_id/client_secret): the web client of the browser login (authorization
//   code + PKCE, refresh tokens). Logins go through devInteractions: any login name and
//   password are accepted; the account is `<login>` with email `<login>@example.test` and the
//   groups of GROUPS below.
// * Machine clients (client_credentials, MACHINES below): their access tokens are JWTs (RFC 9068
//   through resource indicators) for any https `resource` (default: `audience`), with `sub` = the
//   client id and the client's `groups` and `team` claims.
// * Keys: --keys FILE holds the private JWKS (the first key signs). It is read when it exists,
//   else a key is generated and written there, so a test can mint tokens with the issuer's own
//   key. SIGUSR2 rotates: a new key becomes the signing key, the old ones stay published, the
//   file is rewritten, and a line {"event":"rotated","kid":...,"kids":[...]} is printed.
//   State (sessions, grants, tokens) survives a rotation.
import http from 'node:http';
import fs from 'node:fs';
import crypto from 'node:crypto';
import { once } from 'node:events';
import Provider, { errors } from 'oidc-provider';
import { generateKeyPair, exportJWK } from 'jose';

function parseArgs(argv) {
  const out = {
    host: '127.0.0.1', port: 0, redirectUris: [], keys: null, idTokenTtl: 3600, accessTokenTtl: 3600,
  };
  for (let i = 0; i < argv.length; i += 2) {
    const [flag, value] = [argv[i], argv[i + 1]];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    switch (flag) {
      case '--host': out.host = value; break;
      case '--port': out.port = Number(value); break;
      case '--redirect-uri': out.redirectUris.push(value); break;
      case '--keys': out.keys = value; break;
      case '--id-token-ttl': out.idTokenTtl = Number(value); break;
      case '--access-token-ttl': out.accessTokenTtl = Number(value); break;
      default: throw new Error(`unknown flag ${flag}`);
    }
  }
  return out;
}

// Group membership per login name; anyone else is in `devs` only. `huge` is in so many groups
// that the session cannot fit in a cookie (as with some directory-backed providers).
const GROUPS = {
  alice: ['devs', 'admins'],
  bob: ['devs'],
  huge: Array.from({ length: 300 }, (_, i) => `directory-group-with-a-long-name-${i}`),
};
export const CLIENT_ID = 'gateway';
export const CLIENT_SECRET = 'gateway-secret-for-tests-only';
// The default `resource` (and so `aud`) of JWT access tokens.
export const AUDIENCE = 'https://api.nodegate.test';
// client_credentials clients: `groups` and `team` go into their access tokens.
export const MACHINES = {
  'machine-ops': { secret: 'machine-ops-secret-for-tests-only', groups: ['ops', 'machines'], team: 'payments' },
  'machine-guest': { secret: 'machine-guest-secret-for-tests-only', groups: ['guests'], team: 'marketing' },
};
const API_SCOPES = 'api:read api:write';

const args = parseArgs(process.argv.slice(2));
if (args.redirectUris.length === 0) {
  // oidc-provider wants at least one; a test that does not log in never uses it.
  args.redirectUris.push('http://unused.nodegate.test/.nodegate/callback');
}

const server = http.createServer();
server.listen(args.port, args.host);
await once(server, 'listening');
const hostPart = args.host.includes(':') ? `[${args.host}]` : args.host;
const ISSUER = `http://${hostPart}:${server.address().port}`;

async function newKey(kid) {
  const { privateKey } = await generateKeyPair('RS256', { extractable: true });
  return { ...(await exportJWK(privateKey)), kid, use: 'sig', alg: 'RS256' };
}

function nextKid(keys) {
  const used = keys.map((k) => Number(/^rsa-(\d+)$/.exec(k.kid ?? '')?.[1] ?? 0));
  return `rsa-${Math.max(0, ...used) + 1}`;
}

function writeKeys(keys) {
  if (!args.keys) return;
  const tmp = `${args.keys}.tmp`;
  fs.writeFileSync(tmp, `${JSON.stringify({ keys }, null, 2)}\n`, { mode: 0o600 });
  fs.renameSync(tmp, args.keys);
}

let keys;
if (args.keys && fs.existsSync(args.keys)) {
  keys = JSON.parse(fs.readFileSync(args.keys, 'utf8')).keys;
  if (!Array.isArray(keys) || keys.length === 0) throw new Error(`${args.keys}: no keys`);
} else {
  keys = [await newKey('rsa-1')];
  writeKeys(keys);
}

// Shared by every Provider instance, so that a rotation keeps the browser's provider session.
const cookieKeys = [crypto.randomBytes(32).toString('base64url')];

function claimsOf(sub) {
  return { sub, email: `${sub}@example.test`, email_verified: true, name: sub, groups: GROUPS[sub] ?? ['devs'] };
}

function makeProvider(jwks) {
  const signingKid = jwks[0].kid;
  const provider = new Provider(ISSUER, {
    jwks: { keys: jwks },
    cookies: { keys: cookieKeys },
    clients: [
      {
        client_id: CLIENT_ID,
        client_secret: CLIENT_SECRET,
        redirect_uris: args.redirectUris,
        grant_types: ['authorization_code', 'refresh_token'],
        response_types: ['code'],
        token_endpoint_auth_method: 'client_secret_basic',
      },
      ...Object.entries(MACHINES).map(([id, m]) => ({
        client_id: id,
        client_secret: m.secret,
        grant_types: ['client_credentials'],
        response_types: [],
        redirect_uris: [],
        scope: API_SCOPES,
        token_endpoint_auth_method: 'client_secret_basic',
      })),
    ],
    scopes: ['openid', 'email', 'profile', 'offline_access', ...API_SCOPES.split(' ')],
    claims: {
      openid: ['sub'],
      email: ['email', 'email_verified'],
      profile: ['name', 'groups'],
    },
    // Put the scope's claims into the ID token itself (the gateway reads identity from it and
    // does not call userinfo), as Keycloak, Okta and Entra ID do by default.
    conformIdTokenClaims: false,
    findAccount: async (_ctx, sub) => ({ accountId: sub, async claims() { return claimsOf(sub); } }),
    // Identity claims in JWT access tokens: a machine client's groups and team, a user's groups
    // and email.
    extraTokenClaims: async (_ctx, token) => {
      if (token.kind === 'ClientCredentials') {
        const m = MACHINES[token.clientId];
        return m ? { groups: m.groups, team: m.team, client_id: token.clientId } : undefined;
      }
      if (token.accountId) {
        const { email, groups } = claimsOf(token.accountId);
        return { email, groups };
      }
      return undefined;
    },
    // Refresh tokens without asking for offline_access (which oidc-provider only honours with
    // prompt=consent): the gateway's refresh path is what is under test.
    issueRefreshToken: async (_ctx, client) => client.grantTypeAllowed('refresh_token'),
    // Rotate on every use, the strictest behaviour a provider can have: a refresh token that was
    // already used is rejected, so a gateway that refreshes twice for one session fails the test.
    rotateRefreshToken: true,
    ttl: {
      IdToken: args.idTokenTtl,
      AccessToken: args.accessTokenTtl,
      ClientCredentials: args.accessTokenTtl,
      RefreshToken: 24 * 3600,
      Grant: 24 * 3600,
      Session: 24 * 3600,
      Interaction: 600,
    },
    features: {
      devInteractions: { enabled: true },
      clientCredentials: { enabled: true },
      revocation: { enabled: true },
      rpInitiatedLogout: { enabled: true },
      resourceIndicators: {
        enabled: true,
        // Machine clients get JWT access tokens for AUDIENCE without naming it; the web client
        // only gets one when it asks (its login then keeps the plain OIDC shape).
        defaultResource: async (_ctx, client, oneOf) => {
          if (oneOf) return oneOf;
          return client?.grantTypeAllowed('client_credentials') ? AUDIENCE : undefined;
        },
        useGrantedResource: async () => true,
        getResourceServerInfo: async (_ctx, resource) => {
          let url;
          try { url = new URL(resource); } catch { throw new errors.InvalidTarget(); }
          if (url.protocol !== 'https:') throw new errors.InvalidTarget();
          return {
            scope: API_SCOPES,
            audience: resource,
            accessTokenFormat: 'jwt',
            accessTokenTTL: args.accessTokenTtl,
            jwt: { sign: { alg: 'RS256', kid: signingKid } },
          };
        },
      },
    },
    pkce: { required: () => true },
  });
  // Quiet the development warnings' stack traces; errors still reach stderr.
  provider.on('server_error', (_ctx, err) => console.error('server_error', err));
  return { provider, handler: provider.callback() };
}

let current = makeProvider(keys);
server.on('request', (req, res) => current.handler(req, res));

function emit(obj) {
  process.stdout.write(`${JSON.stringify(obj)}\n`);
}

let rotating = Promise.resolve();
process.on('SIGUSR2', () => {
  rotating = rotating.then(async () => {
    keys = [await newKey(nextKid(keys)), ...keys];
    writeKeys(keys);
    current = makeProvider(keys);
    emit({ event: 'rotated', kid: keys[0].kid, kids: keys.map((k) => k.kid) });
  }).catch((err) => console.error('rotation failed', err));
});

emit({
  issuer: ISSUER,
  client_id: CLIENT_ID,
  client_secret: CLIENT_SECRET,
  audience: AUDIENCE,
  kid: keys[0].kid,
  keys_file: args.keys,
  machines: MACHINES,
});
for (const sig of ['SIGTERM', 'SIGINT']) process.on(sig, () => { server.close(); process.exit(0); });
