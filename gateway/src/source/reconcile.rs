//! Kubernetes objects → [`Snapshot`] and the status every `AccessPolicy` should have.
//!
//! Pure: the watchers' caches in, values out, no I/O and no clock (the time for status
//! transitions is an argument), so every rule below is covered by table tests without an API
//! server. The rules that decide access:
//!
//! - A Service is protected when it carries `nodegate.io/protected: "true"`, whatever its policy:
//!   a missing, invalid or ambiguous policy means deny-all, never "unprotected".
//! - Its policy is the one valid `AccessPolicy` of its namespace that targets it (by name or
//!   label selector). Two or more → deny-all (`Conflict`): which one was meant is not guessed.
//!   An invalid `AccessPolicy` whose target is still readable → deny-all on that target: falling
//!   back to the annotation could allow what the broken policy was written to forbid.
//! - Else the `nodegate.io/policy` annotation (the same document as YAML or JSON); invalid →
//!   deny-all. Else deny-all.
//! - Mode: the applied `AccessPolicy`'s `mode`, else `nodegate.io/mode`, else enforce. An
//!   unreadable mode is enforce (audit lets traffic through; only a clear `audit` may do that).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::core::DynamicObject;

use super::crd::{
    AccessPolicyRule, AccessPolicyStatus, CONDITION_ACCEPTED, SpecError, StatusCondition, Target,
    lenient_target, validate_policy_text,
};
use super::model::{
    DenyReason, LocalPod, Mode, ObjectKey, PolicyBinding, PolicySource, ProtectedService, Snapshot,
};
use super::pods::{CgroupDriver, local_pod};

pub const PROTECTED_LABEL: &str = "nodegate.io/protected";
pub const MODE_ANNOTATION: &str = "nodegate.io/mode";
pub const POLICY_ANNOTATION: &str = "nodegate.io/policy";
/// Set by the `EndpointSlice` controller on every slice it manages for a Service.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// The watchers' caches.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub services: &'a [Arc<Service>],
    pub slices: &'a [Arc<EndpointSlice>],
    pub pods: &'a [Arc<Pod>],
    /// The gateway pods of every node (already restricted to the gateway's namespace).
    pub peers: &'a [Arc<Pod>],
    pub policies: &'a [Arc<DynamicObject>],
    pub driver: Option<CgroupDriver>,
}

/// What the reconcile decided.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub snapshot: Snapshot,
    /// The verdict on every `AccessPolicy`, by `namespace/name`.
    pub verdicts: BTreeMap<ObjectKey, Verdict>,
}

/// The verdict on one `AccessPolicy`, turned into its status by [`Verdict::status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub generation: Option<i64>,
    pub accepted: bool,
    pub reason: &'static str,
    pub message: String,
    /// Protected Services it targets (deny-all ones included).
    pub services: Vec<String>,
}

impl Verdict {
    /// The status to write. `lastTransitionTime` moves only when `Accepted` changes, so a
    /// recomputed, unchanged verdict yields a status equal to `current`: nothing to write.
    pub fn status(&self, current: Option<&AccessPolicyStatus>, now: &str) -> AccessPolicyStatus {
        let status = if self.accepted { "True" } else { "False" };
        let previous = current
            .and_then(|s| s.conditions.iter().find(|c| c.type_ == CONDITION_ACCEPTED))
            .filter(|c| c.status == status);
        AccessPolicyStatus {
            observed_generation: self.generation,
            conditions: vec![StatusCondition {
                type_: CONDITION_ACCEPTED.to_owned(),
                status: status.to_owned(),
                reason: self.reason.to_owned(),
                message: self.message.clone(),
                last_transition_time: previous
                    .map_or_else(|| now.to_owned(), |c| c.last_transition_time.clone()),
                observed_generation: self.generation,
            }],
            services: self.services.clone(),
        }
    }
}

struct ParsedPolicy {
    key: ObjectKey,
    generation: Option<i64>,
    /// `None` when even a lenient reading finds no target.
    target: Option<Target>,
    rule: Result<AccessPolicyRule, SpecError>,
    services: Vec<String>,
    conflicts: BTreeSet<String>,
}

/// Builds the snapshot and the verdicts.
pub fn build(inputs: Inputs<'_>) -> Outcome {
    let mut policies: Vec<ParsedPolicy> = inputs
        .policies
        .iter()
        .filter_map(|obj| {
            let key = ObjectKey::new(obj.metadata.namespace.clone()?, obj.metadata.name.clone()?);
            let spec = obj.data.get("spec");
            let rule = AccessPolicyRule::parse(spec);
            let target = match &rule {
                Ok(rule) => Some(rule.target.clone()),
                Err(_) => lenient_target(spec),
            };
            Some(ParsedPolicy {
                key,
                generation: obj.metadata.generation,
                target,
                rule,
                services: Vec::new(),
                conflicts: BTreeSet::new(),
            })
        })
        .collect();
    policies.sort_by(|a, b| a.key.cmp(&b.key));

    let endpoints = index_slices(inputs.slices);
    let mut services = BTreeMap::new();
    for svc in inputs.services {
        let Some(service) = protected_service(svc, &endpoints, &mut policies) else {
            continue;
        };
        services.insert(service.key.clone(), service);
    }

    let pods = inputs
        .pods
        .iter()
        .filter(|p| !is_terminal(p))
        .filter_map(|p| local_pod(p, inputs.driver))
        .map(|p| (p.uid.clone(), p))
        .collect::<BTreeMap<String, LocalPod>>();

    let verdicts = policies
        .into_iter()
        .map(|p| {
            let verdict = verdict(&p);
            (p.key, verdict)
        })
        .collect();
    Outcome {
        snapshot: Snapshot {
            services,
            pods,
            gateways: gateway_addresses(inputs.peers),
        },
        verdicts,
    }
}

/// Addresses of host-network gateway pods (node addresses). A pod that is not host-network is
/// ignored: its address is a pod address, and allowing it would let that pod, not a gateway,
/// reach protected endpoints directly. Readiness is not required: a gateway that is starting
/// already proxies with its pinned programs, and dropping its traffic would break the roll.
fn gateway_addresses(peers: &[Arc<Pod>]) -> Vec<IpAddr> {
    let ips: BTreeSet<IpAddr> = peers
        .iter()
        .filter(|p| !is_terminal(p))
        .filter(|p| p.spec.as_ref().and_then(|s| s.host_network) == Some(true))
        .filter_map(|p| p.status.as_ref()?.pod_ips.as_ref())
        .flatten()
        .filter_map(|ip| ip.ip.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect();
    ips.into_iter().collect()
}

/// A pod that has finished has given its IP back; another pod may already use it.
fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

fn verdict(p: &ParsedPolicy) -> Verdict {
    let services = p.services.clone();
    let (accepted, reason, message) = match &p.rule {
        Err(e) => {
            let effect = if services.is_empty() {
                String::new()
            } else {
                format!(
                    "; protected Service(s) {} allow nothing until it is fixed",
                    services.join(", ")
                )
            };
            (false, e.reason(), format!("{e}{effect}"))
        }
        Ok(_) if !p.conflicts.is_empty() => (
            false,
            "Conflict",
            format!(
                "Service(s) {} are also targeted by AccessPolicy {}: a Service takes exactly one \
                 AccessPolicy, and allows nothing until only one remains",
                services.join(", "),
                p.conflicts.iter().cloned().collect::<Vec<_>>().join(", ")
            ),
        ),
        Ok(_) if services.is_empty() => (
            true,
            "Valid",
            "valid, but no protected Service matches the target (label the Service \
             nodegate.io/protected=true)"
                .to_owned(),
        ),
        Ok(_) => (
            true,
            "Valid",
            format!("enforced on Service(s) {}", services.join(", ")),
        ),
    };
    Verdict {
        generation: p.generation,
        accepted,
        reason,
        message,
        services,
    }
}

/// `(namespace, service name)` → (ready, not ready) endpoint addresses with ports.
type EndpointIndex = BTreeMap<(String, String), (BTreeSet<SocketAddr>, BTreeSet<SocketAddr>)>;

fn index_slices(slices: &[Arc<EndpointSlice>]) -> EndpointIndex {
    let mut index = EndpointIndex::new();
    for slice in slices {
        let meta = &slice.metadata;
        let (Some(ns), Some(service)) = (
            meta.namespace.clone(),
            meta.labels
                .as_ref()
                .and_then(|l| l.get(SERVICE_NAME_LABEL))
                .cloned(),
        ) else {
            continue;
        };
        // FQDN slices name hosts, not addresses: nothing the kernel can match.
        if !matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            continue;
        }
        let ports: Vec<u16> = slice
            .ports
            .iter()
            .flatten()
            .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
            .filter_map(|p| p.port.and_then(|port| u16::try_from(port).ok()))
            .filter(|&port| port != 0)
            .collect();
        let entry = index.entry((ns, service)).or_default();
        for ep in &slice.endpoints {
            // `ready` unset means ready (discovery/v1 API documentation).
            let ready = ep.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
            for addr in &ep.addresses {
                let Ok(ip) = addr.parse::<IpAddr>() else {
                    continue;
                };
                for &port in &ports {
                    let sa = SocketAddr::new(ip.to_canonical(), port);
                    if ready {
                        entry.0.insert(sa);
                    } else {
                        entry.1.insert(sa);
                    }
                }
            }
        }
    }
    index
}

fn protected_service(
    svc: &Service,
    endpoints: &EndpointIndex,
    policies: &mut [ParsedPolicy],
) -> Option<ProtectedService> {
    let meta = &svc.metadata;
    let key = ObjectKey::new(meta.namespace.clone()?, meta.name.clone()?);
    let empty = BTreeMap::new();
    let labels = meta.labels.as_ref().unwrap_or(&empty);
    // The watch selects on this label already; checked again so that the rule holds whatever
    // feeds this function.
    if labels.get(PROTECTED_LABEL).map(String::as_str) != Some("true") {
        return None;
    }
    let annotations = meta.annotations.as_ref().unwrap_or(&empty);
    let mut warnings = Vec::new();

    let vips = cluster_vips(svc);
    let (ready, not_ready) = endpoints
        .get(&(key.namespace.clone(), key.name.clone()))
        .cloned()
        .unwrap_or_default();

    let (policy, mode) = bind_policy(&key, labels, annotations, policies, &mut warnings);

    Some(ProtectedService {
        key,
        mode,
        vips,
        endpoints: ready.into_iter().collect(),
        not_ready_endpoints: not_ready.into_iter().collect(),
        policy,
        warnings,
    })
}

/// The policy and mode of a protected Service (the rules in the module documentation), and the
/// bookkeeping on the policies that target it.
fn bind_policy(
    key: &ObjectKey,
    labels: &BTreeMap<String, String>,
    annotations: &BTreeMap<String, String>,
    policies: &mut [ParsedPolicy],
    warnings: &mut Vec<String>,
) -> (PolicyBinding, Mode) {
    // Every AccessPolicy of the namespace that targets this Service.
    let mut valid = Vec::new();
    let mut invalid = Vec::new();
    for (i, p) in policies.iter_mut().enumerate() {
        if p.key.namespace != key.namespace
            || !p
                .target
                .as_ref()
                .is_some_and(|t| t.matches(&key.name, labels))
        {
            continue;
        }
        p.services.push(key.name.clone());
        match &p.rule {
            Ok(_) => valid.push(i),
            Err(_) => invalid.push(i),
        }
    }
    if valid.len() > 1 {
        for &i in &valid {
            let others = valid
                .iter()
                .filter(|&&j| j != i)
                .map(|&j| policies[j].key.name.clone())
                .collect::<Vec<_>>();
            policies[i].conflicts.extend(others);
        }
    }

    let annotation_mode = match annotations.get(MODE_ANNOTATION).map(String::as_str) {
        None => None,
        Some("enforce") => Some(Mode::Enforce),
        Some("audit") => Some(Mode::Audit),
        Some(other) => {
            warnings.push(format!(
                "annotation {MODE_ANNOTATION}: `{other}` is not `enforce` or `audit`; enforcing"
            ));
            None
        }
    };
    let mut mode = annotation_mode.unwrap_or(Mode::Enforce);
    let annotation_policy = annotations.get(POLICY_ANNOTATION);

    let policy = if let Some(&i) = invalid.first() {
        let p = &policies[i];
        let message = p
            .rule
            .as_ref()
            .err()
            .map(ToString::to_string)
            .unwrap_or_default();
        PolicyBinding::DenyAll(DenyReason::Invalid {
            source: PolicySource::AccessPolicy(p.key.name.clone()),
            message,
        })
    } else if valid.len() > 1 {
        PolicyBinding::DenyAll(DenyReason::Conflict {
            policies: valid
                .iter()
                .map(|&i| policies[i].key.name.clone())
                .collect(),
        })
    } else if let Some(&i) = valid.first() {
        let p = &policies[i];
        // `valid` holds only indices of `Ok` rules.
        let Ok(rule) = p.rule.as_ref() else {
            return (PolicyBinding::DenyAll(DenyReason::NoPolicy), mode);
        };
        if let Some(m) = rule.mode {
            mode = m;
        }
        if annotation_policy.is_some() {
            warnings.push(format!(
                "annotation {POLICY_ANNOTATION} is ignored: AccessPolicy {} applies",
                p.key.name
            ));
        }
        PolicyBinding::Policy {
            source: PolicySource::AccessPolicy(p.key.name.clone()),
            document: rule.document.clone(),
        }
    } else if let Some(text) = annotation_policy {
        match validate_policy_text(text, &format!("annotation {POLICY_ANNOTATION}")) {
            Ok(document) => PolicyBinding::Policy {
                source: PolicySource::Annotation,
                document,
            },
            Err(e) => PolicyBinding::DenyAll(DenyReason::Invalid {
                source: PolicySource::Annotation,
                message: e.to_string(),
            }),
        }
    } else {
        PolicyBinding::DenyAll(DenyReason::NoPolicy)
    };

    (policy, mode)
}

/// `ClusterIPs` (both families) × TCP ports. A headless Service (`None`) has no VIP.
fn cluster_vips(svc: &Service) -> Vec<SocketAddr> {
    let Some(spec) = svc.spec.as_ref() else {
        return Vec::new();
    };
    let ips: BTreeSet<IpAddr> = spec
        .cluster_ips
        .iter()
        .flatten()
        .chain(spec.cluster_ip.iter())
        .filter_map(|ip| ip.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .filter(|ip| !ip.is_unspecified())
        .collect();
    let ports: BTreeSet<u16> = spec
        .ports
        .iter()
        .flatten()
        .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == "TCP")
        .filter_map(|p| u16::try_from(p.port).ok())
        .filter(|&p| p != 0)
        .collect();
    ips.iter()
        .flat_map(|&ip| ports.iter().map(move |&port| SocketAddr::new(ip, port)))
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::{Value, json};

    use super::*;

    fn service(name: &str, labels: &Value, annotations: &Value) -> Arc<Service> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "shop", "labels": labels,
                             "annotations": annotations},
                "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd96::10"],
                         "ports": [{"port": 80}, {"port": 53, "protocol": "UDP"}]}
            }))
            .expect("service"),
        )
    }

    fn slice(service: &str, ready: &[&str], not_ready: &[&str]) -> Arc<EndpointSlice> {
        let mut eps: Vec<Value> = ready
            .iter()
            .map(|ip| json!({"addresses": [ip], "conditions": {"ready": true}}))
            .collect();
        eps.extend(
            not_ready
                .iter()
                .map(|ip| json!({"addresses": [ip], "conditions": {"ready": false}})),
        );
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": format!("{service}-abc"), "namespace": "shop",
                             "labels": {SERVICE_NAME_LABEL: service}},
                "addressType": "IPv4", "endpoints": eps,
                "ports": [{"port": 8080, "protocol": "TCP"}]
            }))
            .expect("slice"),
        )
    }

    fn policy(name: &str, spec: &Value) -> Arc<DynamicObject> {
        Arc::new(
            serde_json::from_value(json!({
                "apiVersion": "nodegate.io/v1alpha1", "kind": "AccessPolicy",
                "metadata": {"name": name, "namespace": "shop", "generation": 3},
                "spec": spec
            }))
            .expect("policy"),
        )
    }

    fn run(
        services: &[Arc<Service>],
        slices: &[Arc<EndpointSlice>],
        policies: &[Arc<DynamicObject>],
    ) -> Outcome {
        build(Inputs {
            services,
            slices,
            pods: &[],
            peers: &[],
            policies,
            driver: None,
        })
    }

    const PROTECTED: fn() -> Value = || json!({PROTECTED_LABEL: "true", "tier": "admin"});
    const ALLOW_SRE: fn() -> Value = || json!({"allow": [{"when": {"groups": "sre"}}]});

    #[test]
    fn addresses_of_a_protected_service() {
        let out = run(
            &[service("web", &PROTECTED(), &json!({}))],
            &[
                slice("web", &["10.1.0.2", "10.1.0.1"], &["10.1.0.9"]),
                slice("other", &["10.9.9.9"], &[]),
            ],
            &[],
        );
        let web = &out.snapshot.services[&ObjectKey::new("shop", "web")];
        let addrs = |v: &[&str]| {
            v.iter()
                .map(|s| s.parse().expect("addr"))
                .collect::<Vec<SocketAddr>>()
        };
        assert_eq!(
            web.vips,
            addrs(&["10.96.0.10:80", "[fd96::10]:80"]),
            "TCP ports only"
        );
        assert_eq!(web.endpoints, addrs(&["10.1.0.1:8080", "10.1.0.2:8080"]));
        assert_eq!(web.not_ready_endpoints, addrs(&["10.1.0.9:8080"]));
        assert_eq!(web.mode, Mode::Enforce);
        assert_eq!(web.policy, PolicyBinding::DenyAll(DenyReason::NoPolicy));
    }

    #[test]
    fn unlabelled_services_are_not_protected() {
        for labels in [
            json!({}),
            json!({PROTECTED_LABEL: "false"}),
            json!({PROTECTED_LABEL: "yes"}),
        ] {
            let out = run(&[service("web", &labels, &json!({}))], &[], &[]);
            assert!(out.snapshot.services.is_empty(), "{labels}");
        }
    }

    type Case = (
        &'static str,
        Value,
        Vec<Arc<DynamicObject>>,
        &'static str,
        Mode,
    );

    #[test]
    #[expect(clippy::too_many_lines, reason = "one table of cases")]
    fn policy_selection_never_widens() {
        let good = json!({"target": {"service": "web"}, "policy": ALLOW_SRE()});
        let good_sel = json!({"target": {"selector": {"matchLabels": {"tier": "admin"}}},
                              "mode": "audit", "policy": ALLOW_SRE()});
        let bad = json!({"target": {"service": "web"},
                         "policy": {"allow": [{"when": {"grups": "sre"}}]}});
        let annotation = json!({POLICY_ANNOTATION: "allow: [{when: {groups: ops}}]"});
        let bad_annotation = json!({POLICY_ANNOTATION: "allow: [{when: {}}]"});
        let cases: Vec<Case> = vec![
            ("nothing", json!({}), vec![], "deny:none", Mode::Enforce),
            (
                "by name",
                json!({}),
                vec![policy("p", &good)],
                "policy:p",
                Mode::Enforce,
            ),
            (
                "by selector, mode",
                json!({}),
                vec![policy("p", &good_sel)],
                "policy:p",
                Mode::Audit,
            ),
            (
                "annotation",
                annotation.clone(),
                vec![],
                "policy:annotation",
                Mode::Enforce,
            ),
            (
                "bad annotation",
                bad_annotation,
                vec![],
                "deny:invalid",
                Mode::Enforce,
            ),
            (
                "policy beats annotation",
                annotation.clone(),
                vec![policy("p", &good)],
                "policy:p",
                Mode::Enforce,
            ),
            (
                "invalid policy beats annotation",
                annotation.clone(),
                vec![policy("p", &bad)],
                "deny:invalid",
                Mode::Enforce,
            ),
            (
                "invalid beats valid",
                json!({}),
                vec![policy("a", &good), policy("b", &bad)],
                "deny:invalid",
                Mode::Enforce,
            ),
            (
                "two valid conflict",
                json!({}),
                vec![policy("a", &good), policy("b", &good_sel)],
                "deny:conflict",
                Mode::Enforce,
            ),
            (
                "audit annotation",
                json!({MODE_ANNOTATION: "audit"}),
                vec![],
                "deny:none",
                Mode::Audit,
            ),
            (
                "bad mode enforces",
                json!({MODE_ANNOTATION: "Audit"}),
                vec![],
                "deny:none",
                Mode::Enforce,
            ),
        ];
        for (case, annotations, policies, want, mode) in cases {
            let out = run(
                &[service("web", &PROTECTED(), &annotations)],
                &[],
                &policies,
            );
            let web = &out.snapshot.services[&ObjectKey::new("shop", "web")];
            let got = match &web.policy {
                PolicyBinding::Policy {
                    source: PolicySource::AccessPolicy(n),
                    ..
                } => format!("policy:{n}"),
                PolicyBinding::Policy {
                    source: PolicySource::Annotation,
                    ..
                } => "policy:annotation".into(),
                PolicyBinding::DenyAll(DenyReason::NoPolicy) => "deny:none".into(),
                PolicyBinding::DenyAll(DenyReason::Invalid { .. }) => "deny:invalid".into(),
                PolicyBinding::DenyAll(DenyReason::Conflict { .. }) => "deny:conflict".into(),
            };
            assert_eq!(got, want, "{case}");
            assert_eq!(web.mode, mode, "{case}");
        }
    }

    #[test]
    fn verdicts_and_status() {
        let out = run(
            &[service("web", &PROTECTED(), &json!({}))],
            &[],
            &[
                policy(
                    "bad",
                    &json!({"target": {"service": "web"}, "policy": {"allow": [{"when": {}}]}}),
                ),
                policy(
                    "lonely",
                    &json!({"target": {"service": "db"}, "policy": ALLOW_SRE()}),
                ),
            ],
        );
        let bad = &out.verdicts[&ObjectKey::new("shop", "bad")];
        assert!(!bad.accepted);
        assert_eq!(bad.reason, "InvalidPolicy");
        assert!(
            bad.message
                .contains("spec.policy.allow[0].when: empty condition"),
            "{}",
            bad.message
        );
        assert!(bad.message.contains("web allow nothing"), "{}", bad.message);
        assert_eq!(bad.services, vec!["web".to_owned()]);
        let lonely = &out.verdicts[&ObjectKey::new("shop", "lonely")];
        assert!(lonely.accepted && lonely.services.is_empty());

        // lastTransitionTime is kept while Accepted does not change: no write needed.
        let first = bad.status(None, "2026-01-01T00:00:00Z");
        let again = bad.status(Some(&first), "2026-01-02T00:00:00Z");
        assert_eq!(first, again);
        let fixed = lonely.status(Some(&first), "2026-01-03T00:00:00Z");
        assert_eq!(
            fixed.conditions[0].last_transition_time,
            "2026-01-03T00:00:00Z"
        );
        assert_eq!(fixed.observed_generation, Some(3));
    }

    #[test]
    fn gateway_peers_are_host_network_pods_only() {
        let peer = |host_network: bool, ip: &str, phase: &str| -> Arc<Pod> {
            Arc::new(
                serde_json::from_value(json!({
                    "metadata": {"name": ip, "namespace": "nodegate-system"},
                    "spec": {"hostNetwork": host_network, "containers": []},
                    "status": {"phase": phase, "podIPs": [{"ip": ip}]}
                }))
                .expect("pod"),
            )
        };
        let out = build(Inputs {
            services: &[],
            slices: &[],
            pods: &[],
            peers: &[
                peer(true, "192.168.1.2", "Running"),
                peer(true, "192.168.1.1", "Pending"),
                peer(false, "10.1.0.7", "Running"),
                peer(true, "192.168.1.3", "Failed"),
            ],
            policies: &[],
            driver: None,
        });
        let want: Vec<IpAddr> = vec![
            "192.168.1.1".parse().expect("ip"),
            "192.168.1.2".parse().expect("ip"),
        ];
        assert_eq!(out.snapshot.gateways, want);
    }

    #[test]
    fn long_names_fit_the_kernel() {
        use super::super::model::kernel_name;
        let long = format!("{}/{}", "n".repeat(63), "s".repeat(63));
        let k = kernel_name(&long);
        assert_eq!(k.len(), 63);
        assert_ne!(
            k,
            kernel_name(&format!("{}/{}", "n".repeat(63), "t".repeat(63)))
        );
        assert_eq!(kernel_name("shop/web"), "shop/web");
    }
}
