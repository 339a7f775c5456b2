// Token minting for the tests: any header, any claims, signed the way a test needs (including
// the ways a verifier must refuse).
//
//   node jwt.mjs genkey --kid KID --private FILE --public FILE
//       a new RSA key: FILE (private JWKS, {"keys":[jwk]}) and FILE (public JWKS, for jwks_file)
//   node jwt.mjs sign [REQUEST.json]        (the request file, else stdin)
//       REQUEST: {"keys_file": FILE, "tokens": [{"header": {...}, "claims": {...}, "sign": HOW,
//                 "kid_of_key": KID?}, ...]}
//       prints a JSON array of compact JWS strings, in order. `header` is written as given
//       (add `alg`, `kid`, `typ` yourself). HOW:
//         "rs256"             RSASSA-PKCS1-v1_5 SHA-256 with the key `kid_of_key` (default: the
//                             first key of keys_file)
//         "none"              no signature (empty third part)
//         "hs256-public-pem"  HMAC-SHA256 keyed with the key's *public* key as SPKI PEM text
//                             (the classic RS256 → HS256 confusion attack)
//         "hs256-public-jwk"  HMAC-SHA256 keyed with the public JWK's JSON text
//         "garbage"           a random third part
import fs from 'node:fs';
import crypto from 'node:crypto';

const b64 = (buf) => Buffer.from(buf).toString('base64url');
const part = (obj) => b64(JSON.stringify(obj));

function flags(argv) {
  const out = {};
  for (let i = 0; i < argv.length; i += 2) {
    if (!argv[i].startsWith('--') || argv[i + 1] === undefined) throw new Error(`bad argument ${argv[i]}`);
    out[argv[i].slice(2)] = argv[i + 1];
  }
  return out;
}

function publicJwk(jwk) {
  const { kty, n, e, kid, alg, use } = jwk;
  return { kty, n, e, kid, alg, use };
}

function genkey(opts) {
  if (!opts.kid || !opts.private || !opts.public) throw new Error('genkey needs --kid, --private, --public');
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = { ...privateKey.export({ format: 'jwk' }), kid: opts.kid, alg: 'RS256', use: 'sig' };
  fs.writeFileSync(opts.private, `${JSON.stringify({ keys: [jwk] })}\n`, { mode: 0o600 });
  fs.writeFileSync(opts.public, `${JSON.stringify({ keys: [publicJwk(jwk)] })}\n`);
}

function sign(request) {
  const { keys } = JSON.parse(fs.readFileSync(request.keys_file, 'utf8'));
  return request.tokens.map((t) => {
    const jwk = t.kid_of_key ? keys.find((k) => k.kid === t.kid_of_key) : keys[0];
    if (!jwk) throw new Error(`no key ${t.kid_of_key} in ${request.keys_file}`);
    const input = `${part(t.header)}.${part(t.claims)}`;
    const privateKey = crypto.createPrivateKey({ key: jwk, format: 'jwk' });
    const publicKey = crypto.createPublicKey(privateKey);
    let signature;
    switch (t.sign) {
      case 'rs256':
        signature = b64(crypto.sign('sha256', Buffer.from(input), privateKey));
        break;
      case 'none':
        signature = '';
        break;
      case 'hs256-public-pem':
        signature = b64(crypto.createHmac('sha256', publicKey.export({ type: 'spki', format: 'pem' }))
          .update(input).digest());
        break;
      case 'hs256-public-jwk':
        signature = b64(crypto.createHmac('sha256', JSON.stringify(publicJwk(jwk))).update(input).digest());
        break;
      case 'garbage':
        signature = b64(crypto.randomBytes(256));
        break;
      default:
        throw new Error(`unknown signing mode ${t.sign}`);
    }
    return `${input}.${signature}`;
  });
}

const [command, ...rest] = process.argv.slice(2);
if (command === 'genkey') {
  genkey(flags(rest));
} else if (command === 'sign') {
  const request = JSON.parse(fs.readFileSync(rest[0] ?? 0, 'utf8'));
  process.stdout.write(`${JSON.stringify(sign(request))}\n`);
} else {
  process.stderr.write('usage: node jwt.mjs genkey --kid KID --private FILE --public FILE | sign [REQUEST.json]\n');
  process.exit(2);
}
