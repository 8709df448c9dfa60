//! `ciliate policy import|get|delete|wait` and `ciliate bpf policy get`.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use ciliate_api::{
    client::method,
    http::escape,
    models::{Identity, PolicyChange, PolicyImport, TracePeer, TraceRequest},
};
use ciliate_common::policy::{self, ANY_IDENTITY, F_DENY, F_MARKER};
use ciliate_datapath::maps::PolicyMap;
use clap::Subcommand;
use serde::Serialize;

use crate::{
    table::{Output, Table},
    target::Target,
};

#[derive(Subcommand)]
pub enum PolicyCommand {
    /// Import policy documents (YAML or JSON; CiliumNetworkPolicy,
    /// CiliumClusterwideNetworkPolicy, Kubernetes NetworkPolicy). All or
    /// nothing: a file with any error, or a policy the maps cannot hold,
    /// changes nothing.
    Import { file: std::path::PathBuf },
    /// The rules in force and the policy revision
    Get {
        #[arg(short = 'o', long, value_enum, default_value = "json")]
        output: Output,
    },
    /// Delete the rules carrying all the given labels (k8s:key=value), or --all
    Delete {
        labels: Vec<String>,
        #[arg(long)]
        all: bool,
    },
    /// Would SRC reach DST on PROTO/DPORT? Says which rules decide and why
    Trace {
        /// Source endpoint ID
        #[arg(long)]
        src_endpoint: Option<u16>,
        /// Source identity
        #[arg(long)]
        src_identity: Option<u32>,
        /// Source labels (k8s:app=web), repeatable
        #[arg(long = "src")]
        src_labels: Vec<String>,
        #[arg(long)]
        dst_endpoint: Option<u16>,
        #[arg(long)]
        dst_identity: Option<u32>,
        #[arg(long = "dst")]
        dst_labels: Vec<String>,
        /// Destination port (ICMP: the type)
        #[arg(long)]
        dport: u16,
        /// tcp, udp or icmp
        #[arg(long, default_value = "tcp")]
        proto: String,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The selectors of the policy in force and the identities each selects
    Selectors {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Wait until every endpoint has policy revision REV in its maps
    Wait {
        revision: u64,
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
}

impl PolicyCommand {
    pub fn run(self, t: &Target) -> anyhow::Result<()> {
        let client = t.client()?;
        match self {
            PolicyCommand::Import { file } => {
                let text = std::fs::read_to_string(&file)
                    .with_context(|| format!("reading {}", file.display()))?;
                let r: PolicyChange = client
                    .call(method::PUT, "/v1/policy", Some(&PolicyImport { text }))
                    .with_context(|| format!("importing {}", file.display()))?;
                println!("Revision: {} ({} rules imported)", r.revision, r.rules);
            }
            PolicyCommand::Get { output } => {
                let p: serde_json::Value = client.get("/v1/policy")?;
                match output {
                    Output::Json => println!("{}", serde_json::to_string_pretty(&p)?),
                    Output::Table => {
                        let mut tb = Table::new(&["SOURCE", "LABELS"]);
                        for r in p["rules"].as_array().into_iter().flatten() {
                            let labels: Vec<&str> = r["labels"]
                                .as_array()
                                .into_iter()
                                .flatten()
                                .filter_map(|l| l.as_str())
                                .collect();
                            tb.row(vec![
                                r["source"].as_str().unwrap_or("").into(),
                                labels.join(" "),
                            ]);
                        }
                        print!("{}", tb.render());
                        println!("Revision: {}", p["revision"]);
                    }
                }
            }
            PolicyCommand::Delete { labels, all } => {
                anyhow::ensure!(
                    all || !labels.is_empty(),
                    "give labels of the rules to delete, or --all"
                );
                anyhow::ensure!(
                    !all || labels.is_empty(),
                    "--all deletes every rule: give no labels with it"
                );
                let target = if all {
                    "/v1/policy?all=true".to_owned()
                } else {
                    format!("/v1/policy?labels={}", escape(&labels.join(",")))
                };
                let r: PolicyChange = client.call(method::DELETE, &target, None::<&()>)?;
                println!("Revision: {} ({} rules deleted)", r.revision, r.rules);
            }
            PolicyCommand::Trace {
                src_endpoint,
                src_identity,
                src_labels,
                dst_endpoint,
                dst_identity,
                dst_labels,
                dport,
                proto,
                output,
            } => {
                let peer = |endpoint, identity, labels: Vec<String>| TracePeer {
                    endpoint,
                    identity,
                    labels: (!labels.is_empty()).then_some(labels),
                };
                let req = TraceRequest {
                    src: peer(src_endpoint, src_identity, src_labels),
                    dst: peer(dst_endpoint, dst_identity, dst_labels),
                    proto,
                    dport,
                };
                let t: serde_json::Value =
                    client.call(method::POST, "/v1/policy/trace", Some(&req))?;
                if let Output::Json = output {
                    println!("{}", serde_json::to_string_pretty(&t)?);
                    return Ok(());
                }
                for dir in ["egress", "ingress"] {
                    let d = &t[dir];
                    let rules: Vec<&str> = d["rules"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|r| r.as_str())
                        .collect();
                    let by = if rules.is_empty() {
                        String::new()
                    } else {
                        format!(" by {}", rules.join(", "))
                    };
                    println!(
                        "{:<8} {} ({}){by}",
                        format!("{}:", if dir == "egress" { "Egress" } else { "Ingress" }),
                        d["verdict"].as_str().unwrap_or("?"),
                        d["reason"].as_str().unwrap_or("")
                    );
                }
                println!("Final verdict: {}", t["verdict"].as_str().unwrap_or("?"));
                if let Some(x) = t.get("explanation") {
                    print!("{}", explanation_text(x, ""));
                }
            }
            PolicyCommand::Selectors { output } => {
                let sels: serde_json::Value = client.get("/v1/policy/selectors")?;
                if let Output::Json = output {
                    println!("{}", serde_json::to_string_pretty(&sels)?);
                    return Ok(());
                }
                let mut tb = Table::new(&["SELECTOR", "ROLE", "SOURCE", "IDENTITIES"]);
                for s in sels.as_array().into_iter().flatten() {
                    let ids: Vec<String> = s["identities"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|i| i.as_u64().map(|i| i.to_string()))
                        .collect();
                    tb.row(vec![
                        s["selector"].as_str().unwrap_or("").into(),
                        s["role"].as_str().unwrap_or("").into(),
                        s["source"].as_str().unwrap_or("").into(),
                        ids.join(" "),
                    ]);
                }
                print!("{}", tb.render());
            }
            PolicyCommand::Wait { revision, timeout } => {
                let end = Instant::now() + Duration::from_secs(timeout);
                loop {
                    let p: serde_json::Value = client.get("/v1/policy")?;
                    let now = p["revision"].as_u64().unwrap_or(0);
                    if now >= revision {
                        println!("Policy revision {now} is in force on all endpoints");
                        return Ok(());
                    }
                    anyhow::ensure!(
                        Instant::now() < end,
                        "revision {revision} not reached in {timeout}s (at {now})"
                    );
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
        Ok(())
    }
}

#[derive(Serialize)]
struct PolicyRow {
    policy: &'static str,
    direction: &'static str,
    identity: u32,
    labels: String,
    port_proto: String,
    proxy_port: String,
    bytes: u64,
    packets: u64,
}

/// A trace's `explanation` in words, each line after `indent`: where it
/// was denied and by what, and the policy that would allow it.
pub fn explanation_text(x: &serde_json::Value, indent: &str) -> String {
    let mut out = format!(
        "{indent}Denied at {} by {}\n",
        x["denied_at"].as_str().unwrap_or("?"),
        x["decided_by"].as_str().unwrap_or("?")
    );
    for b in x["because"].as_array().into_iter().flatten().filter_map(|b| b.as_str()) {
        out += &format!("{indent}  {b}\n");
    }
    match x["allow_with"].as_str() {
        Some(yaml) => {
            out += &format!("{indent}Allow it with (ciliate policy import):\n");
            for l in yaml.lines() {
                out += &format!("{indent}  {l}\n");
            }
        }
        None => {
            out += &format!(
                "{indent}No allow rule can admit it (a deny rule wins): narrow or remove the deny rule\n"
            );
        }
    }
    out
}

fn proto_name(p: u8) -> String {
    match (p, crate::table::proto_name(p)) {
        (0, _) => "ANY".into(),
        (_, Some(n)) => n.into(),
        (p, None) => p.to_string(),
    }
}

/// `ciliate bpf policy get <endpoint>`, as Cilium prints it.
pub fn bpf_policy_get(t: &Target, endpoint: u16, output: Output) -> anyhow::Result<()> {
    let dir = t.pin_dir()?;
    let ids: Vec<Identity> =
        t.client().and_then(|c| Ok(c.get("/v1/identity")?)).unwrap_or_default();
    let label_of = |id: u32| {
        if id == ANY_IDENTITY {
            return "ANY".to_owned();
        }
        ids.iter()
            .find(|i| i.id == id)
            .map(|i| i.labels.join(" "))
            .unwrap_or_else(|| format!("identity {id}"))
    };
    let entries: Vec<_> = PolicyMap::from_pin_dir(&dir)?
        .dump()?
        .into_iter()
        .filter(|(k, _, _)| k.endpoint_id == endpoint)
        .collect();
    let mut rows = Vec::new();
    for &(k, len, e) in &entries {
        if e.flags & F_MARKER != 0 {
            continue;
        }
        let port_proto = if len <= policy::PREFIX_L3 {
            "ANY".to_owned()
        } else if len == policy::PREFIX_PROTO {
            format!("ANY/{}", proto_name(k.proto))
        } else {
            let port = u16::from_be(k.dport);
            let bits = len - policy::PREFIX_PROTO;
            if bits == 16 {
                format!("{port}/{}", proto_name(k.proto))
            } else {
                let last = u32::from(port) + (1 << (16 - bits)) - 1;
                format!("{port}-{last}/{}", proto_name(k.proto))
            }
        };
        rows.push(PolicyRow {
            policy: if e.flags & F_DENY != 0 { "Deny" } else { "Allow" },
            direction: if k.dir == policy::DIR_INGRESS { "Ingress" } else { "Egress" },
            identity: k.identity,
            labels: label_of(k.identity),
            port_proto,
            proxy_port: if e.proxy_port == 0 {
                "NONE".into()
            } else {
                u16::from_be(e.proxy_port).to_string()
            },
            bytes: e.bytes,
            packets: e.packets,
        });
    }
    let enforced: Vec<&str> = entries
        .iter()
        .filter(|(_, _, e)| e.flags & F_MARKER != 0)
        .map(|(k, _, _)| if k.dir == policy::DIR_INGRESS { "ingress" } else { "egress" })
        .collect();
    if let Output::Json = output {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut tb = Table::new(&[
        "POLICY",
        "DIRECTION",
        "LABELS (source:key[=value])",
        "PORT/PROTO",
        "PROXY PORT",
        "BYTES",
        "PACKETS",
    ]);
    for r in &rows {
        tb.row(vec![
            r.policy.into(),
            r.direction.into(),
            r.labels.clone(),
            r.port_proto.clone(),
            r.proxy_port.clone(),
            r.bytes.to_string(),
            r.packets.to_string(),
        ]);
    }
    print!("{}", tb.render());
    if enforced.is_empty() {
        println!("(no direction enforced: everything is allowed)");
    } else {
        println!("(enforced: {}; anything not allowed above is denied)", enforced.join(", "));
    }
    Ok(())
}
