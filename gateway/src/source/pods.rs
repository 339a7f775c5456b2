//! Pod → workload identity, and the pod's cgroup for both kubelet cgroup drivers.
//!
//! The kernel attributes a connection to the cgroup of the process that made it
//! (`bpf_get_current_cgroup_id`): a container's cgroup, one level below the pod's. The kubelet
//! names the pod's cgroup after the pod UID, its `QoS` class and the cgroup driver:
//!
//! | driver   | `QoS`      | pod cgroup (relative to the cgroup v2 root)                                         |
//! |----------|------------|-------------------------------------------------------------------------------------|
//! | systemd  | Guaranteed | `kubepods.slice/kubepods-pod<uid_>.slice`                                           |
//! | systemd  | Burstable  | `kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice`       |
//! | systemd  | `BestEffort` | `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice`     |
//! | cgroupfs | Guaranteed | `kubepods/pod<uid>`                                                                 |
//! | cgroupfs | Burstable  | `kubepods/burstable/pod<uid>`                                                       |
//! | cgroupfs | `BestEffort` | `kubepods/besteffort/pod<uid>`                                                      |
//!
//! `<uid_>` is the UID with `-` replaced by `_`: in systemd unit names `-` separates the levels
//! of the slice hierarchy. Guaranteed pods have no `QoS` level (kubelet `pkg/kubelet/cm/
//! qos_container_manager_linux.go` creates only the burstable and besteffort parents).

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

use super::model::LocalPod;

/// The kubelet's `cgroupDriver`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CgroupDriver {
    Systemd,
    Cgroupfs,
}

impl CgroupDriver {
    /// Which driver laid out `root` (the cgroup v2 root the gateway hooks): by the top-level
    /// directory the kubelet created. `None` on a node without pods' cgroups (not a
    /// Kubernetes node, or a kubelet with a custom `--cgroup-root`: configure the driver).
    pub fn detect(root: &Path) -> Option<Self> {
        if root.join("kubepods.slice").is_dir() {
            Some(Self::Systemd)
        } else if root.join("kubepods").is_dir() {
            Some(Self::Cgroupfs)
        } else {
            None
        }
    }
}

/// Kubernetes `QoS` class (`status.qosClass`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QosClass {
    Guaranteed,
    Burstable,
    BestEffort,
}

impl QosClass {
    /// `status.qosClass` when the kubelet has set it (it always has once the pod runs on this
    /// node), else computed from the containers' resources like the API server does.
    pub fn of(pod: &Pod) -> Self {
        match pod.status.as_ref().and_then(|s| s.qos_class.as_deref()) {
            Some("Guaranteed") => Self::Guaranteed,
            Some("Burstable") => Self::Burstable,
            Some("BestEffort") => Self::BestEffort,
            _ => Self::from_spec(pod),
        }
    }

    /// `pkg/apis/core/v1/helper/qos.GetPodQOS`, for cpu and memory: `BestEffort` when no container
    /// requests or limits either; Guaranteed when every container limits both and requests equal
    /// limits (a missing request defaults to the limit); Burstable otherwise.
    fn from_spec(pod: &Pod) -> Self {
        let Some(spec) = pod.spec.as_ref() else {
            return Self::BestEffort;
        };
        let containers: Vec<&Container> = spec
            .containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .collect();
        let mut any = false;
        let mut guaranteed = true;
        for c in &containers {
            let res = c.resources.as_ref();
            let requests = res.and_then(|r| r.requests.as_ref());
            let limits = res.and_then(|r| r.limits.as_ref());
            for name in ["cpu", "memory"] {
                let request = requests.and_then(|m| m.get(name));
                let limit = limits.and_then(|m| m.get(name));
                if request.is_some_and(|q| !is_zero(q)) || limit.is_some_and(|q| !is_zero(q)) {
                    any = true;
                }
                match (request, limit) {
                    (_, None) => guaranteed = false,
                    (Some(r), Some(l)) if r != l => guaranteed = false,
                    _ => {}
                }
            }
        }
        if !any {
            Self::BestEffort
        } else if guaranteed && !containers.is_empty() {
            Self::Guaranteed
        } else {
            Self::Burstable
        }
    }
}

/// Zero in any spelling the API server would have normalised to `0`.
fn is_zero(q: &Quantity) -> bool {
    q.0.trim_start_matches('+')
        .trim_end_matches(|c: char| c.is_ascii_alphabetic())
        .chars()
        .all(|c| c == '0' || c == '.')
}

/// A pod UID as the kubelet puts it in a path: lower-case hex and dashes only. Anything else
/// is refused rather than escaped, since it would become part of a filesystem path.
fn checked_uid(uid: &str) -> Option<&str> {
    let ok = !uid.is_empty()
        && uid.len() <= 64
        && uid
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b) || b == b'-');
    ok.then_some(uid)
}

/// The pod's cgroup relative to the cgroup v2 root, or `None` for a malformed UID.
pub fn pod_cgroup(driver: CgroupDriver, qos: QosClass, uid: &str) -> Option<PathBuf> {
    let uid = checked_uid(uid)?;
    let path = match (driver, qos) {
        (CgroupDriver::Systemd, QosClass::Guaranteed) => {
            format!("kubepods.slice/kubepods-pod{}.slice", uid.replace('-', "_"))
        }
        (CgroupDriver::Systemd, QosClass::Burstable | QosClass::BestEffort) => {
            let level = qos_dir(qos);
            format!(
                "kubepods.slice/kubepods-{level}.slice/kubepods-{level}-pod{}.slice",
                uid.replace('-', "_")
            )
        }
        (CgroupDriver::Cgroupfs, QosClass::Guaranteed) => format!("kubepods/pod{uid}"),
        (CgroupDriver::Cgroupfs, QosClass::Burstable | QosClass::BestEffort) => {
            format!("kubepods/{}/pod{uid}", qos_dir(qos))
        }
    };
    Some(PathBuf::from(path))
}

fn qos_dir(qos: QosClass) -> &'static str {
    match qos {
        QosClass::Burstable => "burstable",
        QosClass::BestEffort => "besteffort",
        // Never called for Guaranteed (no QoS level); kept total for the match.
        QosClass::Guaranteed => "",
    }
}

/// The workload identity of a pod, or `None` for a pod without the fields every scheduled pod
/// has (UID, namespace, name): such an object cannot be attributed and is skipped.
pub fn local_pod(pod: &Pod, driver: Option<CgroupDriver>) -> Option<LocalPod> {
    let meta = &pod.metadata;
    let uid = meta.uid.clone()?;
    let namespace = meta.namespace.clone()?;
    let name = meta.name.clone()?;
    let spec = pod.spec.as_ref();
    let service_account = spec
        .and_then(|s| s.service_account_name.clone())
        .unwrap_or_else(|| "default".to_owned());
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let mut ips: Vec<IpAddr> = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ips.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| p.ip.parse::<IpAddr>().ok())
        .map(|ip| ip.to_canonical())
        .collect();
    ips.sort_unstable();
    ips.dedup();
    let labels: BTreeMap<String, String> = meta.labels.clone().unwrap_or_default();
    let cgroup = driver.and_then(|d| pod_cgroup(d, QosClass::of(pod), &uid));
    Some(LocalPod {
        uid,
        namespace,
        name,
        service_account,
        labels,
        ips,
        host_network,
        cgroup,
    })
}

/// The cgroup ids (directory inode numbers, what `bpf_get_current_cgroup_id` returns) of a
/// pod's cgroup and of the container cgroups below it. Containers come and go, so the caller
/// rescans when the kernel reports a cgroup id it does not know.
pub fn cgroup_ids(root: &Path, pod_cgroup: &Path) -> std::io::Result<Vec<u64>> {
    use std::os::unix::fs::MetadataExt as _;

    let dir = root.join(pod_cgroup);
    let mut ids = vec![std::fs::metadata(&dir)?.ino()];
    for entry in std::fs::read_dir(&dir)? {
        let entry = entry?;
        // Only directories are cgroups; the rest are the controllers' files.
        if entry.file_type()?.is_dir() {
            ids.push(entry.metadata()?.ino());
        }
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use k8s_openapi::api::core::v1::{PodSpec, PodStatus, ResourceRequirements};
    use serde_json::json;

    use super::*;

    const UID: &str = "4f2a8c1e-9b7d-4e3a-a1b2-0c9d8e7f6a5b";

    #[test]
    fn cgroup_paths_for_both_drivers() {
        use CgroupDriver::{Cgroupfs, Systemd};
        use QosClass::{BestEffort, Burstable, Guaranteed};
        let cases = [
            (
                Systemd,
                Guaranteed,
                "kubepods.slice/kubepods-pod4f2a8c1e_9b7d_4e3a_a1b2_0c9d8e7f6a5b.slice",
            ),
            (
                Systemd,
                Burstable,
                "kubepods.slice/kubepods-burstable.slice/\
                 kubepods-burstable-pod4f2a8c1e_9b7d_4e3a_a1b2_0c9d8e7f6a5b.slice",
            ),
            (
                Systemd,
                BestEffort,
                "kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod4f2a8c1e_9b7d_4e3a_a1b2_0c9d8e7f6a5b.slice",
            ),
            (
                Cgroupfs,
                Guaranteed,
                "kubepods/pod4f2a8c1e-9b7d-4e3a-a1b2-0c9d8e7f6a5b",
            ),
            (
                Cgroupfs,
                Burstable,
                "kubepods/burstable/pod4f2a8c1e-9b7d-4e3a-a1b2-0c9d8e7f6a5b",
            ),
            (
                Cgroupfs,
                BestEffort,
                "kubepods/besteffort/pod4f2a8c1e-9b7d-4e3a-a1b2-0c9d8e7f6a5b",
            ),
        ];
        for (driver, qos, want) in cases {
            assert_eq!(
                pod_cgroup(driver, qos, UID),
                Some(PathBuf::from(want)),
                "{driver:?} {qos:?}"
            );
        }
    }

    #[test]
    fn malformed_uids_give_no_path() {
        for uid in ["", "../../etc", "ABC", "4f2a/..", "x", &"a".repeat(65)] {
            assert_eq!(
                pod_cgroup(CgroupDriver::Cgroupfs, QosClass::Burstable, uid),
                None,
                "{uid:?}"
            );
        }
    }

    fn resources(requests: &[(&str, &str)], limits: &[(&str, &str)]) -> ResourceRequirements {
        let map = |kv: &[(&str, &str)]| {
            (!kv.is_empty()).then(|| {
                kv.iter()
                    .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
                    .collect()
            })
        };
        ResourceRequirements {
            requests: map(requests),
            limits: map(limits),
            ..Default::default()
        }
    }

    fn pod_with(res: Vec<ResourceRequirements>, qos: Option<&str>) -> Pod {
        Pod {
            spec: Some(PodSpec {
                containers: res
                    .into_iter()
                    .enumerate()
                    .map(|(i, r)| Container {
                        name: format!("c{i}"),
                        resources: Some(r),
                        ..Default::default()
                    })
                    .collect(),
                ..Default::default()
            }),
            status: qos.map(|q| PodStatus {
                qos_class: Some(q.to_owned()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn qos_class_from_status_then_spec() {
        let both = [("cpu", "100m"), ("memory", "64Mi")];
        let cases = [
            (
                pod_with(vec![resources(&[], &[])], None),
                QosClass::BestEffort,
            ),
            (
                pod_with(vec![resources(&[], &both)], None),
                QosClass::Guaranteed,
            ),
            (
                pod_with(vec![resources(&both, &both)], None),
                QosClass::Guaranteed,
            ),
            (
                pod_with(vec![resources(&[("cpu", "50m")], &both)], None),
                QosClass::Burstable,
            ),
            (
                pod_with(vec![resources(&[("cpu", "100m")], &[])], None),
                QosClass::Burstable,
            ),
            (
                pod_with(vec![resources(&both, &both), resources(&[], &[])], None),
                QosClass::Burstable,
            ),
            // The kubelet's word wins over our computation.
            (
                pod_with(vec![resources(&[], &[])], Some("Guaranteed")),
                QosClass::Guaranteed,
            ),
        ];
        for (i, (pod, want)) in cases.into_iter().enumerate() {
            assert_eq!(QosClass::of(&pod), want, "case {i}");
        }
    }

    #[test]
    fn pod_identity() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "shop", "uid": UID,
                         "labels": {"app": "web"}},
            "spec": {"serviceAccountName": "web", "nodeName": "n1",
                     "containers": [{"name": "c"}]},
            "status": {"qosClass": "BestEffort",
                       "podIPs": [{"ip": "10.1.2.3"}, {"ip": "fd00::3"}, {"ip": "::ffff:10.1.2.3"}]}
        }))
        .expect("pod json");
        let p = local_pod(&pod, Some(CgroupDriver::Systemd)).expect("identity");
        assert_eq!(p.service_account, "web");
        assert_eq!(p.labels.get("app").map(String::as_str), Some("web"));
        assert_eq!(
            p.ips,
            vec![
                "10.1.2.3".parse::<IpAddr>().expect("ip"),
                "fd00::3".parse().expect("ip")
            ]
        );
        assert_eq!(
            p.cgroup.as_deref(),
            Some(Path::new(
                "kubepods.slice/kubepods-besteffort.slice/\
                 kubepods-besteffort-pod4f2a8c1e_9b7d_4e3a_a1b2_0c9d8e7f6a5b.slice"
            ))
        );
        // No driver known: identity without cgroup (attribution by address only).
        assert_eq!(local_pod(&pod, None).and_then(|p| p.cgroup), None);
    }

    #[test]
    fn driver_detection_and_cgroup_ids() {
        let root = std::env::temp_dir().join(format!("ng-kube-cg-{}", std::process::id()));
        let pod_dir = root.join("kubepods/burstable").join(format!("pod{UID}"));
        std::fs::create_dir_all(pod_dir.join("c0ffee")).expect("mkdir");
        std::fs::write(pod_dir.join("cgroup.procs"), "").expect("file");
        assert_eq!(CgroupDriver::detect(&root), Some(CgroupDriver::Cgroupfs));
        let rel = pod_cgroup(CgroupDriver::Cgroupfs, QosClass::Burstable, UID).expect("path");
        let ids = cgroup_ids(&root, &rel).expect("scan");
        assert_eq!(ids.len(), 2, "pod dir + one container dir, files skipped");
        std::fs::remove_dir_all(&root).expect("cleanup");
        assert_eq!(CgroupDriver::detect(&root), None);
    }
}
