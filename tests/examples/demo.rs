//! `cargo xtask demo`: the gateway on a simulated node, narrated.
//!
//! Builds a node (network namespaces + cgroup v2 on the real kernel), runs `gateway run` with
//! the `grafana` service of the bundled `gateway/config/example.yaml`, and shows an allowed
//! connection, a denied one (and `gateway explain` saying why) and a bypass attempt with the
//! kernel counter moving, then the decision log, and removes everything. Needs root, the gateway binary
//! (`NODEGATE_GATEWAY_BIN` or `target/debug/gateway`) and `ngpeer` next to this example's
//! directory; `cargo xtask demo` builds both first.

use std::{
    error::Error,
    fs,
    net::{IpAddr, SocketAddr},
    path::Path,
    process::{Command, ExitCode},
    time::Duration,
};

use nodegate_tests::harness::{
    Gateway, Mode, Node, NodeSpec, Place, ServiceConfig, Tools, workspace_dir,
};
use serde_json::Value;

type DemoResult<T = ()> = Result<T, Box<dyn Error>>;

/// The example config's addresses are in 10.77.0.0/16; a node with index 77 puts its node IP
/// (10.77.0.1, the example's proxy address) and its pods (10.77.1.x) there too.
const NODE_INDEX: u8 = 77;
const CLIENT: &str = "client";
const BACKEND: &str = "grafana";
const REASON_BYPASS: &str = "not_from_gateway";
const ACTION_DROPPED: &str = "dropped";
const CURL_TIMEOUT_S: u64 = 3;
const LOG_WAIT: Duration = Duration::from_secs(5);

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("\ndemo failed: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The part of the example's first service the demo keeps.
struct ExampleService {
    name: String,
    mode: Mode,
    vips: Vec<SocketAddr>,
    endpoint_port: u16,
    allow_sources: Vec<String>,
}

fn run() -> DemoResult {
    let example_path = workspace_dir()
        .join("gateway")
        .join("config")
        .join("example.yaml");
    let example = example_service(&example_path)?;
    println!(
        "Nodegate demo: one simulated node, one gateway; an allowed, a denied and a bypassing connection."
    );

    let node = build_node(&example)?;
    let _server = node.pod(BACKEND).serve(example.endpoint_port, BACKEND)?;
    let gateway = start_gateway(&node, &example, &example_path)?;
    let demo = Demo {
        node: &node,
        gateway: &gateway,
        example: &example,
        endpoint: node.pod(BACKEND).v4(example.endpoint_port),
        vip: example
            .vips
            .iter()
            .copied()
            .find(SocketAddr::is_ipv4)
            .ok_or("the example's first service has no IPv4 VIP")?,
    };
    demo.allowed()?;
    demo.denied()?;
    demo.bypass()?;

    step(6, "The decision log");
    say(&format!(
        "Every line as the gateway wrote it (stdout and log.decisions_file = {}):",
        gateway.config().decisions_file.display()
    ));
    show(&gateway.decision_text());

    clean_up(node, gateway)?;
    println!("\nDone.");
    Ok(())
}

fn build_node(example: &ExampleService) -> DemoResult<Node> {
    step(1, "Build a simulated node on this machine's kernel");
    let node = Node::new(
        NodeSpec::new("demo")
            .index(NODE_INDEX)
            .pods(&[CLIENT, BACKEND])
            .tools(tools()?),
    )?;
    let (client, backend) = (node.pod(CLIENT), node.pod(BACKEND));
    say(&format!(
        "node `{}`: a network namespace stands for the node's host network; the gateway runs there.",
        node.prefix()
    ));
    say(&format!("  node IP            {}", node.ipv4()));
    say(&format!(
        "  pod `{CLIENT}`         {}   a client",
        client.ipv4
    ));
    say(&format!(
        "  pod `{BACKEND}`        {}   the backend: an HTTP server on :{}",
        backend.ipv4, example.endpoint_port
    ));
    say(&format!(
        "  host-network proc  {}    runs in the node's network, like a hostNetwork pod",
        node.hostnet().ipv4
    ));
    say(&format!(
        "  foreign node       {}  another node without a gateway, routed through this one",
        node.foreign().ipv4
    ));
    say(&format!(
        "Pods and the host-network process sit in cgroup {}, which the gateway hooks.",
        node.pods_cgroup().display()
    ));
    Ok(node)
}

fn start_gateway(
    node: &Node,
    example: &ExampleService,
    example_path: &Path,
) -> DemoResult<Gateway> {
    step(2, "Start the gateway with the bundled example config");
    say(&format!(
        "From {}: service `{}` ({} mode), VIPs {}, allowed sources {}.",
        example_path.display(),
        example.name,
        example.mode.as_str(),
        join(&example.vips),
        example.allow_sources.join(", ")
    ));
    say("Adapted to this node: its cgroup, pin directory, listeners and log file; the service's");
    say(&format!(
        "endpoints become pod `{BACKEND}`. The config the gateway runs with:"
    ));
    let backend = node.pod(BACKEND);
    let mut service = ServiceConfig::new(&example.name, example.mode)
        .endpoint(backend.v4(example.endpoint_port))
        .endpoint(backend.v6(example.endpoint_port));
    for vip in &example.vips {
        service = service.vip(*vip);
    }
    for cidr in &example.allow_sources {
        service = service.allow(cidr);
    }
    let config = node.gateway_config().service(service);
    show(&config.to_yaml());
    let gateway = node.start_gateway(config)?;
    say(&format!(
        "`gateway run` is up (pid {}): programs attached, maps synced, /readyz answers 200.",
        gateway.pid()
    ));
    let bpffs = node.bpffs().to_string_lossy().into_owned();
    println!("\n  $ gateway status --bpffs {bpffs}");
    show(&gateway.cli(&["status", "--bpffs", &bpffs])?.stdout);
    Ok(gateway)
}

/// The running demo: the node, its gateway and the addresses the steps use.
struct Demo<'a> {
    node: &'a Node,
    gateway: &'a Gateway,
    example: &'a ExampleService,
    /// The backend pod's IPv4 endpoint.
    endpoint: SocketAddr,
    /// The service's IPv4 VIP.
    vip: SocketAddr,
}

impl Demo<'_> {
    fn allowed(&self) -> DemoResult {
        step(3, "Allowed: a pod inside allow_sources calls the service");
        let client = self.node.pod(CLIENT);
        say(&format!(
            "Pod `{CLIENT}` ({}) is inside {}. Its connect() to the VIP {} is rewritten in the",
            client.ipv4,
            self.example.allow_sources.join(", "),
            self.vip
        ));
        say("kernel (cgroup/connect4) to the gateway's proxy, which recovers the original");
        say(&format!(
            "destination, applies the rule and forwards to pod `{BACKEND}`."
        ));
        let allowed = curl(client, &format!("http://{}/", self.vip))?;
        show_decision(&connection_line(self.gateway, allowed.local)?);
        say(&format!(
            "Dialing the pod IP {} directly from this node is redirected the same way (not a bypass):",
            self.endpoint
        ));
        let direct = curl(client, &format!("http://{}/", self.endpoint))?;
        show_decision(&connection_line(self.gateway, direct.local)?);
        Ok(())
    }

    fn denied(&self) -> DemoResult {
        step(4, "Denied: a caller outside allow_sources");
        let hostnet = self.node.hostnet();
        say(&format!(
            "The host-network process ({}) is redirected too, but its address is not in allow_sources:",
            hostnet.ipv4
        ));
        say("the proxy resets the connection and never connects to the backend.");
        curl(hostnet, &format!("http://{}/", self.vip))?;
        // A reset that quick often reaches curl while it is still connecting, so it cannot
        // report its port: find the line by source address and destination.
        let (source, vip) = (IpAddr::V4(hostnet.ipv4), self.vip);
        let line =
            self.gateway
                .wait_decision(&format!("denying {source} -> {vip}"), LOG_WAIT, |d| {
                    field(d, "kind") == "connection"
                        && field(d, "decision") == "deny"
                        && field(d, "dst").parse::<SocketAddr>().ok() == Some(vip)
                        && field(d, "src").parse::<SocketAddr>().ok().map(|a| a.ip())
                            == Some(source)
                })?;
        show_decision(&line);

        say("Why? `gateway explain` asks the running gateway (its admin server, on the node):");
        let admin = self.gateway.config().admin.to_string();
        let args = [
            "explain",
            "--admin",
            &admin,
            "--service",
            &self.example.name,
            "--path",
            "/",
            "--source",
            &source.to_string(),
        ];
        println!("\n  $ gateway {}", args.join(" "));
        let mut cmd = Command::new(self.node.tools().require_gateway()?);
        cmd.args(args);
        let out = self.node.node().run(cmd, Duration::from_secs(20))?;
        show(&out.stdout);
        if out.code() != Some(2) {
            return Err(format!("explain should say deny (exit 2): {out:?}").into());
        }
        Ok(())
    }

    fn bypass(&self) -> DemoResult {
        step(
            5,
            "Bypass attempt: another node dials the backend pod directly",
        );
        let foreign = self.node.foreign();
        say(&format!(
            "The foreign node ({}) has no gateway; it sends its SYNs straight to {}.",
            foreign.ipv4, self.endpoint
        ));
        say("The cgroup_skb/ingress program drops every packet to a protected endpoint that does");
        say("not come from a gateway address, and counts it per service, source and reason.");
        let bpffs = self.node.bpffs().to_string_lossy().into_owned();
        let syns = || -> DemoResult<u64> {
            Ok(self.gateway.counters()?.syns(
                &self.example.name,
                IpAddr::V4(foreign.ipv4),
                REASON_BYPASS,
                ACTION_DROPPED,
            ))
        };
        let before = syns()?;
        println!("\n  counters before:\n  $ gateway counters --bpffs {bpffs}");
        show(&self.gateway.cli(&["counters", "--bpffs", &bpffs])?.stdout);
        curl(foreign, &format!("http://{}/", self.endpoint))?;
        let source = foreign.ipv4.to_string();
        let line =
            self.gateway
                .wait_decision("for the bypass from the foreign node", LOG_WAIT, |d| {
                    field(d, "kind") == "bypass" && field(d, "src").starts_with(&source)
                })?;
        let after = syns()?;
        println!("\n  counters after:\n  $ gateway counters --bpffs {bpffs}");
        show(&self.gateway.cli(&["counters", "--bpffs", &bpffs])?.stdout);
        say(&format!(
            "SYNs from {} to `{}` dropped and counted: {before} -> {after} (every retransmit is an attempt).",
            foreign.ipv4, self.example.name
        ));
        show_decision(&line);
        Ok(())
    }
}

/// Stops and detaches the gateway, removes the node, and checks that nothing is left.
fn clean_up(node: Node, gateway: Gateway) -> DemoResult {
    step(7, "Clean up");
    let bpffs = node.bpffs().to_string_lossy().into_owned();
    let footprint = node.footprint();
    gateway.stop(Duration::from_secs(10));
    say("Stopped the gateway (SIGTERM). Its programs stay attached through the pinned links");
    say("(fail closed) until they are detached:");
    println!("\n  $ gateway detach --bpffs {bpffs}");
    show(&gateway.detach()?.stdout);
    drop(gateway);
    drop(node);
    let mut left = footprint.leftovers();
    if footprint.dir.exists() {
        left.push(footprint.dir.display().to_string());
    }
    if !left.is_empty() {
        return Err(format!("left behind: {}", left.join(", ")).into());
    }
    say(&format!(
        "Removed {} network namespaces, the cgroups, the pin directory and the temp files.",
        footprint.netns.len()
    ));
    Ok(())
}

/// The harness's tools: `ngpeer` from this build (examples live in `target/<profile>/examples`).
fn tools() -> DemoResult<Tools> {
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or("cannot locate the target directory from the demo's path")?;
    let tools = Tools::from_env().with_ngpeer(profile_dir.join("ngpeer"));
    tools.require_gateway()?;
    tools.require_ngpeer()?;
    Ok(tools)
}

fn example_service(path: &Path) -> DemoResult<ExampleService> {
    let text = fs::read_to_string(path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let doc: serde_yaml::Value =
        serde_yaml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let service = doc
        .get("services")
        .and_then(|s| s.get(0))
        .ok_or_else(|| format!("{}: no services", path.display()))?;
    let strings = |key: &str| -> Vec<String> {
        service
            .get(key)
            .and_then(serde_yaml::Value::as_sequence)
            .map(|items| {
                items
                    .iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let addrs = |key: &str| -> DemoResult<Vec<SocketAddr>> {
        strings(key)
            .iter()
            .map(|s| s.parse().map_err(|e| format!("{key} `{s}`: {e}").into()))
            .collect()
    };
    let endpoint_port = addrs("endpoints")?
        .first()
        .map(SocketAddr::port)
        .ok_or("the example's first service has no endpoints")?;
    Ok(ExampleService {
        name: service
            .get("name")
            .and_then(serde_yaml::Value::as_str)
            .ok_or("the example's first service has no name")?
            .to_owned(),
        mode: match service.get("mode").and_then(serde_yaml::Value::as_str) {
            Some("audit") => Mode::Audit,
            _ => Mode::Enforce,
        },
        vips: addrs("vips")?,
        endpoint_port,
        allow_sources: strings("allow_sources"),
    })
}

/// What `curl` did.
struct Curl {
    /// The client's address, as the proxy and the server see it (`None` if it never connected).
    local: Option<SocketAddr>,
}

/// `curl` from `place`, printed with its outcome.
fn curl(place: &Place, url: &str) -> DemoResult<Curl> {
    let max_time = CURL_TIMEOUT_S.to_string();
    println!(
        "\n  $ curl -sS --max-time {max_time} {url}      # in {} ({})",
        place.name, place.ipv4
    );
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "--max-time",
        &max_time,
        "-w",
        "\n%{local_ip} %{local_port}",
    ])
    .arg(url);
    let out = place.run(cmd, Duration::from_secs(CURL_TIMEOUT_S + 5))?;
    let (body, local) = out
        .stdout
        .rsplit_once('\n')
        .unwrap_or(("", out.stdout.as_str()));
    let local = local
        .split_once(' ')
        .and_then(|(ip, port)| Some(SocketAddr::new(ip.parse().ok()?, port.parse().ok()?)))
        .filter(|addr| addr.port() != 0);
    if out.success() {
        show(body);
    } else {
        show(&format!(
            "{}(curl exit code {})",
            out.stderr,
            out.code()
                .map_or_else(|| "killed".to_owned(), |c| c.to_string())
        ));
    }
    Ok(Curl { local })
}

/// The `connection` decision line of the connection from `src`.
fn connection_line(gateway: &Gateway, src: Option<SocketAddr>) -> DemoResult<Value> {
    let src = src.ok_or("curl did not report its local address")?;
    Ok(
        gateway.wait_decision(&format!("for the connection from {src}"), LOG_WAIT, |d| {
            field(d, "kind") == "connection"
                && field(d, "src").parse::<SocketAddr>().ok() == Some(src)
        })?,
    )
}

fn field<'a>(value: &'a Value, key: &str) -> &'a str {
    value.get(key).and_then(Value::as_str).unwrap_or("")
}

/// One decision line in words, then as written.
fn show_decision(line: &Value) {
    let summary = match field(line, "kind") {
        "bypass" => format!(
            "decision log: bypass, service {}, {} -> {}, reason {}, {}",
            field(line, "service"),
            field(line, "src"),
            field(line, "dst"),
            field(line, "reason"),
            field(line, "action")
        ),
        _ => format!(
            "decision log: {}, service {}, {} -> {}{}, reason {}",
            field(line, "decision"),
            field(line, "service"),
            field(line, "src"),
            field(line, "dst"),
            match field(line, "upstream") {
                "" => String::new(),
                upstream => format!(" (forwarded to {upstream})"),
            },
            field(line, "reason")
        ),
    };
    println!("  {summary}");
    show(&line.to_string());
}

fn step(n: u32, title: &str) {
    println!("\n[{n}] {title}");
}

fn say(text: &str) {
    println!("  {text}");
}

/// Output of a command or a file, indented and framed.
fn show(text: &str) {
    for line in text.trim_end().lines() {
        println!("    | {line}");
    }
}

fn join(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}
