//! The `OpenID` Connect side of the identity tests: a real provider (`tests/oidc/server.mjs`, npm
//! `oidc-provider`) run in a place of the node, token minting (`tests/oidc/jwt.mjs`) and the
//! headless-Chromium login (`tests/oidc/login.mjs`).
//!
//! Everything runs on `node`; the npm modules come from `npm ci` in `tests/oidc` (`cargo xtask
//! setup` does it). Nothing here downloads anything.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use super::{
    Error, Result, io_err,
    node::{Node, Place},
    process::{POLL, Proc, run_command},
    workspace_dir,
};

/// How long the provider may take to print its JSON line.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Deadline of one `node jwt.mjs` run.
const MINT_TIMEOUT: Duration = Duration::from_secs(20);

/// `tests/oidc`: the npm project of the provider, the minting script and the browser driver.
pub fn oidc_dir() -> PathBuf {
    workspace_dir().join("tests").join("oidc")
}

/// Fails unless `node` runs and `tests/oidc/node_modules` is installed.
pub fn require_node_modules() -> Result<PathBuf> {
    let dir = oidc_dir();
    let modules = dir.join("node_modules");
    for module in ["oidc-provider", "jose", "playwright-core"] {
        let path = modules.join(module);
        if !path.is_dir() {
            return Err(Error::MissingTool {
                tool: "tests/oidc/node_modules",
                path,
                hint: "install the npm modules of the test provider: `cargo xtask setup` (or `npm ci` in tests/oidc)",
            });
        }
    }
    Ok(dir)
}

/// Options of [`OidcProvider::start_with`].
#[derive(Debug, Clone, Default)]
pub struct OidcOptions {
    /// Redirect URIs of the web client (`gateway`), e.g. `http://app.test/.nodegate/callback`.
    pub redirect_uris: Vec<String>,
    /// Lifetime of access tokens (default 3600 s).
    pub access_token_ttl: Option<Duration>,
    /// Lifetime of ID tokens (default 3600 s).
    pub id_token_ttl: Option<Duration>,
}

/// The test `OpenID` Connect provider, running in a place of a node (listening on that place's
/// IPv4 address, so that pods, the gateway and the browser reach it). Killed on drop.
pub struct OidcProvider {
    proc: Proc,
    info: Value,
    keys_file: PathBuf,
    place: Place,
    dir: PathBuf,
}

impl std::fmt::Debug for OidcProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OidcProvider")
            .field("issuer", &self.issuer())
            .field("place", &self.place.name)
            .field("proc", &self.proc)
            .finish_non_exhaustive()
    }
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl OidcProvider {
    /// Starts the provider in `place` with default options; returns once it printed its line.
    pub fn start(node: &Node, place: &Place) -> Result<Self> {
        Self::start_with(node, place, &OidcOptions::default())
    }

    /// Starts the provider in `place`; returns once it printed its JSON line.
    pub fn start_with(node: &Node, place: &Place, options: &OidcOptions) -> Result<Self> {
        let dir = require_node_modules()?;
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let keys_file = node
            .dir()
            .join(format!("oidc-{}-{seq}.keys.json", place.name));
        // A key file left by an earlier run would be reused: start from a fresh key.
        let _ = fs::remove_file(&keys_file);
        let mut cmd = Command::new("node");
        cmd.current_dir(&dir)
            .arg(dir.join("server.mjs"))
            .args(["--host", &place.ipv4.to_string(), "--port", "0"])
            .arg("--keys")
            .arg(&keys_file);
        for uri in &options.redirect_uris {
            cmd.args(["--redirect-uri", uri]);
        }
        if let Some(ttl) = options.access_token_ttl {
            cmd.args(["--access-token-ttl", &ttl.as_secs().to_string()]);
        }
        if let Some(ttl) = options.id_token_ttl {
            cmd.args(["--id-token-ttl", &ttl.as_secs().to_string()]);
        }
        let proc = place.spawn("oidc", cmd)?;
        let info = wait_json_line(&proc, START_TIMEOUT, |v| v.get("issuer").is_some())?;
        Ok(Self {
            proc,
            info,
            keys_file,
            place: place.clone(),
            dir,
        })
    }

    /// The provider's first line: issuer, clients, audience, signing kid.
    pub fn info(&self) -> &Value {
        &self.info
    }

    /// `http://<place ipv4>:<port>`.
    pub fn issuer(&self) -> &str {
        self.info["issuer"].as_str().unwrap_or_default()
    }

    /// Where its keys are published.
    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.issuer())
    }

    /// The default `aud` of its JWT access tokens.
    pub fn audience(&self) -> &str {
        self.info["audience"].as_str().unwrap_or_default()
    }

    /// The web client (browser login): `(client_id, client_secret)`.
    pub fn web_client(&self) -> (&str, &str) {
        (
            self.info["client_id"].as_str().unwrap_or_default(),
            self.info["client_secret"].as_str().unwrap_or_default(),
        )
    }

    /// The private JWKS the provider signs with (first key = current); for [`mint`].
    pub fn keys_file(&self) -> &Path {
        &self.keys_file
    }

    /// The place it runs in.
    pub fn place(&self) -> &Place {
        &self.place
    }

    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }

    /// Its stderr so far (oidc-provider's warnings and errors).
    pub fn stderr(&self) -> String {
        self.proc.stderr()
    }

    /// The `kid` of the current signing key.
    pub fn current_kid(&self) -> Result<String> {
        let keys = read_json(&self.keys_file)?;
        keys["keys"][0]["kid"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::Parse {
                what: self.keys_file.display().to_string(),
                detail: format!("no keys[0].kid in {keys}"),
            })
    }

    /// Rotates the signing key (SIGUSR2): a new key signs from now on, the old ones stay
    /// published. Returns the new `kid` once the provider reported it.
    pub fn rotate(&self) -> Result<String> {
        let before = self.rotations();
        if !self.proc.signal(libc::SIGUSR2) {
            return Err(Error::Command {
                command: "oidc-provider".into(),
                status: "not running".into(),
                stderr: self.stderr(),
            });
        }
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(line) = self.rotations().into_iter().nth(before.len()) {
                return line["kid"]
                    .as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| Error::Parse {
                        what: "oidc-provider rotation line".into(),
                        detail: line.to_string(),
                    });
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout {
                    what: format!(
                        "oidc-provider to rotate its key (stderr: {})",
                        self.stderr()
                    ),
                    seconds: START_TIMEOUT.as_secs_f64(),
                });
            }
            std::thread::sleep(POLL);
        }
    }

    fn rotations(&self) -> Vec<Value> {
        json_lines(&self.proc.stdout())
            .into_iter()
            .filter(|v| v["event"] == "rotated")
            .collect()
    }

    /// A `client_credentials` access token of machine client `client` (`machine-ops`: groups
    /// `ops`, `machines`, team `payments`; `machine-guest`: group `guests`, team `marketing`),
    /// requested with curl from `from`. `resource` sets the token's `aud` (default: the
    /// provider's audience).
    pub fn client_credentials(
        &self,
        from: &Place,
        client: &str,
        resource: Option<&str>,
    ) -> Result<String> {
        let secret = self.info["machines"][client]["secret"]
            .as_str()
            .ok_or_else(|| Error::Parse {
                what: "oidc-provider machine clients".into(),
                detail: format!("no client `{client}` in {}", self.info["machines"]),
            })?;
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "10",
            "-u",
            &format!("{client}:{secret}"),
        ])
        .args([
            "-d",
            "grant_type=client_credentials",
            "-d",
            "scope=api:read",
        ])
        .args([
            "-d",
            &format!("resource={}", resource.unwrap_or(self.audience())),
        ])
        .arg(format!("{}/token", self.issuer()));
        let out = from.run(cmd, Duration::from_secs(15))?.ok()?;
        let reply = out.json()?;
        reply["access_token"]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| Error::Parse {
                what: out.command.clone(),
                detail: format!("no access_token in {reply}"),
            })
    }

    /// Tokens signed with the provider's own keys (see [`mint`]).
    pub fn mint(&self, tokens: &[TokenSpec]) -> Result<Vec<String>> {
        mint_with(&self.dir, &self.keys_file, tokens)
    }
}

/// One token for [`mint`]: the header and claims exactly as written into it, and how to sign.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSpec {
    pub header: Value,
    pub claims: Value,
    pub sign: Signing,
}

/// How [`mint`] signs a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Signing {
    /// RS256 with the key `kid` of the keys file (`None`: its first key).
    Rs256(Option<String>),
    /// No signature at all (an empty third part).
    None,
    /// HMAC-SHA256 keyed with the (first) key's public key as SPKI PEM text: the RS256 → HS256
    /// confusion attack.
    Hs256WithPublicPem,
    /// A random signature.
    Garbage,
}

impl TokenSpec {
    /// RS256 with the first key of the keys file; header `{"alg":"RS256","typ":"JWT","kid":kid}`.
    pub fn rs256(kid: &str, claims: Value) -> Self {
        Self {
            header: json!({"alg": "RS256", "typ": "JWT", "kid": kid}),
            claims,
            sign: Signing::Rs256(None),
        }
    }

    #[must_use]
    pub fn header(mut self, header: Value) -> Self {
        self.header = header;
        self
    }

    #[must_use]
    pub fn signing(mut self, sign: Signing) -> Self {
        self.sign = sign;
        self
    }

    fn to_request(&self) -> Value {
        let (sign, kid) = match &self.sign {
            Signing::Rs256(kid) => ("rs256", kid.clone()),
            Signing::None => ("none", None),
            Signing::Hs256WithPublicPem => ("hs256-public-pem", None),
            Signing::Garbage => ("garbage", None),
        };
        let mut v = json!({"header": self.header, "claims": self.claims, "sign": sign});
        if let Some(kid) = kid {
            v["kid_of_key"] = Value::from(kid);
        }
        v
    }
}

/// Signs `tokens` with the keys of `keys_file` (a private JWKS: the provider's `--keys` file, or
/// one made by [`genkey`]). Runs `node tests/oidc/jwt.mjs sign` in the test's own namespaces.
pub fn mint(keys_file: &Path, tokens: &[TokenSpec]) -> Result<Vec<String>> {
    mint_with(&require_node_modules()?, keys_file, tokens)
}

fn mint_with(dir: &Path, keys_file: &Path, tokens: &[TokenSpec]) -> Result<Vec<String>> {
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let request_file = keys_file.with_extension(format!("mint-{seq}.json"));
    let request = json!({
        "keys_file": keys_file,
        "tokens": tokens.iter().map(TokenSpec::to_request).collect::<Vec<_>>(),
    });
    fs::write(&request_file, request.to_string())
        .map_err(io_err(format!("write {}", request_file.display())))?;
    let mut cmd = Command::new("node");
    cmd.current_dir(dir)
        .arg(dir.join("jwt.mjs"))
        .arg("sign")
        .arg(&request_file);
    let out = run_command(cmd, MINT_TIMEOUT)?.ok()?;
    let _ = fs::remove_file(&request_file);
    serde_json::from_value(out.json()?).map_err(|e| Error::Parse {
        what: out.command,
        detail: format!("{e}: {}", out.stdout),
    })
}

/// A new RSA signing key `kid`: its private JWKS at `private` (for [`mint`]) and its public
/// JWKS at `public` (for an issuer's `jwks_file`).
pub fn genkey(kid: &str, private: &Path, public: &Path) -> Result<()> {
    let dir = require_node_modules()?;
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .arg(dir.join("jwt.mjs"))
        .args(["genkey", "--kid", kid])
        .arg("--private")
        .arg(private)
        .arg("--public")
        .arg(public);
    run_command(cmd, MINT_TIMEOUT)?.ok().map(drop)
}

/// What [`browser_login`] does.
#[derive(Debug, Clone)]
pub struct BrowserLogin {
    /// The protected URL to open.
    pub url: String,
    /// Login name at the provider (any name works; `alice` is in `devs` and `admins`).
    pub login: String,
    /// `host=addr` pairs the browser resolves (the protected host names → the service VIP).
    pub map: Vec<(String, String)>,
    /// URLs opened after the login, in the same browser.
    pub then: Vec<String>,
    pub timeout: Duration,
}

impl BrowserLogin {
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            login: "alice".to_owned(),
            map: Vec::new(),
            then: Vec::new(),
            timeout: Duration::from_secs(45),
        }
    }

    #[must_use]
    pub fn login(mut self, name: &str) -> Self {
        name.clone_into(&mut self.login);
        self
    }

    #[must_use]
    pub fn map(mut self, host: &str, addr: &impl ToString) -> Self {
        self.map.push((host.to_owned(), addr.to_string()));
        self
    }

    #[must_use]
    pub fn then(mut self, url: &str) -> Self {
        self.then.push(url.to_owned());
        self
    }
}

/// Runs `node tests/oidc/login.mjs` (headless Chromium) in `place` and returns its JSON report:
/// `{"ok","final_url","status","text","cookies","navigations","via_provider","then","error"}`.
/// A login that does not end on the protected origin with a status below 400 is still `Ok`
/// (with `"ok": false`): the caller asserts.
pub fn browser_login(place: &Place, login: &BrowserLogin) -> Result<Value> {
    // One browser at a time per test process: two Chromiums starting at once on the two cores
    // of these machines (with builds running) can take most of a login's deadline.
    static BROWSER: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = BROWSER
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let dir = require_node_modules()?;
    let chromium = Path::new("/usr/bin/chromium");
    if !chromium.is_file() {
        return Err(Error::MissingTool {
            tool: "chromium",
            path: chromium.to_path_buf(),
            hint: "install it: `cargo xtask setup` (Debian package chromium)",
        });
    }
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let home = std::env::temp_dir().join(format!("ng-browser-{}-{seq}", std::process::id()));
    fs::create_dir_all(&home).map_err(io_err(format!("create {}", home.display())))?;
    let mut cmd = Command::new("node");
    cmd.current_dir(&dir)
        .env("HOME", &home)
        .arg(dir.join("login.mjs"))
        .args(["--url", &login.url, "--login", &login.login])
        .arg("--user-data-dir")
        .arg(home.join("profile"))
        .args(["--timeout-ms", &login.timeout.as_millis().to_string()]);
    for (host, addr) in &login.map {
        cmd.args(["--map", &format!("{host}={addr}")]);
    }
    for url in &login.then {
        cmd.args(["--then", url]);
    }
    let out = place.run(cmd, login.timeout + Duration::from_secs(15));
    let _ = fs::remove_dir_all(&home);
    let out = out?;
    let line = out.stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| Error::Parse {
        what: out.command.clone(),
        detail: format!("{e}; stdout: {}; stderr: {}", out.stdout, out.stderr),
    })
}

fn read_json(path: &Path) -> Result<Value> {
    let text = fs::read_to_string(path).map_err(io_err(format!("read {}", path.display())))?;
    serde_json::from_str(&text).map_err(|e| Error::Parse {
        what: path.display().to_string(),
        detail: e.to_string(),
    })
}

fn json_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Waits until `proc` prints a JSON line that satisfies `pred`; fails early if it exits.
fn wait_json_line(proc: &Proc, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = json_lines(&proc.stdout()).into_iter().find(|v| pred(v)) {
            return Ok(v);
        }
        if let Some(status) = proc.try_wait() {
            return Err(Error::Command {
                command: proc.label().to_owned(),
                status: status.to_string(),
                stderr: format!(
                    "exited before printing its JSON line; stderr: {}",
                    proc.stderr()
                ),
            });
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout {
                what: format!(
                    "{} to print its JSON line (stderr: {})",
                    proc.label(),
                    proc.stderr()
                ),
                seconds: timeout.as_secs_f64(),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// The header and claims of a compact JWS, decoded without any verification (to look at what
/// the provider issued).
pub fn decode_unverified(token: &str) -> Result<(Value, Value)> {
    let bad = |detail: String| Error::Parse {
        what: "JWT".into(),
        detail,
    };
    let mut parts = token.split('.');
    let (Some(header), Some(claims)) = (parts.next(), parts.next()) else {
        return Err(bad(format!("not a compact JWS: {token}")));
    };
    let json = |part: &str| -> Result<Value> {
        let bytes = base64url_decode(part).ok_or_else(|| bad(format!("bad base64url: {part}")))?;
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("{e}: {part}")))
    };
    Ok((json(header)?, json(claims)?))
}

/// Unpadded base64url (RFC 4648 §5), as in JWS.
fn base64url_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'-' => 62,
            b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push(u8::try_from((acc >> bits) & 0xff).ok()?);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_jws_without_verifying() {
        // {"alg":"none"} . {"sub":"x","n":1}
        let (h, c) =
            decode_unverified("eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4IiwibiI6MX0.").expect("decodes");
        assert_eq!(h, json!({"alg": "none"}));
        assert_eq!(c, json!({"sub": "x", "n": 1}));
        assert!(decode_unverified("a+b.c").is_err());
        assert_eq!(base64url_decode("_-8").as_deref(), Some(&[0xff, 0xef][..]));
    }
}
