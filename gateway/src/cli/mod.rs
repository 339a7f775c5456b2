//! The command line: `run`, `check-config`, `counters`, `status`, `detach`, `explain`,
//! `decisions`, `crd`. Exit codes: 0 ok (`explain`: allow), 2 `explain`: deny, 64 config or usage
//! error (`EX_USAGE`), 1 runtime error.

mod dataplane;
mod decisions;
mod explain;
mod inspect;
mod reload;
mod run;
mod table;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
};

use clap::{Args, Parser, Subcommand};

use crate::{
    admin::AdminError,
    config::{Config, ConfigError},
    ebpf::{self, EbpfError},
    proxy::ProxyError,
    telemetry::{self, TelemetryError},
};

const EXIT_USAGE: u8 = 64;
const EXIT_RUNTIME: u8 = 1;

#[derive(Debug, Parser)]
#[command(
    name = "gateway",
    version,
    about = "Nodegate: a kernel-enforced access gateway for Kubernetes nodes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and attach the eBPF programs, sync the maps, run the proxy and the admin server.
    Run {
        /// Config file (YAML). Without it, the embedded default config.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Replaces `node` (the `DaemonSet` passes `$(NODE_NAME)` from the downward API; with a
        /// `kubernetes` section only this node's pods are watched).
        #[arg(long, value_name = "NAME")]
        node: Option<String>,
        /// Replaces `proxy.listen`: `ADDR:PORT`, or the node's addresses, comma-separated (a
        /// bare IP listens on port 15001; at most one IPv4 and one IPv6, which becomes
        /// `proxy.listen_v6`). The `DaemonSet` passes `$(HOST_IP),$(HOST_IPS)`.
        #[arg(long, value_name = "ADDR[,ADDR]")]
        proxy_listen: Option<String>,
        /// Replaces `kubernetes.peers_namespace`: where the gateway pods of the other nodes
        /// run (the `DaemonSet` passes `$(POD_NAMESPACE)`).
        #[arg(long, value_name = "NAMESPACE")]
        peers_namespace: Option<String>,
        /// Replaces `kubernetes.kubeconfig` (development: run outside the cluster).
        #[arg(long, value_name = "FILE")]
        kubeconfig: Option<PathBuf>,
    },
    /// Bypass counters per service, source, reason and action, from the pinned maps.
    Counters {
        #[command(flatten)]
        pins: Pins,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Attached programs and links, protected destinations, gateways, services and modes.
    Status {
        #[command(flatten)]
        pins: Pins,
        /// JSON instead of tables.
        #[arg(long)]
        json: bool,
        /// The running daemon's admin address, for its readiness and the Kubernetes source's
        /// health (default: the config's `admin.listen`, else 127.0.0.1:15021).
        #[arg(long, value_name = "ADDR")]
        admin: Option<SocketAddr>,
    },
    /// Validate a config file: exit 0 with a summary, or a message and exit 64.
    CheckConfig {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Remove the pinned links (detaching the programs) and the pinned maps.
    Detach {
        #[command(flatten)]
        pins: Pins,
    },
    /// What the gateway would decide for one HTTP request: the decision, the deciding rule
    /// and every rule's verdict. From the running gateway's live state (its admin server:
    /// Kubernetes services and their `AccessPolicy`, the node's pods, the keys as loaded), or
    /// from a config file with `--config`. Exit 0 allow, 2 deny, 64 bad input.
    Explain(explain::Args),
    /// Show the decision log file as a table (or its JSON lines), filtered.
    Decisions {
        /// The decision log file.
        #[arg(long, short, value_name = "FILE", conflicts_with = "config")]
        file: Option<PathBuf>,
        /// Take the file from this config's `log.decisions_file`.
        #[arg(long, short, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Only `deny` and `would_deny`.
        #[arg(long)]
        deny: bool,
        #[arg(long)]
        service: Option<String>,
        /// RFC 3339 time, or an age: 90s, 10m, 1h, 2d.
        #[arg(long, value_name = "T")]
        since: Option<String>,
        /// Keep reading as lines are appended.
        #[arg(long)]
        follow: bool,
        /// The matching JSON lines instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Print the `AccessPolicy` `CustomResourceDefinition` (YAML), generated from the policy
    /// types: `daemonset/crd.yaml`.
    Crd,
}

/// Where the pins are: from a config's `bpffs`, or given directly.
#[derive(Debug, Args)]
struct Pins {
    /// Take the pin directory from this config file.
    #[arg(long, short, value_name = "FILE", conflicts_with = "bpffs")]
    config: Option<PathBuf>,
    /// The pin directory.
    #[arg(long, value_name = "DIR")]
    bpffs: Option<PathBuf>,
}

impl Pins {
    fn dir(&self) -> Result<PathBuf, CliError> {
        match (&self.config, &self.bpffs) {
            (Some(config), _) => Ok(Config::load(config)?.bpffs),
            (None, Some(dir)) => Ok(dir.clone()),
            (None, None) => Ok(PathBuf::from(ebpf::DEFAULT_BPFFS)),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{context}")]
    Ebpf {
        context: String,
        #[source]
        source: EbpfError,
    },
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error(transparent)]
    Telemetry(#[from] TelemetryError),
    #[error(transparent)]
    Auth(#[from] crate::auth::SetupError),
    #[error("cannot start the {what} runtime")]
    Runtime {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot install the {signal} handler")]
    Signal {
        signal: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write the output")]
    Output(#[source] std::io::Error),
    #[error("the proxy stopped unexpectedly")]
    ProxyTask(#[source] tokio::task::JoinError),
    #[error("{0}")]
    Input(String),
    #[error("cannot start the Kubernetes source")]
    Kubernetes(#[source] crate::source::kubernetes::KubeError),
    /// `explain` decided deny (not an error: exit code 2, the output says why).
    #[error("denied")]
    Denied,
}

impl CliError {
    fn ebpf(context: impl Into<String>) -> impl FnOnce(EbpfError) -> Self {
        let context = context.into();
        move |source| Self::Ebpf { context, source }
    }

    fn exit_code(&self) -> u8 {
        match self {
            // A Kubernetes source that cannot start (no node name, no kubeconfig) is a
            // deployment mistake, not a passing failure.
            Self::Config(_) | Self::Auth(_) | Self::Input(_) | Self::Kubernetes(_) => EXIT_USAGE,
            Self::Denied => explain::EXIT_DENY,
            _ => EXIT_RUNTIME,
        }
    }
}

/// The message and its causes on one line: `error: a: b: c`.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // `#[error(transparent)]` and friends repeat their source's text.
        if !out.ends_with(&cause_text) {
            out.push_str(": ");
            out.push_str(&cause_text);
        }
        source = cause.source();
    }
    out
}

pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => {
            let code = if err.use_stderr() { EXIT_USAGE } else { 0 };
            // clap formats help, version and usage errors itself.
            let _ = err.print();
            return ExitCode::from(code);
        }
    };
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(CliError::Denied) => ExitCode::from(explain::EXIT_DENY),
        Err(err) => {
            eprintln!("error: {}", error_chain(&err));
            ExitCode::from(err.exit_code())
        }
    }
}

fn dispatch(command: Command) -> Result<(), CliError> {
    if !matches!(command, Command::Run { .. }) {
        // Short-lived commands: warnings only, unless RUST_LOG says otherwise. A second
        // subscriber cannot be installed, which is harmless here.
        let _ = telemetry::init_cli("warn");
    }
    match command {
        Command::Run {
            config,
            node,
            proxy_listen,
            peers_namespace,
            kubeconfig,
        } => run::run(
            config.as_deref(),
            &crate::config::Overrides {
                node,
                proxy_listen,
                peers_namespace,
                kubeconfig,
            },
        ),
        Command::CheckConfig { file } => check_config(&file),
        Command::Counters { pins, json } => inspect::counters(&pins.dir()?, json),
        Command::Status { pins, json, admin } => {
            let admin = match (admin, &pins.config) {
                (Some(addr), _) => addr,
                (None, Some(config)) => Config::load(config)?.admin.listen,
                (None, None) => crate::config::DEFAULT_ADMIN_LISTEN,
            };
            inspect::status(&pins.dir()?, json, admin)
        }
        Command::Detach { pins } => inspect::detach(&pins.dir()?),
        Command::Explain(args) => explain::run(args),
        Command::Decisions {
            file,
            config,
            deny,
            service,
            since,
            follow,
            json,
        } => {
            let file = match (file, config) {
                (Some(file), _) => file,
                (None, Some(config)) => {
                    Config::load(&config)?.log.decisions_file.ok_or_else(|| {
                        CliError::Input(format!(
                            "{} has no log.decisions_file: decision lines only went to stdout",
                            config.display()
                        ))
                    })?
                }
                (None, None) => {
                    return Err(CliError::Input(
                        "give --file FILE or --config FILE (its log.decisions_file)".into(),
                    ));
                }
            };
            let since = since
                .map(|s| decisions::parse_since(&s, std::time::SystemTime::now()))
                .transpose()?;
            let filter = decisions::Filter {
                deny,
                service,
                since,
            };
            decisions::show(&file, &filter, follow, json)
        }
        Command::Crd => crd(),
    }
}

fn crd() -> Result<(), CliError> {
    use std::io::Write as _;
    let yaml = crate::source::crd::crd_yaml()
        .map_err(|e| CliError::Input(format!("cannot render the CRD: {e}")))?;
    match std::io::stdout().write_all(yaml.as_bytes()) {
        // A closed pipe (`| head`) is not an error worth reporting.
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(CliError::Output(e)),
        _ => Ok(()),
    }
}

fn check_config(file: &Path) -> Result<(), CliError> {
    let config = Config::load(file)?;
    println!("ok: {}: {}", file.display(), config.summary());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usage_and_flags() {
        let parse = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("gateway").chain(args.iter().copied()))
        };
        assert!(matches!(
            parse(&["run"]).unwrap().command,
            Command::Run {
                config: None,
                node: None,
                ..
            }
        ));
        match parse(&[
            "run",
            "--config=/etc/nodegate/config.yaml",
            "--node=worker-1",
            "--proxy-listen=10.0.0.5:15001",
            "--peers-namespace=nodegate-system",
        ])
        .unwrap()
        .command
        {
            Command::Run {
                config,
                node,
                proxy_listen,
                peers_namespace,
                kubeconfig,
            } => {
                assert_eq!(
                    config.as_deref(),
                    Some(Path::new("/etc/nodegate/config.yaml"))
                );
                assert_eq!(node.as_deref(), Some("worker-1"));
                assert_eq!(proxy_listen.as_deref(), Some("10.0.0.5:15001"));
                assert_eq!(peers_namespace.as_deref(), Some("nodegate-system"));
                assert!(kubeconfig.is_none());
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse(&["counters", "--json", "--bpffs", "/x"])
                .unwrap()
                .command,
            Command::Counters { json: true, .. }
        ));
        let err = parse(&["status", "--config", "a.yaml", "--bpffs", "/x"]).unwrap_err();
        assert!(err.use_stderr());
        assert!(parse(&["check-config"]).is_err());
        assert!(parse(&["frobnicate"]).is_err());
    }

    #[test]
    fn pin_dir_defaults_and_overrides() {
        let pins = Pins {
            config: None,
            bpffs: None,
        };
        assert_eq!(pins.dir().unwrap(), PathBuf::from(ebpf::DEFAULT_BPFFS));
        let pins = Pins {
            config: None,
            bpffs: Some("/sys/fs/bpf/t1".into()),
        };
        assert_eq!(pins.dir().unwrap(), PathBuf::from("/sys/fs/bpf/t1"));
    }

    #[test]
    fn config_errors_exit_64_with_the_cause() {
        let err =
            CliError::from(Config::load(Path::new("/nonexistent/nodegate.yaml")).unwrap_err());
        assert_eq!(err.exit_code(), EXIT_USAGE);
        let text = error_chain(&err);
        assert!(
            text.starts_with("cannot read config file /nonexistent/nodegate.yaml: "),
            "{text}"
        );
        assert!(text.contains("No such file"), "{text}");
    }

    /// The `DaemonSet`'s container args are flags `gateway run` takes, and with the downward API
    /// values filled in they turn the `ConfigMap`'s config into a valid Kubernetes-mode config.
    #[test]
    fn the_daemonset_args_and_configmap_make_a_valid_config() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemonset");
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap();
        let ds: serde_yaml::Value = serde_yaml::from_str(&read("daemonset.yaml")).unwrap();
        let container = &ds["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<String> = container["args"]
            .as_sequence()
            .expect("args")
            .iter()
            .map(|a| {
                a.as_str()
                    .unwrap()
                    .replace("$(NODE_NAME)", "worker-1")
                    .replace("$(HOST_IPS)", "10.0.0.5,fd00::5")
                    .replace("$(HOST_IP)", "10.0.0.5")
                    .replace("$(POD_NAMESPACE)", "nodegate-system")
            })
            .collect();
        // Every $(VAR) the args use comes from the container's env.
        let env: Vec<&str> = container["env"]
            .as_sequence()
            .expect("env")
            .iter()
            .filter_map(|e| e["name"].as_str())
            .collect();
        for var in ["NODE_NAME", "HOST_IP", "POD_NAMESPACE"] {
            assert!(
                env.contains(&var),
                "{var} not in the DaemonSet's env: {env:?}"
            );
        }
        let cli = Cli::try_parse_from(std::iter::once("gateway".to_owned()).chain(args))
            .unwrap_or_else(|e| panic!("{e}"));
        let Command::Run {
            config: Some(config_path),
            node,
            proxy_listen,
            peers_namespace,
            kubeconfig,
        } = cli.command
        else {
            panic!("not `run --config`: {:?}", cli.command);
        };
        assert_eq!(config_path, Path::new("/etc/nodegate/config.yaml"));
        let cm: serde_yaml::Value = serde_yaml::from_str(&read("configmap.yaml")).unwrap();
        let text = cm["data"]["config.yaml"]
            .as_str()
            .expect("config.yaml in the ConfigMap");
        let overrides = crate::config::Overrides {
            node,
            proxy_listen,
            peers_namespace,
            kubeconfig,
        };
        let config =
            Config::parse_overridden(text, crate::config::Origin::File(config_path), &overrides)
                .unwrap_or_else(|e| panic!("{}", error_chain(&e)));
        assert_eq!(config.node, "worker-1");
        assert_eq!(config.proxy.listen, "10.0.0.5:15001".parse().unwrap());
        assert_eq!(
            config.proxy.listen_v6,
            Some("[fd00::5]:15001".parse().unwrap()),
            "dual-stack: the node's IPv6 address too"
        );
        let k = config.kubernetes.expect("Kubernetes mode");
        assert_eq!(k.peers_namespace.as_deref(), Some("nodegate-system"));
        assert!(k.kubeconfig.is_none(), "in-cluster");
        assert!(config.services.is_empty(), "services come from the API");
        assert!(config.kube_services.is_empty());
    }

    /// The `ConfigMap`'s commented `kubernetes.services` example, uncommented, has the right
    /// shape: its only problem here is the certificate that Secret `nodegate-tls` would provide.
    #[test]
    fn the_configmaps_services_example_parses() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../daemonset/configmap.yaml");
        let cm: serde_yaml::Value =
            serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let text = cm["data"]["config.yaml"]
            .as_str()
            .expect("config.yaml in the ConfigMap");
        let marker = "  # services:";
        let start = text.find(marker).expect("the services example");
        let commented: Vec<&str> = text[start..]
            .lines()
            .take_while(|l| l.starts_with("  # "))
            .collect();
        let end = start + commented.iter().map(|l| l.len() + 1).sum::<usize>();
        let mut example = String::new();
        for line in &commented {
            example.push_str("  ");
            example.push_str(&line["  # ".len()..]);
            example.push('\n');
        }
        let uncommented = format!("{}{example}{}", &text[..start], &text[end..]);
        assert!(uncommented.contains("\n  services:\n"), "{uncommented}");
        let err = Config::parse_overridden(
            &uncommented,
            crate::config::Origin::File("/etc/nodegate/config.yaml".into()),
            &crate::config::Overrides {
                node: Some("worker-1".into()),
                proxy_listen: Some("10.0.0.5:15001".into()),
                peers_namespace: Some("nodegate-system".into()),
                kubeconfig: None,
            },
        )
        .expect_err("the certificate files are not here");
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("{}", error_chain(&err));
        };
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert_eq!(
            problems[0].path,
            "kubernetes.services[\"monitoring/grafana\"].tls.cert_file"
        );
        assert!(
            problems[0]
                .message
                .contains("cannot read /etc/nodegate-tls/grafana.crt"),
            "{problems:?}"
        );
    }
}
