//! SPIFFE IDs (<https://github.com/spiffe/spiffe/blob/main/standards/SPIFFE-ID.md>): the
//! `spiffe://` URI SAN of a verified client certificate, and the `spiffe_id` policy criterion.
//!
//! One parser for both sides, so that a pattern in a policy and an ID from a certificate are
//! held to the same form: scheme `spiffe`, a trust domain of `[a-z0-9._-]`, then path segments
//! of `[A-Za-z0-9._-]` that are neither empty nor `.` / `..`; no port, user info, query,
//! fragment, percent-encoding or trailing `/`. Anything else is not a SPIFFE ID (a certificate
//! carrying one gets no `spiffe_id`; a policy naming one is refused at load).

/// The longest SPIFFE ID the specification allows.
pub const MAX_SPIFFE_ID_LEN: usize = 2048;

const SCHEME: &str = "spiffe://";

/// Why a string is not a SPIFFE ID.
pub fn check_id(id: &str) -> Result<(), &'static str> {
    if id.len() > MAX_SPIFFE_ID_LEN {
        return Err("longer than 2048 bytes");
    }
    let rest = id
        .strip_prefix(SCHEME)
        .ok_or("must start with spiffe:// (lower case)")?;
    let (domain, path) = rest
        .split_once('/')
        .map_or((rest, None), |(d, p)| (d, Some(p)));
    if domain.is_empty() {
        return Err("the trust domain is empty");
    }
    if !domain
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
    {
        return Err("the trust domain may only hold a-z, 0-9, '.', '-' and '_' (no port)");
    }
    let Some(path) = path else { return Ok(()) };
    for segment in path.split('/') {
        if segment.is_empty() {
            return Err("a path segment is empty (`//` or a trailing `/`)");
        }
        if segment == "." || segment == ".." {
            return Err("a path segment is `.` or `..`");
        }
        if !segment
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
        {
            return Err("a path segment may only hold A-Z, a-z, 0-9, '.', '-' and '_'");
        }
    }
    Ok(())
}

/// A `spiffe_id` criterion value: an exact ID, or `<id>/*` for every ID below it (segment-wise;
/// `spiffe://example.org/*` is the whole trust domain).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpiffePattern {
    Exact(String),
    /// The ID with a trailing `/`: a matching ID is longer and starts with it.
    Under(String),
}

impl SpiffePattern {
    pub fn parse(value: &str) -> Result<Self, &'static str> {
        if let Some(base) = value.strip_suffix("/*") {
            check_id(base)?;
            Ok(Self::Under(format!("{base}/")))
        } else {
            check_id(value)?;
            Ok(Self::Exact(value.to_owned()))
        }
    }

    /// Whether `id` (a checked SPIFFE ID) matches.
    pub fn matches(&self, id: &str) -> bool {
        match self {
            Self::Exact(want) => want == id,
            Self::Under(prefix) => id.len() > prefix.len() && id.starts_with(prefix.as_str()),
        }
    }

    /// As written in the policy.
    pub fn as_written(&self) -> String {
        match self {
            Self::Exact(id) => id.clone(),
            Self::Under(prefix) => format!("{prefix}*"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        for ok in [
            "spiffe://example.org",
            "spiffe://example.org/ns/ci/sa/builder",
            "spiffe://td-1.example_x/a.b/C-d_e",
        ] {
            assert_eq!(check_id(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "SPIFFE://example.org/a",
            "https://example.org/a",
            "spiffe://",
            "spiffe:///a",
            "spiffe://Example.org/a",
            "spiffe://example.org:8443/a",
            "spiffe://user@example.org/a",
            "spiffe://example.org/",
            "spiffe://example.org/a//b",
            "spiffe://example.org/a/../b",
            "spiffe://example.org/a/./b",
            "spiffe://example.org/a%2Fb",
            "spiffe://example.org/a?b",
            "spiffe://example.org/a#b",
        ] {
            assert!(check_id(bad).is_err(), "{bad}");
        }
        assert!(check_id(&format!("spiffe://t/{}", "a".repeat(2048))).is_err());
    }

    #[test]
    fn patterns() {
        let exact = SpiffePattern::parse("spiffe://example.org/ns/ci/sa/builder").unwrap();
        assert!(exact.matches("spiffe://example.org/ns/ci/sa/builder"));
        assert!(!exact.matches("spiffe://example.org/ns/ci/sa/builder2"));
        assert!(!exact.matches("spiffe://example.org/ns/ci/sa/builder/x"));
        let ns = SpiffePattern::parse("spiffe://example.org/ns/ci/*").unwrap();
        assert_eq!(ns.as_written(), "spiffe://example.org/ns/ci/*");
        assert!(ns.matches("spiffe://example.org/ns/ci/sa/builder"));
        assert!(!ns.matches("spiffe://example.org/ns/ci"));
        assert!(!ns.matches("spiffe://example.org/ns/cix/sa/a"));
        let domain = SpiffePattern::parse("spiffe://example.org/*").unwrap();
        assert!(domain.matches("spiffe://example.org/a"));
        assert!(!domain.matches("spiffe://example.org"));
        assert!(!domain.matches("spiffe://example.org.evil/a"));
        for bad in [
            "spiffe://example.org/a*",
            "spiffe://*",
            "spiffe://example.org/*/b",
        ] {
            assert!(SpiffePattern::parse(bad).is_err(), "{bad}");
        }
    }
}
