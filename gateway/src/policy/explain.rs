//! Explain: every rule's verdict for one request, for `gateway explain` and for operators asking
//! "why was I denied".
//!
//! Explain deliberately does not use the index: it walks every rule in document order with the
//! same `Node::matches` the evaluator uses, so it doubles as the reference implementation the
//! indexed evaluator is tested against.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::matcher::{CompiledPolicy, Decision, Node, Prepared, RuleSet, StrSet};
use super::model::{ClaimOp, ClaimScalar, IdentityKind, RequestContext, RuleKind};
use super::spiffe::SpiffePattern;

/// The decision and how each rule contributed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Explanation {
    pub decision: Decision,
    /// Deny rules then allow rules, each in document order.
    pub rules: Vec<RuleTrace>,
}

/// One rule's verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleTrace {
    pub kind: RuleKind,
    pub id: String,
    pub matched: bool,
    /// Human-readable reason, e.g. ``and[1] failed: method `POST` is not one of [GET, HEAD]``.
    pub why: String,
}

/// Longest list shown in a reason before eliding.
const SHOW_MAX: usize = 6;

impl CompiledPolicy {
    /// Evaluates every rule and reports each verdict. The decision equals
    /// [`CompiledPolicy::evaluate`]'s for the same context.
    #[must_use]
    pub fn explain(&self, ctx: &RequestContext<'_>) -> Explanation {
        let req = Prepared::new(ctx);
        let mut rules = Vec::with_capacity(self.deny.rules.len() + self.allow.rules.len());
        let deny = trace_set(&self.deny, RuleKind::Deny, ctx, &req, &mut rules);
        let allow = trace_set(&self.allow, RuleKind::Allow, ctx, &req, &mut rules);
        Explanation {
            decision: Decision::from_matches(deny.as_ref(), allow.as_ref()),
            rules,
        }
    }
}

/// Appends the traces of one rule set; returns the id of its first matching rule.
fn trace_set(
    set: &RuleSet,
    kind: RuleKind,
    ctx: &RequestContext<'_>,
    req: &Prepared<'_>,
    out: &mut Vec<RuleTrace>,
) -> Option<Arc<str>> {
    let mut first = None;
    for rule in &set.rules {
        let matched = rule.node.matches(ctx, req);
        if matched && first.is_none() {
            first = Some(rule.id.clone());
        }
        out.push(RuleTrace {
            kind,
            id: rule.id.to_string(),
            matched,
            why: why(&rule.node, ctx, req),
        });
    }
    first
}

fn why(node: &Node, ctx: &RequestContext<'_>, req: &Prepared<'_>) -> String {
    match node {
        Node::And(list) => match list.iter().enumerate().find(|(_, n)| !n.matches(ctx, req)) {
            Some((i, n)) => format!("and[{i}] failed: {}", why(n, ctx, req)),
            None => join(list.iter().map(|n| why(n, ctx, req)), "all of: "),
        },
        Node::Or(list) => match list.iter().enumerate().find(|(_, n)| n.matches(ctx, req)) {
            Some((i, n)) => format!("or[{i}] matched: {}", why(n, ctx, req)),
            None => join(list.iter().map(|n| why(n, ctx, req)), "none of: "),
        },
        Node::Not(inner) => {
            let verb = if inner.matches(ctx, req) {
                "inner matched"
            } else {
                "inner did not match"
            };
            format!("not ({verb}: {})", why(inner, ctx, req))
        }
        leaf => leaf_why(leaf, leaf.matches(ctx, req), ctx, req),
    }
}

fn join(parts: impl Iterator<Item = String>, head: &str) -> String {
    let mut s = head.to_owned();
    for (i, p) in parts.enumerate() {
        if i > 0 {
            s.push_str("; ");
        }
        s.push_str(&p);
    }
    s
}

fn leaf_why(node: &Node, matched: bool, ctx: &RequestContext<'_>, req: &Prepared<'_>) -> String {
    identity_why(node, matched, ctx, req).unwrap_or_else(|| request_why(node, matched, ctx, req))
}

/// Reasons for identity criteria; `None` for any other node.
fn identity_why(
    node: &Node,
    matched: bool,
    ctx: &RequestContext<'_>,
    req: &Prepared<'_>,
) -> Option<String> {
    let is = if matched { "is" } else { "is not" };
    let id = ctx.identity;
    Some(match node {
        Node::User(set) => match req.user {
            Some(u) => format!("user `{u}` {is} one of {}", list(set)),
            None if id.kind == IdentityKind::User => "user: identity has no subject".to_owned(),
            None => format!("user: caller is not a user (identity kind {:?})", id.kind),
        },
        Node::Email(set) => match req.email() {
            Some(e) => format!("email `{e}` {is} one of {}", list(set)),
            None => "email: identity has no e-mail".to_owned(),
        },
        Node::EmailDomain(set) => match req.email_domain() {
            Some(d) => format!("email domain `{d}` {is} one of {}", list(set)),
            None => "email_domain: identity has no e-mail with a single `@`".to_owned(),
        },
        Node::Groups(set) => {
            let verb = if matched { "include" } else { "include none" };
            format!(
                "groups {} {verb} of {}",
                list_iter(id.groups.iter()),
                list(set)
            )
        }
        Node::Claim { name, op } => {
            let want = match op {
                ClaimOp::Equals(ClaimScalar::String(s)) => format!("equals {s:?}"),
                ClaimOp::Equals(ClaimScalar::Number(n)) => format!("equals {n}"),
                ClaimOp::Equals(ClaimScalar::Bool(b)) => format!("equals {b}"),
                ClaimOp::Contains(s) => format!("contains {s:?}"),
            };
            match id.claims.get(&**name) {
                Some(v) => format!(
                    "claim `{name}` = {} {} {want}",
                    short_json(v),
                    verdict(matched)
                ),
                None => format!("claim `{name}` is absent (wanted {want})"),
            }
        }
        Node::Issuer(set) => match id.issuer {
            Some(i) => format!("issuer `{i}` {is} one of {}", list(set)),
            None => "issuer: identity has no issuer".to_owned(),
        },
        Node::SpiffeId(patterns) => {
            let want = list_iter(patterns.iter().map(SpiffePattern::as_written));
            match ctx.spiffe_id {
                Some(s) => format!("SPIFFE ID `{s}` {} {want}", verdict(matched)),
                None => format!("no client certificate with a SPIFFE ID (wanted {want})"),
            }
        }
        Node::Workload {
            namespace,
            service_account,
            labels,
        } => {
            let mut want = Vec::new();
            if let Some(ns) = namespace {
                want.push(format!("namespace={ns}"));
            }
            if let Some(sa) = service_account {
                want.push(format!("service_account={sa}"));
            }
            want.extend(labels.iter().map(|(k, v)| format!("{k}={v}")));
            let want = list_iter(want.iter());
            match ctx.workload {
                Some(w) => format!(
                    "workload {}/{} {} {want}",
                    w.namespace,
                    w.service_account,
                    verdict(matched)
                ),
                None => format!("no workload identity (wanted {want})"),
            }
        }
        _ => return None,
    })
}

/// Reasons for request criteria and time.
fn request_why(node: &Node, matched: bool, ctx: &RequestContext<'_>, req: &Prepared<'_>) -> String {
    let is = if matched { "is" } else { "is not" };
    match node {
        Node::Method(set) => format!("method `{}` {is} one of {}", ctx.method, list(set)),
        Node::Host { exact, suffixes } => {
            let all = exact
                .iter()
                .map(str::to_owned)
                .chain(suffixes.iter().map(|s| format!("*{s}")));
            let shown = list_iter(all);
            match req.host() {
                Some(h) => format!("host `{h}` {is} one of {shown}"),
                None => format!("no usable Host (wanted one of {shown})"),
            }
        }
        Node::PathExact(p) => format!("path `{}` {is} exactly `{p}`", ctx.path),
        Node::PathPrefix(p) => format!("path `{}` {is} under prefix `{p}`", ctx.path),
        Node::PathGlob { source, .. } => {
            format!("path `{}` {} glob `{source}`", ctx.path, verdict(matched))
        }
        Node::SourceCidr(nets) => {
            let shown = list_iter(nets.iter().map(ToString::to_string));
            match req.source_ip {
                Some(ip) => format!("source {ip} {is} in {shown}"),
                None => format!("no source address (wanted {shown})"),
            }
        }
        Node::Time(w) => {
            let local = ctx.now.saturating_add(i64::from(w.offset_seconds()));
            let weekday = usize::try_from((local.div_euclid(86_400) + 3).rem_euclid(7))
                .ok()
                .and_then(|d| DAY_NAMES.get(d))
                .unwrap_or(&"?");
            let minute = local.rem_euclid(86_400) / 60;
            format!(
                "local time {weekday} {:02}:{:02} (UTC{}) {is} within {} {}-{}",
                minute / 60,
                minute % 60,
                offset(w.offset_seconds()),
                days(w.days_mask()),
                hhmm(w.from_minute()),
                hhmm(w.to_minute()),
            )
        }
        // Identity leaves are handled by `identity_why`, combinators by `why`.
        _ => why(node, ctx, req),
    }
}

const DAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

fn verdict(matched: bool) -> &'static str {
    if matched { "matches" } else { "does not match" }
}

fn list(set: &StrSet) -> String {
    list_iter(set.iter())
}

/// `[a, b, c, …]`, at most [`SHOW_MAX`] entries.
fn list_iter<S: AsRef<str>>(items: impl Iterator<Item = S>) -> String {
    let mut s = String::from("[");
    for (i, item) in items.enumerate() {
        if i == SHOW_MAX {
            s.push_str(", …");
            break;
        }
        if i > 0 {
            s.push_str(", ");
        }
        s.push_str(item.as_ref());
    }
    s.push(']');
    s
}

fn short_json(v: &serde_json::Value) -> String {
    let mut s = v.to_string();
    if s.len() > 80 {
        let cut = (0..=77).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0);
        s.truncate(cut);
        s.push('…');
    }
    s
}

fn hhmm(minute: u16) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

fn offset(seconds: i32) -> String {
    let sign = if seconds < 0 { '-' } else { '+' };
    let m = seconds.unsigned_abs() / 60;
    format!("{sign}{:02}:{:02}", m / 60, m % 60)
}

fn days(mask: u8) -> String {
    if mask == 0x7F {
        return "every day".to_owned();
    }
    let picked: Vec<&str> = DAY_NAMES
        .iter()
        .enumerate()
        .filter(|(i, _)| mask & (1 << i) != 0)
        .map(|(_, n)| *n)
        .collect();
    picked.join(",")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::policy::matcher::tests::{MONDAY_NOON, Req, compile};
    use crate::policy::matcher::{ReasonCode, Verdict};
    use crate::policy::model::tests::EXAMPLE;

    fn explain(policy: &CompiledPolicy, req: &Req) -> Explanation {
        req.with(|ctx| policy.explain(ctx))
    }

    fn trace<'a>(e: &'a Explanation, id: &str) -> &'a RuleTrace {
        e.rules
            .iter()
            .find(|r| r.id == id)
            .unwrap_or_else(|| panic!("no trace for {id}"))
    }

    #[test]
    fn every_rule_is_traced_in_order_with_reasons() {
        let p = compile(EXAMPLE);
        let mut req = Req::alice();
        req.method = "POST".into();
        let e = explain(&p, &req);
        assert_eq!(e.decision.verdict, Verdict::Deny);
        assert_eq!(e.decision.reason, ReasonCode::NoRuleMatched);
        let ids: Vec<(RuleKind, &str, bool)> = e
            .rules
            .iter()
            .map(|r| (r.kind, r.id.as_str(), r.matched))
            .collect();
        assert_eq!(
            ids,
            [
                (RuleKind::Deny, "block-contractors", false),
                (RuleKind::Allow, "admins", false),
                (RuleKind::Allow, "devs-read", false),
                (RuleKind::Allow, "ci-bot", false),
                (RuleKind::Allow, "office", false),
            ]
        );
        assert_eq!(
            trace(&e, "block-contractors").why,
            "groups [devs] include none of [contractors]"
        );
        assert_eq!(
            trace(&e, "admins").why,
            "and[0] failed: groups [devs] include none of [admins]"
        );
        assert_eq!(
            trace(&e, "devs-read").why,
            "and[1] failed: method `POST` is not one of [GET, HEAD]"
        );
        assert_eq!(
            trace(&e, "ci-bot").why,
            "no workload identity (wanted [namespace=ci, service_account=builder])"
        );
        assert_eq!(
            trace(&e, "office").why,
            "and[1] failed: source 192.0.2.10 is not in [10.0.0.0/8]"
        );
    }

    #[test]
    fn matched_rules_explain_what_matched() {
        let p = compile(EXAMPLE);
        let mut req = Req::alice();
        req.path = "/api".into();
        let e = explain(&p, &req);
        assert_eq!(e.decision.rule_id.as_deref(), Some("devs-read"));
        let t = trace(&e, "devs-read");
        assert!(t.matched);
        assert_eq!(
            t.why,
            "all of: or[0] matched: email domain `example.com` is one of [example.com]; method \
             `GET` is one of [GET, HEAD]; not (inner did not match: path `/api` does not match \
             glob `/admin/**`)"
        );
    }

    #[test]
    fn deny_wins_in_the_explanation_too() {
        let p = compile(EXAMPLE);
        let mut req = Req::alice();
        req.identity.groups = vec!["admins".into(), "contractors".into()];
        req.path = "/admin".into();
        let e = explain(&p, &req);
        assert_eq!(e.decision.verdict, Verdict::Deny);
        assert_eq!(e.decision.rule_id.as_deref(), Some("block-contractors"));
        // The allow rule still reports that it matched: explain shows every verdict.
        assert!(trace(&e, "admins").matched);
    }

    #[test]
    fn leaf_reasons() {
        type Edit = fn(&mut Req);
        let cases: &[(&str, Edit, &str)] = &[
            ("{user: bob}", |_| {}, "user `alice` is not one of [bob]"),
            (
                "{user: bob}",
                |r| r.identity.kind = IdentityKind::Workload,
                "user: caller is not a user (identity kind Workload)",
            ),
            (
                "{email: BOB@example.com}",
                |_| {},
                "email `alice@example.com` is not one of [bob@example.com]",
            ),
            (
                "{email_domain: example.com}",
                |r| r.identity.email = None,
                "email_domain: identity has no e-mail with a single `@`",
            ),
            (
                "{claim: {name: team, equals: platform}}",
                |r| {
                    r.identity.claims = serde_json::from_value(json!({"team": "infra"})).unwrap();
                },
                "claim `team` = \"infra\" does not match equals \"platform\"",
            ),
            (
                "{claim: {name: roles, contains: admin}}",
                |_| {},
                "claim `roles` is absent (wanted contains \"admin\")",
            ),
            (
                "{issuer: 'https://other'}",
                |_| {},
                "issuer `https://idp.example.com` is not one of [https://other]",
            ),
            (
                "{host: [a.example.com, '*.b.example.com']}",
                |r| r.host = Some("APP.example.com:443".into()),
                "host `app.example.com` is not one of [a.example.com, *.b.example.com]",
            ),
            (
                "{path: {prefix: /admin}}",
                |r| r.path = "/administrator".into(),
                "path `/administrator` is not under prefix `/admin`",
            ),
            (
                "{path: {exact: /a}}",
                |r| r.path = "/a".into(),
                "path `/a` is exactly `/a`",
            ),
            (
                "{time_window: {days: [mon..fri], from: '08:00', to: '18:00', tz: '+02:00'}}",
                |_| {},
                "local time mon 14:00 (UTC+02:00) is within mon,tue,wed,thu,fri 08:00-18:00",
            ),
            (
                "{time_window: {from: '20:00', tz: '-05:30'}}",
                |r| r.now = MONDAY_NOON,
                "local time mon 06:30 (UTC-05:30) is not within every day 20:00-24:00",
            ),
            (
                "{groups: [a, b, c, d, e, f, g, h]}",
                |_| {},
                "groups [devs] include none of [a, b, c, d, e, f, …]",
            ),
        ];
        for (when, edit, want) in cases {
            let p = compile(&format!(
                "policy:\n  allow:\n    - id: r\n      when: {when}\n"
            ));
            let mut req = Req::alice();
            edit(&mut req);
            let e = explain(&p, &req);
            assert_eq!(e.rules[0].why, *want, "{when}");
        }
    }

    #[test]
    fn explanation_serialises_for_the_cli() {
        let p = compile("policy:\n  allow:\n    - id: r\n      when: {method: POST}\n");
        let e = explain(&p, &Req::alice());
        assert_eq!(
            serde_json::to_value(&e).unwrap(),
            json!({
                "decision": {"verdict": "deny", "rule_id": null, "reason": "no_rule_matched"},
                "rules": [{
                    "kind": "allow",
                    "id": "r",
                    "matched": false,
                    "why": "method `GET` is not one of [POST]"
                }]
            })
        );
    }
}
