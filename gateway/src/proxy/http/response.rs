//! Responses the gateway writes itself: the deny page (HTML for browsers, JSON otherwise), with
//! the request id and the reason code, every value escaped.

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full, combinators::BoxBody};
use hyper::{Response, StatusCode, header};

/// The body type of every response the proxy returns (upstream bodies or the gateway's own).
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Whether an `Accept` value asks for HTML (a browser navigating), `text/html` in any case.
pub fn accepts_html(accept: &[u8]) -> bool {
    accept
        .split(|&b| b == b',')
        .filter_map(|item| item.split(|&b| b == b';').next())
        .any(|media| media.trim_ascii().eq_ignore_ascii_case(b"text/html"))
}

pub fn boxed_incoming(body: hyper::body::Incoming) -> ProxyBody {
    body.boxed()
}

pub fn full(body: impl Into<Bytes>) -> ProxyBody {
    Full::new(body.into())
        .map_err(|never| match never {})
        .boxed()
}

/// What a refusal says.
#[derive(Debug, Clone, Copy)]
pub struct Refusal<'a> {
    pub status: StatusCode,
    pub reason: &'a str,
    pub request_id: &'a str,
    pub html: bool,
}

/// The deny page. Also used for 400/401/421/502: the same two facts (request id, reason) are
/// what an operator needs to find the decision line.
pub fn refusal(r: Refusal<'_>) -> Response<ProxyBody> {
    let title = match r.status {
        StatusCode::UNAUTHORIZED => "Authentication required",
        StatusCode::FORBIDDEN => "Access denied",
        StatusCode::BAD_REQUEST => "Bad request",
        s if s.is_server_error() => "Service unavailable",
        _ => "Request refused",
    };
    let (content_type, body) = if r.html {
        let body = format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{title}</title></head>\n\
             <body><h1>{title}</h1>\n<p>The gateway refused this request ({status}).</p>\n\
             <p>Reason: <code>{reason}</code><br>Request id: <code>{id}</code></p>\n\
             <p>Quote the request id when asking for access.</p></body></html>\n",
            title = html_escape(title),
            status = r.status.as_u16(),
            reason = html_escape(r.reason),
            id = html_escape(r.request_id),
        );
        ("text/html; charset=utf-8", body)
    } else {
        let body = serde_json::json!({
            "error": title,
            "status": r.status.as_u16(),
            "reason": r.reason,
            "request_id": r.request_id,
        })
        .to_string()
            + "\n";
        ("application/json", body)
    };
    let mut resp = Response::new(full(body));
    *resp.status_mut() = r.status;
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    if let Ok(id) = header::HeaderValue::from_str(r.request_id) {
        headers.insert(super::headers::X_REQUEST_ID, id);
    }
    if r.status == StatusCode::UNAUTHORIZED {
        headers.insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"nodegate\""),
        );
    }
    resp
}

/// The 400 written on a connection before closing it, outside hyper: a refused framing (hyper
/// no longer owns the connection), plain HTTP to a TLS service (hyper never did). `error` is
/// the human-readable summary (`Bad request`).
pub fn raw_refusal(error: &str, reason: &str, request_id: &str, html: bool) -> Vec<u8> {
    let content_type = if html {
        "text/html; charset=utf-8"
    } else {
        "application/json"
    };
    let body = page_text(error, reason, request_id, html);
    format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: {content_type}\r\ncache-control: no-store\r\n\
         x-request-id: {request_id}\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn page_text(error: &str, reason: &str, request_id: &str, html: bool) -> String {
    if html {
        format!(
            "<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>Bad request</title></head>\n\
             <body><h1>{}</h1>\n<p>The gateway refused this request (400).</p>\n\
             <p>Reason: <code>{}</code><br>Request id: <code>{}</code></p></body></html>\n",
            html_escape(error),
            html_escape(reason),
            html_escape(request_id)
        )
    } else {
        serde_json::json!({
            "error": error,
            "status": 400,
            "reason": reason,
            "request_id": request_id,
        })
        .to_string()
            + "\n"
    }
}

pub use crate::auth::login::html_escape;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accept_html_detection() {
        for (accept, want) in [
            (&b"text/html,application/xhtml+xml,*/*;q=0.8"[..], true),
            (b"TEXT/HTML", true),
            (b"application/json", false),
            (b"*/*", false),
            (b"text/htmlx", false),
            (b" text/html ;q=0.9", true),
        ] {
            assert_eq!(
                accepts_html(accept),
                want,
                "{}",
                String::from_utf8_lossy(accept)
            );
        }
    }

    #[test]
    fn pages_escape_everything() {
        let html = page_text("Bad request", "<script>\"x\"&'", "id<1>", true);
        assert!(
            !html.contains("<script>") && html.contains("&lt;script&gt;&quot;x&quot;&amp;&#39;")
        );
        assert!(html.contains("id&lt;1&gt;"));
        let json: serde_json::Value =
            serde_json::from_str(&page_text("Bad request", "a\"b", "c", false)).unwrap();
        assert_eq!(json["reason"], "a\"b");
        let raw = String::from_utf8(raw_refusal("Bad request", "framing_bare_lf", "ab12", false))
            .unwrap();
        assert!(
            raw.starts_with("HTTP/1.1 400 Bad Request\r\n") && raw.contains("connection: close")
        );
        let (_, body) = raw.split_once("\r\n\r\n").unwrap();
        assert!(raw.contains(&format!("content-length: {}\r\n", body.len())));
    }
}
