//! Building and tearing down the simulated node.

use std::{
    collections::BTreeMap,
    fs,
    io::ErrorKind,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use super::{
    BPFFS_ROOT, CGROUP2_ROOT, Error, Result, TMP_ROOT, Tools,
    gateway::{Gateway, GatewayConfig},
    io_err,
    netns::sysctl_in_netns,
    process::{Output, POLL, PeerReply, Proc, Runtime, finish, run_command},
};

/// Deadline of one `ip`/`mount`/`sysctl` call during setup.
const SETUP_CMD_TIMEOUT: Duration = Duration::from_secs(10);
/// Name of the host-network "pod": node netns, cgroup `<prefix>/pods/hostnet`.
pub const HOSTNET: &str = "hostnet";
/// Name of the foreign node's place.
pub const FOREIGN: &str = "foreign";
/// Name of the node's own place (node netns, cgroup `<prefix>/node`, not intercepted).
pub const NODE: &str = "node";
/// Longest node name: the prefix `ng<name>` stays short in netns and cgroup names.
const MAX_NAME: usize = 10;
/// Longest pod name: the node-side veth `v-<pod>` must fit in 15 characters.
const MAX_POD: usize = 12;

/// How the kubelet lays out pods' cgroups (its `cgroupDriver`), for [`NodeSpec::kubelet_cgroups`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KubeletDriver {
    /// `kubepods/besteffort/pod<uid>/<container>`.
    Cgroupfs,
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid_>.slice/<container>`.
    Systemd,
}

impl KubeletDriver {
    /// The name in the gateway's `kubernetes.cgroup_driver`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cgroupfs => "cgroupfs",
            Self::Systemd => "systemd",
        }
    }

    /// A `BestEffort` pod's container cgroup, relative to the hooked cgroup (what the kubelet
    /// would create; `status.qosClass` of [`super::kube::pod_object`] is `BestEffort`).
    pub fn container_cgroup(self, uid: &str) -> PathBuf {
        match self {
            Self::Cgroupfs => Path::new("kubepods/besteffort")
                .join(format!("pod{uid}"))
                .join("ctr"),
            Self::Systemd => Path::new("kubepods.slice/kubepods-besteffort.slice")
                .join(format!(
                    "kubepods-besteffort-pod{}.slice",
                    uid.replace('-', "_")
                ))
                .join("cri-containerd-ctr.scope"),
        }
    }
}

/// What to build. Names are `[a-z0-9]` only, so `<prefix>-` never matches another node's names.
#[derive(Debug, Clone)]
pub struct NodeSpec {
    name: String,
    pods: Vec<String>,
    index: Option<u8>,
    tools: Tools,
    kubelet: Option<KubeletDriver>,
}

impl NodeSpec {
    /// A node called `name` (prefix `ng<name>`), with pods `a` and `b` unless [`Self::pods`]
    /// says otherwise.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            pods: vec!["a".to_owned(), "b".to_owned()],
            index: None,
            tools: Tools::from_env(),
            kubelet: None,
        }
    }

    /// Puts each pod's processes where the kubelet with `driver` would: in a container cgroup
    /// below `<pods cgroup>/kubepods…/pod<uid>` ([`KubeletDriver::container_cgroup`], UID
    /// [`Node::pod_uid`]), so that the gateway's Kubernetes source finds them by pod UID. By
    /// default pods live in `<pods cgroup>/<pod>`.
    #[must_use]
    pub fn kubelet_cgroups(mut self, driver: KubeletDriver) -> Self {
        self.kubelet = Some(driver);
        self
    }

    #[must_use]
    pub fn pods(mut self, pods: &[&str]) -> Self {
        self.pods = pods.iter().map(|&p| p.to_owned()).collect();
        self
    }

    /// The `N` of `10.N.0.0/16`; by default derived from the name (addresses only have to be
    /// unique inside one node's namespaces, this just keeps logs readable).
    #[must_use]
    pub fn index(mut self, n: u8) -> Self {
        self.index = Some(n);
        self
    }

    #[must_use]
    pub fn tools(mut self, tools: Tools) -> Self {
        self.tools = tools;
        self
    }
}

/// Where processes run: a network namespace, a cgroup, and the addresses they use there.
#[derive(Clone)]
pub struct Place {
    pub name: String,
    /// Name under `/run/netns`.
    pub netns: String,
    pub cgroup: PathBuf,
    pub ipv4: Ipv4Addr,
    pub ipv6: Ipv6Addr,
    rt: Arc<Runtime>,
}

impl std::fmt::Debug for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Place")
            .field("name", &self.name)
            .field("netns", &self.netns)
            .field("cgroup", &self.cgroup)
            .field("ipv4", &self.ipv4)
            .field("ipv6", &self.ipv6)
            .finish_non_exhaustive()
    }
}

impl Place {
    pub fn v4(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(self.ipv4), port)
    }

    pub fn v6(&self, port: u16) -> SocketAddr {
        SocketAddr::new(IpAddr::V6(self.ipv6), port)
    }

    /// This place's address of the same family as `target`: the source of its connections
    /// there.
    pub fn ip_for(&self, target: SocketAddr) -> IpAddr {
        if target.is_ipv4() {
            self.ipv4.into()
        } else {
            self.ipv6.into()
        }
    }

    /// The node's temp dir (logs, configs), shared by every place of the node.
    pub(crate) fn dir(&self) -> &Path {
        &self.rt.dir
    }

    /// The cgroup id the kernel reports (`bpf_get_current_cgroup_id`): the cgroup v2 inode.
    pub fn cgroup_id(&self) -> Result<u64> {
        fs::metadata(&self.cgroup)
            .map(|m| m.ino())
            .map_err(io_err(format!("stat {}", self.cgroup.display())))
    }

    /// Starts `cmd` here; it runs until killed, its [`Proc`] is dropped, or the node is dropped.
    /// It also gets SIGKILL when the *thread* that started it exits (`PR_SET_PDEATHSIG`), so
    /// that a killed test run leaves nothing running: start long-lived processes from the
    /// thread that owns the node.
    pub fn spawn(&self, label: &str, cmd: Command) -> Result<Proc> {
        self.rt.spawn(
            &format!("{}-{label}", self.name),
            Some(&self.netns),
            &self.cgroup,
            cmd,
        )
    }

    /// Runs `cmd` here to completion, killing it at `timeout`.
    pub fn run(&self, cmd: Command, timeout: Duration) -> Result<Output> {
        let command = super::process::describe(&cmd);
        let label = Path::new(cmd.get_program())
            .file_name()
            .map_or_else(|| "cmd".to_owned(), |f| f.to_string_lossy().into_owned());
        let proc = self.spawn(&label, cmd)?;
        Ok(finish(
            &proc,
            format!("{command} (in {})", self.name),
            timeout,
        ))
    }

    /// `ngpeer serve` on this place's v4 and v6 addresses at `port`, answering as `name`.
    /// Returns once both sockets listen.
    pub fn serve(&self, port: u16, name: &str) -> Result<Proc> {
        self.serve_on(&[self.v4(port), self.v6(port)], name)
    }

    /// `ngpeer serve --http11` on this place's v4 and v6 addresses at `port`: HTTP answered
    /// as HTTP/1.1 with keep-alive.
    pub fn serve_http11(&self, port: u16, name: &str) -> Result<Proc> {
        self.serve_with(&[self.v4(port), self.v6(port)], name, &["--http11"])
    }

    /// `ngpeer serve` on the given addresses.
    pub fn serve_on(&self, addrs: &[SocketAddr], name: &str) -> Result<Proc> {
        self.serve_with(addrs, name, &[])
    }

    fn serve_with(&self, addrs: &[SocketAddr], name: &str, extra: &[&str]) -> Result<Proc> {
        let mut cmd = Command::new(self.rt.tools.require_ngpeer()?);
        cmd.arg("serve").args(["--name", name]).args(extra);
        for addr in addrs {
            cmd.arg("--listen").arg(addr.to_string());
        }
        let proc = self.spawn(&format!("serve-{name}"), cmd)?;
        for addr in addrs {
            proc.wait_for_stdout(&format!("listening {addr}"), Duration::from_secs(5))?;
        }
        Ok(proc)
    }

    /// `ngpeer connect target --send msg --timeout-ms timeout` from here.
    pub fn connect(&self, target: SocketAddr, msg: &str, timeout: Duration) -> Result<PeerReply> {
        self.connect_with(target, msg, timeout, false)
    }

    /// Like [`Self::connect`], shutting down the write side after the message so that the
    /// server only answers once it sees EOF.
    pub fn connect_half_close(
        &self,
        target: SocketAddr,
        msg: &str,
        timeout: Duration,
    ) -> Result<PeerReply> {
        self.connect_with(target, msg, timeout, true)
    }

    /// Sends `msg` exactly as given (no newline, write side left open) and reads until the
    /// peer closes: a raw HTTP request with `Connection: close`.
    pub fn connect_raw(
        &self,
        target: SocketAddr,
        msg: &str,
        timeout: Duration,
    ) -> Result<PeerReply> {
        let mut cmd = Command::new(self.rt.tools.require_ngpeer()?);
        cmd.arg("connect")
            .arg(target.to_string())
            .args(["--send", msg, "--raw"])
            .arg("--timeout-ms")
            .arg(timeout.as_millis().to_string());
        let out = self.run(cmd, timeout + Duration::from_secs(5))?;
        PeerReply::parse(&out)
    }

    fn connect_with(
        &self,
        target: SocketAddr,
        msg: &str,
        timeout: Duration,
        half_close: bool,
    ) -> Result<PeerReply> {
        let mut cmd = Command::new(self.rt.tools.require_ngpeer()?);
        cmd.arg("connect")
            .arg(target.to_string())
            .args(["--send", msg])
            .arg("--timeout-ms")
            .arg(timeout.as_millis().to_string());
        if half_close {
            cmd.arg("--half-close");
        }
        // ngpeer bounds itself; the margin only covers a stuck exec.
        let out = self.run(cmd, timeout + Duration::from_secs(5))?;
        PeerReply::parse(&out)
    }
}

struct NodeInner {
    name: String,
    prefix: String,
    index: u8,
    rt: Arc<Runtime>,
    places: BTreeMap<String, Place>,
    pods: Vec<String>,
    gateway_cgroup: PathBuf,
}

/// A simulated node. Cloning shares it; the last clone dropped tears it all down: kills every
/// process the harness started, removes the bpffs pin directory, the network namespaces, the
/// cgroups (leaf first) and the temp dir (kept when the thread is panicking, for the logs).
#[derive(Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl Node {
    /// Builds the node described by `spec`, first removing whatever an earlier (killed) run
    /// with the same name left behind.
    pub fn new(spec: NodeSpec) -> Result<Self> {
        // SAFETY: plain syscall.
        let euid = unsafe { libc::geteuid() };
        if euid != 0 {
            return Err(Error::NotRoot { euid });
        }
        check_name(&spec.name, MAX_NAME)?;
        for pod in &spec.pods {
            check_name(pod, MAX_POD)?;
            if [HOSTNET, FOREIGN, NODE].contains(&pod.as_str()) {
                return Err(Error::InvalidName {
                    name: pod.clone(),
                    why: "reserved for the harness's own places",
                });
            }
        }
        let prefix = format!("ng{}", spec.name);
        let index = spec.index.unwrap_or_else(|| default_index(&prefix));
        let n = index;

        cleanup(&prefix);

        let dir = Path::new(TMP_ROOT).join(&prefix);
        fs::create_dir_all(&dir).map_err(io_err(format!("create {}", dir.display())))?;
        let rt = Arc::new(Runtime::new(spec.tools, dir));
        let cg = cgroup_dir(&prefix);
        let node_ns = format!("{prefix}-node");
        let node_v4 = Ipv4Addr::new(10, n, 0, 1);
        let node_v6 = Ipv6Addr::new(0xfd00, n.into(), 0, 0, 0, 0, 0, 1);
        let place = |name: &str, netns: &str, cgroup: PathBuf, ipv4, ipv6| Place {
            name: name.to_owned(),
            netns: netns.to_owned(),
            cgroup,
            ipv4,
            ipv6,
            rt: Arc::clone(&rt),
        };
        let mut places = BTreeMap::new();
        places.insert(
            NODE.to_owned(),
            place(NODE, &node_ns, cg.join("node"), node_v4, node_v6),
        );
        places.insert(
            HOSTNET.to_owned(),
            place(
                HOSTNET,
                &node_ns,
                cg.join("pods").join(HOSTNET),
                node_v4,
                node_v6,
            ),
        );
        places.insert(
            FOREIGN.to_owned(),
            place(
                FOREIGN,
                &format!("{prefix}-foreign"),
                cg.join("foreign"),
                Ipv4Addr::new(10, n, 250, 2),
                Ipv6Addr::new(0xfd00, n.into(), 0x250, 0, 0, 0, 0, 2),
            ),
        );
        for (i, pod) in spec.pods.iter().enumerate() {
            let host = u8::try_from(10 + i).map_err(|_| Error::InvalidName {
                name: pod.clone(),
                why: "too many pods (at most 200)",
            })?;
            let cgroup = match spec.kubelet {
                Some(driver) => cg
                    .join("pods")
                    .join(driver.container_cgroup(&pod_uid(&prefix, pod))),
                None => cg.join("pods").join(pod),
            };
            places.insert(
                pod.clone(),
                place(
                    pod,
                    &format!("{prefix}-pod-{pod}"),
                    cgroup,
                    Ipv4Addr::new(10, n, 1, host),
                    Ipv6Addr::new(0xfd00, n.into(), 1, 0, 0, 0, 0, host.into()),
                ),
            );
        }
        let node = Self {
            inner: Arc::new(NodeInner {
                gateway_cgroup: cg.join("gateway"),
                name: spec.name,
                prefix,
                index,
                rt,
                places,
                pods: spec.pods,
            }),
        };
        // On error `node` is dropped here, which removes whatever was built so far.
        node.build()?;
        Ok(node)
    }

    fn build(&self) -> Result<()> {
        mount_bpffs()?;
        for place in self.inner.places.values() {
            mkdir(&place.cgroup)?;
        }
        mkdir(&self.inner.gateway_cgroup)?;

        let node = self.place(NODE);
        let (n4, n6) = (node.ipv4.to_string(), node.ipv6.to_string());
        ip(&["netns", "add", &node.netns])?;
        ipn(&node.netns, &["link", "set", "lo", "up"])?;
        ipn(
            &node.netns,
            &["addr", "add", &format!("{n4}/32"), "dev", "lo"],
        )?;
        ipn(
            &node.netns,
            &["addr", "add", &format!("{n6}/128"), "dev", "lo", "nodad"],
        )?;
        // Forwarding and rp_filter inside the node netns only.
        sysctl_in_netns(
            &node.netns,
            &[
                ("net/ipv4/ip_forward", "1"),
                ("net/ipv6/conf/all/forwarding", "1"),
                ("net/ipv4/conf/all/rp_filter", "0"),
                ("net/ipv4/conf/default/rp_filter", "0"),
            ],
        )?;

        let linked: Vec<&str> = self
            .inner
            .pods
            .iter()
            .map(String::as_str)
            .chain([FOREIGN])
            .collect();
        for name in linked {
            self.link(name)?;
        }
        Ok(())
    }

    /// A netns for place `name`, linked to the node netns by a veth pair (`eth0` inside,
    /// `v-<name>` on the node), addressed and routed both ways.
    fn link(&self, name: &str) -> Result<()> {
        let node = self.place(NODE);
        let (n4, n6) = (node.ipv4.to_string(), node.ipv6.to_string());
        let p = self.place(name);
        let host_if = format!("v-{name}");
        ip(&["netns", "add", &p.netns])?;
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &p.netns,
            "type",
            "veth",
            "peer",
            "name",
            &host_if,
            "netns",
            &node.netns,
        ])?;
        for (ns, dev, ll) in [
            (&p.netns, "eth0", "fe80::2/64"),
            (&node.netns, host_if.as_str(), "fe80::1/64"),
        ] {
            // No kernel-generated link-local (it would go through DAD); a fixed one instead.
            ipn(ns, &["link", "set", dev, "addrgenmode", "none"])?;
            ipn(ns, &["link", "set", dev, "up"])?;
            ipn(ns, &["addr", "add", ll, "dev", dev, "nodad"])?;
        }
        ipn(&p.netns, &["link", "set", "lo", "up"])?;
        ipn(
            &p.netns,
            &["addr", "add", &format!("{}/32", p.ipv4), "dev", "eth0"],
        )?;
        ipn(
            &p.netns,
            &[
                "addr",
                "add",
                &format!("{}/128", p.ipv6),
                "dev",
                "eth0",
                "nodad",
            ],
        )?;
        ipn(
            &p.netns,
            &[
                "route",
                "add",
                &format!("{n4}/32"),
                "dev",
                "eth0",
                "scope",
                "link",
            ],
        )?;
        ipn(
            &p.netns,
            &["route", "add", "default", "via", &n4, "dev", "eth0"],
        )?;
        ipn(
            &p.netns,
            &[
                "-6", "route", "add", "default", "via", "fe80::1", "dev", "eth0",
            ],
        )?;
        // Node → place leaves with the node IP as source: the gateway's upstream source.
        ipn(
            &node.netns,
            &[
                "route",
                "add",
                &format!("{}/32", p.ipv4),
                "dev",
                &host_if,
                "src",
                &n4,
            ],
        )?;
        ipn(
            &node.netns,
            &[
                "-6",
                "route",
                "add",
                &format!("{}/128", p.ipv6),
                "dev",
                &host_if,
                "src",
                &n6,
            ],
        )?;
        Ok(())
    }

    /// The node's name as the gateway and Kubernetes know it (`node:` of its config,
    /// `spec.nodeName` of its pods): `sim-<name>`.
    pub fn node_name(&self) -> String {
        format!("sim-{}", self.inner.name)
    }

    /// The UID of pod `pod` (a Kubernetes UID: lower-case hex and dashes), stable for a node
    /// and pod name; the name of its cgroup with [`NodeSpec::kubelet_cgroups`].
    pub fn pod_uid(&self, pod: &str) -> String {
        pod_uid(&self.inner.prefix, pod)
    }

    /// Links this node with `other` as two machines on one network: a veth pair between the
    /// two node netns (`l-<other prefix>` on each side), routes for each other's
    /// `10.N.0.0/16` and `fd00:N::/32` through it with the node IP as source (so a gateway's
    /// upstream connections to the other node come from its node IP), and forwarding on both.
    /// A pod of one node then reaches a pod of the other, and is answered. Both keep their own
    /// gateway, cgroups and pins. Removed with either node (deleting a netns deletes the veth
    /// and the routes through it).
    pub fn link_with(&self, other: &Self) -> Result<()> {
        if self.index() == other.index() {
            return Err(Error::InvalidName {
                name: other.inner.name.clone(),
                why: "linked nodes need different address indexes (NodeSpec::index)",
            });
        }
        let (a, b) = (self.node(), other.node());
        let a_if = format!("l-{}", other.prefix());
        let b_if = format!("l-{}", self.prefix());
        ip(&[
            "link", "add", &a_if, "netns", &a.netns, "type", "veth", "peer", "name", &b_if,
            "netns", &b.netns,
        ])?;
        for (ns, dev, ll) in [
            (&a.netns, a_if.as_str(), "fe80::1/64"),
            (&b.netns, b_if.as_str(), "fe80::2/64"),
        ] {
            ipn(ns, &["link", "set", dev, "addrgenmode", "none"])?;
            ipn(ns, &["link", "set", dev, "up"])?;
            ipn(ns, &["addr", "add", ll, "dev", dev, "nodad"])?;
        }
        for (from, dev, to, ll) in [(a, &a_if, b, "fe80::2"), (b, &b_if, a, "fe80::1")] {
            let (to_v4, to_v6) = (to.ipv4.octets()[1], to.ipv6.segments()[1]);
            ipn(
                &from.netns,
                &[
                    "route",
                    "add",
                    &format!("10.{to_v4}.0.0/16"),
                    "via",
                    &to.ipv4.to_string(),
                    "dev",
                    dev,
                    "onlink",
                    "src",
                    &from.ipv4.to_string(),
                ],
            )?;
            ipn(
                &from.netns,
                &[
                    "-6",
                    "route",
                    "add",
                    &format!("fd00:{to_v6:x}::/32"),
                    "via",
                    ll,
                    "dev",
                    dev,
                    "src",
                    &from.ipv6.to_string(),
                ],
            )?;
        }
        Ok(())
    }

    /// `ng<name>`: the prefix of every netns, cgroup and pin directory of this node.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// The `N` of `10.N.0.0/16`.
    pub fn index(&self) -> u8 {
        self.inner.index
    }

    /// The node IP (v4), on the node netns' `lo`.
    pub fn ipv4(&self) -> Ipv4Addr {
        self.place(NODE).ipv4
    }

    /// The node IP (v6), on the node netns' `lo`.
    pub fn ipv6(&self) -> Ipv6Addr {
        self.place(NODE).ipv6
    }

    /// A place by name: a pod, [`HOSTNET`], [`FOREIGN`] or [`NODE`].
    pub fn get(&self, name: &str) -> Result<&Place> {
        self.inner
            .places
            .get(name)
            .ok_or_else(|| Error::NoSuchPlace(name.to_owned()))
    }

    fn place(&self, name: &str) -> &Place {
        // Invariant: the fixed places and the spec's pods are inserted in `new`.
        &self.inner.places[name]
    }

    /// A pod of the spec. Panics on an unknown name (a bug in the test).
    pub fn pod(&self, name: &str) -> &Place {
        assert!(
            self.inner.pods.iter().any(|p| p == name),
            "no pod `{name}` on node {}",
            self.inner.prefix
        );
        self.place(name)
    }

    pub fn pod_names(&self) -> &[String] {
        &self.inner.pods
    }

    /// The host-network process's place: node netns, inside the hooked cgroup.
    pub fn hostnet(&self) -> &Place {
        self.place(HOSTNET)
    }

    /// The foreign node: its own netns, routed through the node, no gateway, not hooked.
    pub fn foreign(&self) -> &Place {
        self.place(FOREIGN)
    }

    /// The node netns outside the hooked cgroup (what `kubelet` or an admin shell would be).
    pub fn node(&self) -> &Place {
        self.place(NODE)
    }

    /// The node netns name (`<prefix>-node`).
    pub fn node_netns(&self) -> &str {
        &self.place(NODE).netns
    }

    /// The cgroup the gateway hooks: `<cgroup2>/<prefix>/pods`.
    pub fn pods_cgroup(&self) -> PathBuf {
        cgroup_dir(&self.inner.prefix).join("pods")
    }

    /// The cgroup the gateway process runs in (not hooked).
    pub fn gateway_cgroup(&self) -> &Path {
        &self.inner.gateway_cgroup
    }

    /// The pin directory: `/sys/fs/bpf/<prefix>`.
    pub fn bpffs(&self) -> PathBuf {
        Path::new(BPFFS_ROOT).join(&self.inner.prefix)
    }

    /// This node's temp dir (configs, logs, decision files).
    pub fn dir(&self) -> &Path {
        &self.inner.rt.dir
    }

    pub fn tools(&self) -> &Tools {
        &self.inner.rt.tools
    }

    /// A config for this node: proxy on the node IP, admin on the node netns' loopback, node IPs
    /// as gateways, decisions in the temp dir, no services yet.
    pub fn gateway_config(&self) -> GatewayConfig {
        GatewayConfig::for_node(self)
    }

    /// Writes `config`, starts `gateway run` in the node netns and the gateway cgroup and waits
    /// until `/readyz` answers 200.
    pub fn start_gateway(&self, config: GatewayConfig) -> Result<Gateway> {
        Gateway::start(self, config)
    }

    /// [`Self::start_gateway`] with the daemon holding only `caps` (`setpriv` names).
    pub fn start_gateway_with_caps(&self, config: GatewayConfig, caps: &[&str]) -> Result<Gateway> {
        let caps = caps.iter().map(|&c| c.to_owned()).collect();
        Gateway::start_with_caps(self, config, Some(caps))
    }

    /// Starts a process in the gateway's place (node netns, gateway cgroup).
    pub(crate) fn spawn_gateway_process(&self, label: &str, cmd: Command) -> Result<Proc> {
        self.inner.rt.spawn(
            label,
            Some(self.node_netns()),
            &self.inner.gateway_cgroup,
            cmd,
        )
    }

    /// Everything this node creates, for leak checks after it is dropped.
    pub fn footprint(&self) -> Footprint {
        let netns: std::collections::BTreeSet<_> = self
            .inner
            .places
            .values()
            .map(|p| p.netns.clone())
            .collect();
        Footprint {
            netns: netns.into_iter().collect(),
            cgroup: cgroup_dir(&self.inner.prefix),
            bpffs: self.bpffs(),
            dir: self.inner.rt.dir.clone(),
        }
    }
}

/// The names a node creates (see [`Node::footprint`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Footprint {
    pub netns: Vec<String>,
    /// `<cgroup2>/<prefix>` (pods, gateway, node and foreign cgroups below it).
    pub cgroup: PathBuf,
    pub bpffs: PathBuf,
    /// The temp dir (kept after a panic, for the logs).
    pub dir: PathBuf,
}

impl Footprint {
    /// What still exists of the namespaces, the cgroup tree and the pin dir (not the temp dir).
    pub fn leftovers(&self) -> Vec<String> {
        let listed = netns_names();
        let mut left: Vec<String> = self
            .netns
            .iter()
            .filter(|ns| listed.contains(ns))
            .map(|ns| format!("netns {ns}"))
            .collect();
        for dir in [&self.cgroup, &self.bpffs] {
            if dir.exists() {
                left.push(dir.display().to_string());
            }
        }
        left
    }
}

impl Drop for NodeInner {
    fn drop(&mut self) {
        self.rt.kill_all();
        let keep_dir = thread::panicking();
        if keep_dir {
            eprintln!(
                "nodegate-tests: logs of node {} kept in {}",
                self.prefix,
                self.rt.dir.display()
            );
        }
        teardown(&self.prefix, !keep_dir);
    }
}

fn check_name(name: &str, max: usize) -> Result<()> {
    if name.is_empty() || name.len() > max {
        return Err(Error::InvalidName {
            name: name.to_owned(),
            why: "must be 1 to 10 (node) / 12 (pod) characters",
        });
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
    {
        return Err(Error::InvalidName {
            name: name.to_owned(),
            why: "only a-z and 0-9",
        });
    }
    Ok(())
}

/// A UUID-shaped, version-4-looking UID from FNV-1a hashes of the prefix and the pod name.
fn pod_uid(prefix: &str, pod: &str) -> String {
    let fnv = |salt: u8| {
        format!("{salt}/{prefix}/{pod}")
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
            })
    };
    let (a, b) = (fnv(1), fnv(2));
    format!(
        "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
        a >> 32,
        (a >> 16) & 0xffff,
        a & 0xfff,
        b >> 52,
        b & 0xffff_ffff_ffff
    )
}

/// FNV-1a of the prefix folded into 1..=249 (250 is the foreign node's third octet).
fn default_index(prefix: &str) -> u8 {
    let hash = prefix.bytes().fold(0x811c_9dc5_u32, |h, b| {
        (h ^ u32::from(b)).wrapping_mul(0x0100_0193)
    });
    u8::try_from(hash % 249).map_or(1, |v| v + 1)
}

fn cgroup_dir(prefix: &str) -> PathBuf {
    Path::new(CGROUP2_ROOT).join(prefix)
}

fn mkdir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).map_err(io_err(format!("create {}", path.display())))
}

fn ip(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    run_command(cmd, SETUP_CMD_TIMEOUT)?.ok().map(drop)
}

fn ipn(netns: &str, args: &[&str]) -> Result<()> {
    let mut cmd = Command::new("ip");
    cmd.args(["-n", netns]).args(args);
    run_command(cmd, SETUP_CMD_TIMEOUT)?.ok().map(drop)
}

static MOUNT_LOCK: Mutex<()> = Mutex::new(());

/// `mountpoint -q /sys/fs/bpf || mount -t bpf bpf /sys/fs/bpf`, once per process at a time.
fn mount_bpffs() -> Result<()> {
    let _guard = MOUNT_LOCK
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut check = Command::new("mountpoint");
    check.args(["-q", BPFFS_ROOT]);
    if run_command(check, SETUP_CMD_TIMEOUT)?.success() {
        return Ok(());
    }
    let mut mount = Command::new("mount");
    mount.args(["-t", "bpf", "bpf", BPFFS_ROOT]);
    run_command(mount, SETUP_CMD_TIMEOUT)?.ok().map(drop)
}

/// Removes what an earlier run with this prefix left behind (processes in its cgroups included).
fn cleanup(prefix: &str) {
    let cg = cgroup_dir(prefix);
    if cg.exists() {
        // Only processes in this node's own cgroup subtree: left by an earlier killed run.
        let _ = fs::write(cg.join("cgroup.kill"), "1");
        wait_unpopulated(&cg, Duration::from_secs(5));
    }
    teardown(prefix, true);
}

/// Removes the pin dir, the namespaces, the cgroups and (if `remove_dir`) the temp dir.
/// Best effort: reports what it could not remove on stderr.
fn teardown(prefix: &str, remove_dir: bool) {
    // Unpinning the links detaches the programs; unpinning the maps frees them.
    let pins = Path::new(BPFFS_ROOT).join(prefix);
    if let Err(e) = fs::remove_dir_all(&pins)
        && e.kind() != ErrorKind::NotFound
    {
        eprintln!("nodegate-tests: remove {}: {e}", pins.display());
    }
    for ns in netns_with_prefix(prefix) {
        if let Err(e) = ip(&["netns", "del", &ns]) {
            eprintln!("nodegate-tests: {e}");
        }
    }
    let cg = cgroup_dir(prefix);
    if cg.exists() && !remove_cgroup_tree(&cg) {
        // Something not recorded by us (a grandchild) still runs in our own subtree.
        let _ = fs::write(cg.join("cgroup.kill"), "1");
        wait_unpopulated(&cg, Duration::from_secs(5));
        if !remove_cgroup_tree(&cg) {
            eprintln!("nodegate-tests: could not remove cgroup {}", cg.display());
        }
    }
    if remove_dir {
        let dir = Path::new(TMP_ROOT).join(prefix);
        if let Err(e) = fs::remove_dir_all(&dir)
            && e.kind() != ErrorKind::NotFound
        {
            eprintln!("nodegate-tests: remove {}: {e}", dir.display());
        }
    }
}

/// Every named network namespace (`/run/netns`).
fn netns_names() -> Vec<String> {
    fs::read_dir("/run/netns")
        .map(|entries| {
            entries
                .filter_map(|e| e.ok()?.file_name().into_string().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Network namespaces named `<prefix>-*`.
fn netns_with_prefix(prefix: &str) -> Vec<String> {
    let start = format!("{prefix}-");
    netns_names()
        .into_iter()
        .filter(|name| name.starts_with(&start))
        .collect()
}

/// rmdir every cgroup below and including `dir`, leaves first. True if `dir` is gone.
fn remove_cgroup_tree(dir: &Path) -> bool {
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                remove_cgroup_tree(&entry.path());
            }
        }
    }
    // A cgroup whose last process just exited can be briefly busy.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match fs::remove_dir(dir) {
            Ok(()) => return true,
            Err(e) if e.kind() == ErrorKind::NotFound => return true,
            Err(_) if Instant::now() < deadline => thread::sleep(POLL),
            Err(_) => return false,
        }
    }
}

fn wait_unpopulated(cg: &Path, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let populated = fs::read_to_string(cg.join("cgroup.events"))
            .is_ok_and(|s| s.lines().any(|l| l == "populated 1"));
        if !populated {
            return;
        }
        thread::sleep(POLL);
    }
}
