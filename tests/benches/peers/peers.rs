//! The other programs of the side-by-side pass: the nginx backend, nginx as a reverse proxy,
//! Envoy with `jwt_authn` + RBAC, and the TLS certificate they (and the direct TLS path) use.

use std::{
    fmt::Write as _,
    fs,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Command,
};

/// Ports of the backend (in the backend pod).
pub const BACKEND_PROTECTED: u16 = 8080; // the gateway service's endpoint (plain HTTP/1.1)
pub const BACKEND_H1: u16 = 9090; // direct, and upstream of nginx and Envoy
pub const BACKEND_H2C: u16 = 9091; // direct h2c (prior knowledge)
pub const BACKEND_TLS: u16 = 9443; // direct TLS, ALPN h2 and http/1.1

/// Ports of the proxies under test (node netns, node IP).
pub const NGINX_H1: u16 = 18080;
pub const NGINX_H2C: u16 = 18081;
pub const NGINX_TLS: u16 = 18443;
pub const ENVOY_PLAIN: u16 = 19080; // codec AUTO: HTTP/1.1 and h2c prior knowledge
pub const ENVOY_TLS: u16 = 19443;
pub const HYPER_FLOOR_H1: u16 = 17080;

/// A self-signed P-256 certificate for `bench.nodegate.test` (and the addresses given).
pub struct Cert {
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn make_cert(dir: &Path, ips: &[std::net::IpAddr]) -> Result<Cert, String> {
    let cert = dir.join("bench-cert.pem");
    let key = dir.join("bench-key.pem");
    let mut san = "subjectAltName=DNS:bench.nodegate.test".to_owned();
    for ip in ips {
        let _ = write!(san, ",IP:{ip}");
    }
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .args([
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=bench.nodegate.test",
            "-addext",
            &san,
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .map_err(|e| format!("openssl: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "openssl req failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(Cert { cert, key })
}

/// One nginx process (no master, one worker: `master_process off`), logs under `dir`.
fn nginx_main(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\nworker_rlimit_nofile 20000;\n\
         pid {d}/{name}.pid;\nerror_log {d}/{name}.error.log warn;\n\
         events {{ worker_connections 20000; }}\n"
    )
}

fn nginx_http_common(dir: &Path, name: &str) -> String {
    let d = dir.display();
    format!(
        "  access_log off;\n  keepalive_requests 100000000;\n  keepalive_timeout 300s;\n\
         \x20 client_body_temp_path {d}/{name}.body;\n  proxy_temp_path {d}/{name}.proxy;\n\
         \x20 fastcgi_temp_path {d}/{name}.fcgi;\n  uwsgi_temp_path {d}/{name}.uwsgi;\n\
         \x20 scgi_temp_path {d}/{name}.scgi;\n"
    )
}

/// The backend: `return 200` on every port, plain, h2c and TLS.
pub fn nginx_backend_conf(dir: &Path, ip: std::net::IpAddr, cert: &Cert) -> String {
    let mut c = nginx_main(dir, "backend");
    c.push_str("http {\n");
    c.push_str(&nginx_http_common(dir, "backend"));
    let _ = write!(
        c,
        "  server {{\n    listen {ip}:{BACKEND_PROTECTED};\n    listen {ip}:{BACKEND_H1};\n\
         \x20   listen {ip}:{BACKEND_H2C} http2;\n    listen {ip}:{BACKEND_TLS} ssl http2;\n\
         \x20   ssl_certificate {};\n    ssl_certificate_key {};\n\
         \x20   location / {{ default_type text/plain; return 200 \"ok\\n\"; }}\n  }}\n}}\n",
        cert.cert.display(),
        cert.key.display()
    );
    c
}

/// nginx as a plain reverse proxy: `proxy_pass` with upstream keep-alive, no auth.
pub fn nginx_proxy_conf(
    dir: &Path,
    ip: std::net::IpAddr,
    backend: SocketAddr,
    cert: &Cert,
) -> String {
    let mut c = nginx_main(dir, "proxy");
    c.push_str("http {\n");
    c.push_str(&nginx_http_common(dir, "proxy"));
    let _ = write!(
        c,
        "  upstream backend {{ server {backend}; keepalive 64; keepalive_requests 100000000; }}\n\
         \x20 server {{\n    listen {ip}:{NGINX_H1};\n    listen {ip}:{NGINX_H2C} http2;\n\
         \x20   listen {ip}:{NGINX_TLS} ssl http2;\n\
         \x20   ssl_certificate {};\n    ssl_certificate_key {};\n\
         \x20   location / {{ proxy_pass http://backend; proxy_http_version 1.1; \
         proxy_set_header Connection \"\"; }}\n  }}\n}}\n",
        cert.cert.display(),
        cert.key.display()
    );
    c
}

/// What the Envoy and gateway policies check: 99 rules for other groups, then the one that
/// matches the token's `groups` claim.
pub const RULES: usize = 100;
pub const GROUP: &str = "devs";

pub fn other_group(i: usize) -> String {
    format!("team-{i:03}")
}

/// Envoy: `jwt_authn` (local JWKS file, optionally `jwt_cache_config`) then RBAC with
/// [`RULES`] policies on the `groups` claim (`sourced_metadata` of `jwt_authn`'s payload), then
/// the router to the backend (HTTP/1.1 upstream). One listener with codec AUTO (HTTP/1.1 and
/// h2c), one with TLS (ALPN h2, http/1.1).
pub struct EnvoyJwt<'a> {
    pub listen_ip: std::net::IpAddr,
    pub backend: SocketAddr,
    pub issuer: &'a str,
    pub audience: &'a str,
    pub jwks_file: &'a Path,
    pub cached: bool,
    pub cert: &'a Cert,
}

impl EnvoyJwt<'_> {
    pub fn yaml(&self) -> String {
        // JSON is YAML: build it with serde_json and print it.
        let mut policies = serde_json::Map::new();
        for i in 0..RULES {
            let group = if i + 1 == RULES {
                GROUP.to_owned()
            } else {
                other_group(i)
            };
            policies.insert(
                format!("rule-{i:03}"),
                serde_json::json!({
                    "permissions": [{ "any": true }],
                    "principals": [{ "sourced_metadata": { "metadata_matcher": {
                        "filter": "envoy.filters.http.jwt_authn",
                        "path": [{ "key": "jwt_payload" }, { "key": "groups" }],
                        "value": { "list_match": { "one_of": { "string_match": { "exact": group } } } }
                    } } }]
                }),
            );
        }
        let mut provider = serde_json::json!({
            "issuer": self.issuer,
            "audiences": [self.audience],
            "local_jwks": { "filename": self.jwks_file },
            "payload_in_metadata": "jwt_payload",
            "forward": true,
        });
        if self.cached {
            provider["jwt_cache_config"] = serde_json::json!({ "jwt_cache_size": 1000 });
        }
        let hcm = |prefix: &str| {
            serde_json::json!({
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": prefix,
                    "codec_type": "AUTO",
                    "route_config": { "virtual_hosts": [{
                        "name": "all", "domains": ["*"],
                        "routes": [{ "match": { "prefix": "/" }, "route": { "cluster": "backend" } }]
                    }] },
                    "http_filters": [
                        { "name": "envoy.filters.http.jwt_authn", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
                            "providers": { "bench": provider },
                            "rules": [{ "match": { "prefix": "/" }, "requires": { "provider_name": "bench" } }]
                        } },
                        { "name": "envoy.filters.http.rbac", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                            "rules": { "action": "ALLOW", "policies": policies }
                        } },
                        { "name": "envoy.filters.http.router", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                        } }
                    ]
                }
            })
        };
        let addr = |port: u16| {
            serde_json::json!({ "socket_address": {
                "address": self.listen_ip.to_string(), "port_value": port } })
        };
        let tls = serde_json::json!({
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                "common_tls_context": {
                    "alpn_protocols": ["h2", "http/1.1"],
                    "tls_certificates": [{
                        "certificate_chain": { "filename": self.cert.cert },
                        "private_key": { "filename": self.cert.key }
                    }]
                }
            }
        });
        let config = serde_json::json!({
            "static_resources": {
                "listeners": [
                    { "name": "plain", "address": addr(ENVOY_PLAIN),
                      "filter_chains": [{ "filters": [hcm("plain")] }] },
                    { "name": "tls", "address": addr(ENVOY_TLS),
                      "filter_chains": [{ "filters": [hcm("tls")], "transport_socket": tls }] }
                ],
                "clusters": [{
                    "name": "backend",
                    "connect_timeout": "1s",
                    "type": "STATIC",
                    "load_assignment": { "cluster_name": "backend", "endpoints": [{ "lb_endpoints": [{
                        "endpoint": { "address": { "socket_address": {
                            "address": self.backend.ip().to_string(),
                            "port_value": self.backend.port() } } }
                    }] }] }
                }]
            }
        });
        serde_json::to_string_pretty(&config).unwrap_or_default()
    }
}

/// Writes `text` to `dir/name`, returning the path.
pub fn write(dir: &Path, name: &str, text: &str) -> Result<PathBuf, String> {
    let path = dir.join(name);
    fs::write(&path, text).map_err(|e| format!("write {}: {e}", path.display()))?;
    Ok(path)
}
