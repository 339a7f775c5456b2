//! The `login:` section of the gateway config: the wire format an operator writes, and the
//! validated settings the login flow runs on. Files named in the config (client secret, cookie
//! secret, CA bundle) are read here, once, when the config is loaded.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::uri::Authority;
use openidconnect::{ClientId, ClientSecret, IssuerUrl, Scope};
use serde::Deserialize;

use super::cookie::{self, CookieSecret};

/// The `login:` section as written in the config file.
///
/// ```yaml
/// login:
///   issuer: https://idp.example.com/realms/main
///   client_id: nodegate
///   client_secret_file: /etc/nodegate/oidc-client-secret   # or client_secret: "..."
///   scopes: [openid, email, profile]
///   hosts: [app.example.com, "grafana.example.com:8443"]
///   cookie_secret_file: /etc/nodegate/cookie-secret        # 32+ random bytes, same on every node
///   session_ttl_s: 3600
///   refresh_skew_s: 300
/// ```
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginConfig {
    /// The provider's issuer URL; `/.well-known/openid-configuration` is read below it.
    pub issuer: String,
    pub client_id: String,
    /// The client secret inline. Exactly one of `client_secret` and `client_secret_file`.
    #[serde(default)]
    pub client_secret: Option<String>,
    #[serde(default)]
    pub client_secret_file: Option<PathBuf>,
    /// Scopes to request; `openid` is always requested.
    #[serde(default = "default_scopes")]
    pub scopes: Vec<String>,
    /// The hosts (`name` or `name:port`) the login may run on. The redirect URI is built from
    /// the request's host, so each one must be registered at the provider as
    /// `http[s]://HOST/.nodegate/callback`; a request for any other host is refused, so that a
    /// forged `Host` header cannot send the authorization code elsewhere.
    pub hosts: Vec<String>,
    #[serde(default = "default_redirect_path")]
    pub redirect_path: String,
    #[serde(default = "default_logout_path")]
    pub logout_path: String,
    /// Where a browser can start a login explicitly (`?rd=/path` to come back to).
    #[serde(default = "default_login_path")]
    pub login_path: String,
    #[serde(default = "default_cookie_name")]
    pub cookie_name: String,
    /// A file with 32 or more random bytes. Without it a random secret is generated at start,
    /// and sessions neither survive a restart nor work on another node.
    #[serde(default)]
    pub cookie_secret_file: Option<PathBuf>,
    /// How long a login (or a refresh) is trusted before the session must be refreshed.
    #[serde(default = "default_session_ttl_s")]
    pub session_ttl_s: u64,
    /// How long before the session's expiry a request triggers a refresh.
    #[serde(default = "default_refresh_skew_s")]
    pub refresh_skew_s: u64,
    /// The ID token claim holding the user's groups.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// PEM bundle to trust for the provider's TLS instead of the public roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Allow an `http://` issuer (tests, or a provider reached over a trusted in-cluster link).
    #[serde(default)]
    pub allow_http_issuer: bool,
    /// Deadline for one exchange with the provider.
    #[serde(default = "default_http_timeout_ms")]
    pub http_timeout_ms: u64,
}

impl fmt::Debug for LoginConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoginConfig")
            .field("issuer", &self.issuer)
            .field("client_id", &self.client_id)
            .field(
                "client_secret",
                &self.client_secret.as_ref().map(|_| "[redacted]"),
            )
            .field("client_secret_file", &self.client_secret_file)
            .field("scopes", &self.scopes)
            .field("hosts", &self.hosts)
            .field("redirect_path", &self.redirect_path)
            .field("logout_path", &self.logout_path)
            .field("login_path", &self.login_path)
            .field("cookie_name", &self.cookie_name)
            .field("cookie_secret_file", &self.cookie_secret_file)
            .field("session_ttl_s", &self.session_ttl_s)
            .field("refresh_skew_s", &self.refresh_skew_s)
            .field("groups_claim", &self.groups_claim)
            .field("ca_file", &self.ca_file)
            .field("allow_http_issuer", &self.allow_http_issuer)
            .field("http_timeout_ms", &self.http_timeout_ms)
            .finish()
    }
}

fn default_scopes() -> Vec<String> {
    ["openid", "email", "profile"].map(String::from).to_vec()
}
fn default_redirect_path() -> String {
    "/.nodegate/callback".into()
}
fn default_logout_path() -> String {
    "/.nodegate/logout".into()
}
fn default_login_path() -> String {
    "/.nodegate/login".into()
}
fn default_cookie_name() -> String {
    "_nodegate".into()
}
fn default_session_ttl_s() -> u64 {
    3600
}
fn default_refresh_skew_s() -> u64 {
    300
}
fn default_groups_claim() -> String {
    "groups".into()
}
fn default_http_timeout_ms() -> u64 {
    5000
}

/// A config value that cannot be used; the message names the field and what to change.
#[derive(Debug, thiserror::Error)]
pub enum LoginConfigError {
    #[error("login.{field}: {message}")]
    Invalid {
        field: &'static str,
        message: String,
    },
    #[error("login.{field}: cannot read {path}: {source}")]
    File {
        field: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
}

fn invalid(field: &'static str, message: impl Into<String>) -> LoginConfigError {
    LoginConfigError::Invalid {
        field,
        message: message.into(),
    }
}

/// Validated login settings.
#[derive(Debug)]
pub struct LoginSettings {
    pub(crate) issuer: IssuerUrl,
    pub(crate) client_id: ClientId,
    pub(crate) client_secret: ClientSecret,
    /// Scopes besides `openid`, which openidconnect always adds.
    pub(crate) scopes: Vec<Scope>,
    pub(crate) hosts: HostAllowList,
    pub(crate) redirect_path: String,
    pub(crate) logout_path: String,
    pub(crate) login_path: String,
    pub(crate) cookie_name: String,
    pub(crate) cookie_secret: CookieSecret,
    /// True when no secret file was configured and the secret was generated at start.
    pub(crate) cookie_secret_generated: bool,
    pub(crate) session_ttl: Duration,
    pub(crate) refresh_skew: Duration,
    pub(crate) groups_claim: String,
    pub(crate) ca_pem: Option<Vec<u8>>,
    pub(crate) allow_http: bool,
    pub(crate) http_timeout: Duration,
}

impl LoginSettings {
    /// Validates `config` and reads the files it names. Relative paths are taken relative to
    /// `base_dir` (the directory of the config file).
    ///
    /// # Errors
    ///
    /// A [`LoginConfigError`] naming the first field that is wrong or whose file cannot be read.
    pub fn from_config(config: LoginConfig, base_dir: &Path) -> Result<Self, LoginConfigError> {
        let issuer = parse_issuer(&config.issuer, config.allow_http_issuer)?;
        if config.client_id.is_empty() {
            return Err(invalid("client_id", "must not be empty"));
        }

        let client_secret = load_client_secret(
            config.client_secret,
            config.client_secret_file.as_deref(),
            base_dir,
        )?;

        let scopes = parse_scopes(config.scopes)?;

        if config.hosts.is_empty() {
            return Err(invalid(
                "hosts",
                "list the hosts that use browser login (their redirect URIs are registered at the provider)",
            ));
        }
        let hosts = HostAllowList::new(&config.hosts)?;

        let redirect_path = reserved_path("redirect_path", config.redirect_path)?;
        let logout_path = reserved_path("logout_path", config.logout_path)?;
        let login_path = reserved_path("login_path", config.login_path)?;
        if redirect_path == logout_path || redirect_path == login_path || logout_path == login_path
        {
            return Err(invalid(
                "redirect_path",
                "redirect, login and logout paths must differ",
            ));
        }

        if !cookie::is_valid_cookie_name(&config.cookie_name) {
            return Err(invalid(
                "cookie_name",
                format!("{:?} is not a valid cookie name", config.cookie_name),
            ));
        }

        let (cookie_secret, cookie_secret_generated) =
            load_cookie_secret(config.cookie_secret_file.as_deref(), base_dir)?;

        if config.session_ttl_s < 60 {
            return Err(invalid("session_ttl_s", "must be at least 60 seconds"));
        }
        if config.refresh_skew_s >= config.session_ttl_s {
            return Err(invalid(
                "refresh_skew_s",
                "must be shorter than session_ttl_s",
            ));
        }
        if config.groups_claim.is_empty() {
            return Err(invalid("groups_claim", "must not be empty"));
        }
        let ca_pem = config
            .ca_file
            .as_ref()
            .map(|p| read_file("ca_file", &base_dir.join(p)))
            .transpose()?;
        if !(100..=60_000).contains(&config.http_timeout_ms) {
            return Err(invalid("http_timeout_ms", "must be between 100 and 60000"));
        }

        Ok(Self {
            issuer,
            client_id: ClientId::new(config.client_id),
            client_secret: ClientSecret::new(client_secret),
            scopes,
            hosts,
            redirect_path,
            logout_path,
            login_path,
            cookie_name: config.cookie_name,
            cookie_secret,
            cookie_secret_generated,
            session_ttl: Duration::from_secs(config.session_ttl_s),
            refresh_skew: Duration::from_secs(config.refresh_skew_s),
            groups_claim: config.groups_claim,
            ca_pem,
            allow_http: config.allow_http_issuer,
            http_timeout: Duration::from_millis(config.http_timeout_ms),
        })
    }

    #[must_use]
    pub fn issuer(&self) -> &str {
        self.issuer.as_str()
    }

    #[must_use]
    pub fn cookie_name(&self) -> &str {
        &self.cookie_name
    }
}

fn parse_issuer(issuer: &str, allow_http: bool) -> Result<IssuerUrl, LoginConfigError> {
    let url = IssuerUrl::new(issuer.to_owned())
        .map_err(|e| invalid("issuer", format!("{issuer:?} is not a URL: {e}")))?;
    match url.url().scheme() {
        "https" => {}
        "http" if allow_http => {}
        "http" => {
            return Err(invalid(
                "issuer",
                "plain http sends tokens in clear; use https, or set \
                 allow_http_issuer: true for a test provider",
            ));
        }
        other => return Err(invalid("issuer", format!("unsupported scheme {other:?}"))),
    }
    if url.url().query().is_some() || url.url().fragment().is_some() {
        return Err(invalid("issuer", "must not have a query or fragment"));
    }
    Ok(url)
}

fn load_client_secret(
    inline: Option<String>,
    file: Option<&Path>,
    base_dir: &Path,
) -> Result<String, LoginConfigError> {
    let secret = match (inline, file) {
        (Some(secret), None) => secret,
        (None, Some(path)) => {
            let bytes = read_file("client_secret_file", &base_dir.join(path))?;
            String::from_utf8(bytes)
                .map_err(|_| invalid("client_secret_file", "is not UTF-8 text"))?
                .trim_end()
                .to_owned()
        }
        _ => {
            return Err(invalid(
                "client_secret",
                "set exactly one of client_secret and client_secret_file",
            ));
        }
    };
    if secret.is_empty() {
        return Err(invalid("client_secret", "is empty"));
    }
    Ok(secret)
}

fn parse_scopes(configured: Vec<String>) -> Result<Vec<Scope>, LoginConfigError> {
    let mut scopes: Vec<Scope> = Vec::new();
    for scope in configured {
        let valid = !scope.is_empty()
            && scope
                .bytes()
                .all(|b| b.is_ascii_graphic() && b != b'"' && b != b'\\');
        if !valid {
            return Err(invalid("scopes", format!("{scope:?} is not a valid scope")));
        }
        // openidconnect adds `openid` itself; listing it again would send it twice.
        if scope != "openid" && !scopes.iter().any(|s| **s == scope) {
            scopes.push(Scope::new(scope));
        }
    }
    Ok(scopes)
}

/// The cookie secret from its file, or a generated one (and `true`) when none is configured.
fn load_cookie_secret(
    file: Option<&Path>,
    base_dir: &Path,
) -> Result<(CookieSecret, bool), LoginConfigError> {
    let Some(path) = file else {
        let secret =
            CookieSecret::generate().map_err(|e| invalid("cookie_secret_file", e.to_string()))?;
        return Ok((secret, true));
    };
    let mut bytes = read_file("cookie_secret_file", &base_dir.join(path))?;
    // A secret written with `echo` or a text editor ends in a newline; strip it so that every
    // node derives the same keys whatever tool wrote the file.
    if std::str::from_utf8(&bytes).is_ok() {
        let len = bytes.trim_ascii_end().len();
        bytes.truncate(len);
    }
    let secret =
        CookieSecret::new(bytes).map_err(|e| invalid("cookie_secret_file", e.to_string()))?;
    Ok((secret, false))
}

fn read_file(field: &'static str, path: &Path) -> Result<Vec<u8>, LoginConfigError> {
    std::fs::read(path).map_err(|source| LoginConfigError::File {
        field,
        path: path.to_owned(),
        source,
    })
}

fn reserved_path(field: &'static str, path: String) -> Result<String, LoginConfigError> {
    let ok = path.starts_with('/')
        && !path.starts_with("//")
        && path.len() > 1
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-~".contains(&b))
        && !path.split('/').any(|seg| seg == "." || seg == "..");
    if ok {
        Ok(path)
    } else {
        Err(invalid(
            field,
            format!("{path:?} must be an absolute path of letters, digits and / . _ - ~"),
        ))
    }
}

/// The hosts that browser login may run on, compared case-insensitively and with the
/// scheme's default port made explicit.
#[derive(Clone, Debug)]
pub struct HostAllowList {
    entries: Vec<(String, Option<u16>)>,
}

/// A request's host as the login flow uses it: lower case, without a default port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHost {
    host: String,
    port: Option<u16>,
}

impl RequestHost {
    /// `host` or `host:port`, ready to put in a URL.
    #[must_use]
    pub fn authority(&self) -> String {
        match self.port {
            Some(port) => format!("{}:{port}", self.host),
            None => self.host.clone(),
        }
    }
}

impl HostAllowList {
    /// # Errors
    ///
    /// When an entry is not `host` or `host:port`.
    pub fn new(hosts: &[String]) -> Result<Self, LoginConfigError> {
        let mut entries = Vec::new();
        for host in hosts {
            let authority = parse_authority(host)
                .ok_or_else(|| invalid("hosts", format!("{host:?} is not a host or host:port")))?;
            entries.push(authority);
        }
        Ok(Self { entries })
    }

    /// The request's host if it is allowed. `authority` comes from the `Host` header (HTTP/1.1)
    /// or `:authority` (HTTP/2); `tls` selects the default port.
    #[must_use]
    pub fn check(&self, authority: &str, tls: bool) -> Option<RequestHost> {
        let default_port = if tls { 443 } else { 80 };
        let (host, port) = parse_authority(authority)?;
        let port = port.filter(|p| *p != default_port);
        self.entries
            .iter()
            .any(|(h, p)| *h == host && p.filter(|p| *p != default_port) == port)
            .then_some(RequestHost { host, port })
    }
}

/// `host[:port]`, lower-cased; no user info, path, empty host or empty port.
fn parse_authority(s: &str) -> Option<(String, Option<u16>)> {
    if s.is_empty() || s.contains('@') || s.ends_with(':') {
        return None;
    }
    let authority: Authority = s.parse().ok()?;
    let host = authority.host();
    if host.is_empty() {
        return None;
    }
    // `Authority` keeps a port it cannot parse (`host:x`) without reporting it; read the port
    // from what follows the host instead, digits only.
    let port = match s.get(host.len()..) {
        Some("") => None,
        Some(rest) => {
            let digits = rest.strip_prefix(':')?;
            if !digits.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            Some(digits.parse::<u16>().ok()?)
        }
        None => return None,
    };
    Some((host.to_ascii_lowercase(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(yaml: &str) -> Result<LoginConfig, serde_yaml::Error> {
        serde_yaml::from_str(yaml)
    }

    const MINIMAL: &str = "
issuer: https://idp.example.com
client_id: ng
client_secret: s3cret
hosts: [app.example.com]
";

    #[test]
    fn minimal_config_gets_the_defaults() {
        let settings =
            LoginSettings::from_config(config(MINIMAL).unwrap(), Path::new("/")).unwrap();
        assert_eq!(settings.issuer(), "https://idp.example.com");
        assert_eq!(settings.redirect_path, "/.nodegate/callback");
        assert_eq!(settings.logout_path, "/.nodegate/logout");
        assert_eq!(settings.cookie_name, "_nodegate");
        assert_eq!(
            settings
                .scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>(),
            ["email", "profile"]
        );
        assert!(settings.cookie_secret_generated);
        assert_eq!(settings.session_ttl, Duration::from_secs(3600));
        assert!(!format!("{settings:?}").contains("s3cret"));
        assert!(!format!("{:?}", config(MINIMAL).unwrap()).contains("s3cret"));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = config(&format!("{MINIMAL}cookie_secert_file: /x\n")).unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let cases: &[(&str, &str)] = &[
            ("issuer: http://idp.example.com", "login.issuer: plain http"),
            ("issuer: not a url", "login.issuer"),
            ("client_secret_file: /nonexistent", "login.client_secret"),
            ("hosts: []", "login.hosts"),
            ("hosts: ['a@b']", "login.hosts"),
            ("redirect_path: cb", "login.redirect_path"),
            ("redirect_path: /.nodegate/../x", "login.redirect_path"),
            ("logout_path: /.nodegate/callback", "login.redirect_path"),
            ("cookie_name: 'a b'", "login.cookie_name"),
            ("session_ttl_s: 10", "login.session_ttl_s"),
            ("refresh_skew_s: 4000", "login.refresh_skew_s"),
            ("scopes: ['a b']", "login.scopes"),
            (
                "cookie_secret_file: /nonexistent",
                "login.cookie_secret_file: cannot read",
            ),
        ];
        for (line, expected) in cases {
            let key = line.split(':').next().unwrap();
            let yaml: String = MINIMAL
                .lines()
                .filter(|l| !l.starts_with(&format!("{key}:")))
                .chain(std::iter::once(*line))
                .collect::<Vec<_>>()
                .join("\n");
            let err =
                LoginSettings::from_config(config(&yaml).unwrap(), Path::new("/")).unwrap_err();
            assert!(err.to_string().starts_with(expected), "{line}: {err}");
        }
    }

    #[test]
    fn secret_files() {
        let dir = std::env::temp_dir().join(format!("ng-oidc-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("client"), "from-file\n").unwrap();
        std::fs::write(dir.join("short"), "0123456789\n").unwrap();
        std::fs::write(dir.join("cookie"), format!("{}\n", "k".repeat(32))).unwrap();
        let yaml = |extra: &str| {
            format!(
                "issuer: https://idp.example.com\nclient_id: ng\nhosts: [a]\nclient_secret_file: client\n{extra}"
            )
        };
        let settings =
            LoginSettings::from_config(config(&yaml("cookie_secret_file: cookie")).unwrap(), &dir)
                .unwrap();
        assert_eq!(settings.client_secret.secret(), "from-file");
        assert!(!settings.cookie_secret_generated);
        let err =
            LoginSettings::from_config(config(&yaml("cookie_secret_file: short")).unwrap(), &dir)
                .unwrap_err();
        assert!(
            err.to_string().contains("at least 32 random bytes"),
            "{err}"
        );
        let err = LoginSettings::from_config(config(&yaml("client_secret: both")).unwrap(), &dir)
            .unwrap_err();
        assert!(err.to_string().contains("exactly one"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn host_allow_list() {
        let list = HostAllowList::new(&[
            "App.Example.com".into(),
            "alt.example.com:8443".into(),
            "[::1]:8080".into(),
            "tls.example.com:443".into(),
        ])
        .unwrap();
        let ok = |a: &str, tls: bool| list.check(a, tls).map(|h| h.authority());
        assert_eq!(
            ok("app.example.com", false).as_deref(),
            Some("app.example.com")
        );
        assert_eq!(
            ok("APP.example.COM:80", false).as_deref(),
            Some("app.example.com")
        );
        assert_eq!(
            ok("app.example.com:443", true).as_deref(),
            Some("app.example.com")
        );
        assert_eq!(ok("app.example.com:8080", false), None);
        assert_eq!(
            ok("alt.example.com:8443", true).as_deref(),
            Some("alt.example.com:8443")
        );
        assert_eq!(ok("alt.example.com", true), None);
        assert_eq!(
            ok("tls.example.com", true).as_deref(),
            Some("tls.example.com")
        );
        assert_eq!(ok("[::1]:8080", false).as_deref(), Some("[::1]:8080"));
        for bad in [
            "evil.example.com",
            "app.example.com.evil",
            "user@app.example.com",
            "",
            "app.example.com:",
            "app.example.com:x",
            "app.example.com/x",
        ] {
            assert_eq!(ok(bad, false), None, "{bad:?}");
        }
    }
}
