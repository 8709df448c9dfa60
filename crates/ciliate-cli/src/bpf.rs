//! `ciliate bpf ...`: read the datapath's pinned BPF maps directly, as
//! `cilium bpf ...` does. Every list takes `-o json`.

use std::{net::Ipv4Addr, path::Path};

use anyhow::Context as _;
use ciliate_common::{ct, drop, identity, metrics};
use ciliate_datapath::maps::{CtMaps, IpcacheMap, LxcMap, MetricsMap};
use ciliate_datapath::node::format_mac;
use clap::Subcommand;
use serde::Serialize;

use crate::{
    table::{Output, Table, proto_name},
    target::Target,
};

#[derive(Subcommand)]
pub enum BpfCommand {
    /// Datapath metrics
    #[command(subcommand)]
    Metrics(ListCommand),
    /// Connection tracking tables
    #[command(subcommand)]
    Ct(ListCommand),
    /// The ipcache: prefix → identity, tunnel endpoint
    #[command(subcommand)]
    Ipcache(IpcacheCommand),
    /// Local endpoints (the lxc map)
    #[command(subcommand)]
    Endpoint(ListCommand),
    /// An endpoint's policy map entries
    #[command(subcommand)]
    Policy(PolicyGet),
    /// The load-balancer maps: frontends, backend slots, Maglev tables
    #[command(subcommand)]
    Lb(crate::service::LbCommand),
    /// Pod CIDRs of other nodes → tunnel endpoint
    #[command(subcommand)]
    Tunnel(ListCommand),
    /// The masquerading (SNAT) map
    #[command(subcommand)]
    Nat(ListCommand),
}

#[derive(Subcommand)]
pub enum PolicyGet {
    /// The entries of one endpoint
    Get {
        endpoint: u16,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
pub enum ListCommand {
    /// List the entries
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
pub enum IpcacheCommand {
    /// List the entries
    List {
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
    /// The entry the datapath uses for an address (longest prefix match)
    Get {
        ip: Ipv4Addr,
        #[arg(short = 'o', long, value_enum, default_value = "table")]
        output: Output,
    },
}

impl BpfCommand {
    pub fn run(self, t: &Target) -> anyhow::Result<()> {
        let (kind, output) = match self {
            BpfCommand::Metrics(ListCommand::List { output }) => ("metrics", output),
            BpfCommand::Ct(ListCommand::List { output }) => ("ct", output),
            BpfCommand::Ipcache(IpcacheCommand::List { output }) => ("ipcache", output),
            BpfCommand::Endpoint(ListCommand::List { output }) => ("endpoint", output),
            BpfCommand::Ipcache(IpcacheCommand::Get { ip, output }) => {
                return ipcache_get(&t.pin_dir()?, ip, output);
            }
            BpfCommand::Policy(PolicyGet::Get { endpoint, output }) => {
                return crate::policy::bpf_policy_get(t, endpoint, output);
            }
            BpfCommand::Lb(c) => return c.run(&t.pin_dir()?),
            BpfCommand::Tunnel(ListCommand::List { output }) => {
                return crate::cluster::tunnel_list(&t.pin_dir()?, output);
            }
            BpfCommand::Nat(ListCommand::List { output }) => {
                return crate::cluster::nat_list(&t.pin_dir()?, output);
            }
        };
        list(&t.pin_dir()?, kind, output)
    }
}

fn ipcache_get(dir: &Path, ip: Ipv4Addr, output: Output) -> anyhow::Result<()> {
    let map = IpcacheMap::from_pin_dir(dir)?;
    let e =
        map.lookup(ip)?.with_context(|| format!("{ip} is not covered by any ipcache prefix"))?;
    // The prefix that matched: the longest listed one covering `ip`.
    let prefix = map
        .dump()?
        .into_iter()
        .filter(|(net, len, _)| {
            let mask = if *len == 0 { 0 } else { u32::MAX << (32 - u32::from(*len)) };
            u32::from(ip) & mask == u32::from(*net)
        })
        .max_by_key(|(_, len, _)| *len)
        .map(|(net, len, _)| format!("{net}/{len}"))
        .unwrap_or_default();
    let row = IpcacheRow {
        prefix,
        identity: e.identity,
        tunnel_endpoint: Ipv4Addr::from(e.tunnel_endpoint),
        flags: e.flags,
    };
    emit(&[row], output, &["IP PREFIX/ADDRESS", "IDENTITY"], ipcache_cells)
}

fn ipcache_cells(r: &IpcacheRow) -> Vec<String> {
    vec![
        r.prefix.clone(),
        format!(
            "identity={} encryptkey=0 tunnelendpoint={} flags={:#x}",
            identity_text(r.identity),
            r.tunnel_endpoint,
            r.flags
        ),
    ]
}

/// List map kind `kind` ("metrics", "ct", "ipcache", "endpoint") of the
/// node pinned at `dir`.
pub fn list(dir: &Path, kind: &str, output: Output) -> anyhow::Result<()> {
    let ctx = || format!("reading the {kind} map of {}", dir.display());
    match kind {
        "metrics" => metrics_list(dir, output).with_context(ctx),
        "ct" => ct_list(dir, output).with_context(ctx),
        "ipcache" => ipcache_list(dir, output).with_context(ctx),
        _ => endpoint_list(dir, output).with_context(ctx),
    }
}

/// Print `rows` as JSON, or as a table through `row`.
pub(crate) fn emit<T: Serialize>(
    rows: &[T],
    output: Output,
    header: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(rows)?),
        Output::Table => {
            let mut t = Table::new(header);
            for r in rows {
                t.row(row(r));
            }
            print!("{}", t.render());
        }
    }
    Ok(())
}

#[derive(Serialize)]
struct MetricRow {
    reason: u8,
    reason_text: &'static str,
    direction: &'static str,
    packets: u64,
    bytes: u64,
}

fn metrics_list(dir: &Path, output: Output) -> anyhow::Result<()> {
    let rows: Vec<MetricRow> = MetricsMap::from_pin_dir(dir)?
        .dump()?
        .into_iter()
        .map(|(k, v)| MetricRow {
            reason: k.reason,
            reason_text: drop::reason_name(k.reason),
            direction: metrics::dir_name(k.dir),
            packets: v.packets,
            bytes: v.bytes,
        })
        .collect();
    emit(&rows, output, &["REASON", "DIRECTION", "PACKETS", "BYTES"], |r| {
        vec![r.reason_text.into(), r.direction.into(), r.packets.to_string(), r.bytes.to_string()]
    })
}

#[derive(Serialize)]
struct CtRow {
    proto: &'static str,
    direction: &'static str,
    source: String,
    destination: String,
    expires: u32,
    tx_packets: u64,
    tx_bytes: u64,
    rx_packets: u64,
    rx_bytes: u64,
    tx_flags_seen: u8,
    rx_flags_seen: u8,
    flags: u16,
    rev_nat: u16,
    source_identity: u32,
    backend_id: u32,
}

fn ct_flag_names(flags: u16) -> String {
    let names: Vec<&str> = [
        (ct::F_RX_CLOSING, "RxClosing"),
        (ct::F_TX_CLOSING, "TxClosing"),
        (ct::F_SEEN_NON_SYN, "SeenNonSyn"),
    ]
    .iter()
    .filter(|(bit, _)| flags & bit != 0)
    .map(|(_, n)| *n)
    .collect();
    names.join(" ")
}

fn ct_list(dir: &Path, output: Output) -> anyhow::Result<()> {
    let rows: Vec<CtRow> = CtMaps::from_pin_dir(dir)?
        .dump()?
        .into_iter()
        .map(|(k, e)| CtRow {
            proto: proto_name(k.proto).unwrap_or("OTHER"),
            direction: match k.dir {
                ct::DIR_EGRESS => "OUT",
                ct::DIR_SERVICE => "SVC",
                _ => "IN",
            },
            source: format!("{}:{}", Ipv4Addr::from(k.saddr), u16::from_be(k.sport)),
            destination: format!("{}:{}", Ipv4Addr::from(k.daddr), u16::from_be(k.dport)),
            expires: e.expires,
            tx_packets: e.tx_packets,
            tx_bytes: e.tx_bytes,
            rx_packets: e.rx_packets,
            rx_bytes: e.rx_bytes,
            tx_flags_seen: e.tx_flags_seen,
            rx_flags_seen: e.rx_flags_seen,
            flags: e.flags,
            rev_nat: e.rev_nat_index,
            source_identity: e.src_identity,
            backend_id: e.backend_id,
        })
        .collect();
    if let Output::Json = output {
        return emit(&rows, output, &[], |_| vec![]);
    }
    // Cilium's one-line-per-entry format.
    for r in rows {
        println!(
            "{} {} {} -> {} expires={} TxPackets={} TxBytes={} RxPackets={} RxBytes={} \
             TxFlagsSeen={:#04x} RxFlagsSeen={:#04x} Flags={:#06x} [ {} ] RevNAT={} SourceSecurityID={} BackendID={}",
            r.proto,
            r.direction,
            r.source,
            r.destination,
            r.expires,
            r.tx_packets,
            r.tx_bytes,
            r.rx_packets,
            r.rx_bytes,
            r.tx_flags_seen,
            r.rx_flags_seen,
            r.flags,
            ct_flag_names(r.flags),
            r.rev_nat,
            r.source_identity,
            r.backend_id
        );
    }
    Ok(())
}

#[derive(Serialize)]
struct IpcacheRow {
    prefix: String,
    identity: u32,
    tunnel_endpoint: Ipv4Addr,
    flags: u8,
}

fn identity_text(id: u32) -> String {
    match identity::reserved_name(id) {
        Some(name) => format!("{id} (reserved:{name})"),
        None => id.to_string(),
    }
}

fn ipcache_list(dir: &Path, output: Output) -> anyhow::Result<()> {
    let rows: Vec<IpcacheRow> = IpcacheMap::from_pin_dir(dir)?
        .dump()?
        .into_iter()
        .map(|(ip, len, e)| IpcacheRow {
            prefix: format!("{ip}/{len}"),
            identity: e.identity,
            tunnel_endpoint: Ipv4Addr::from(e.tunnel_endpoint),
            flags: e.flags,
        })
        .collect();
    emit(&rows, output, &["IP PREFIX/ADDRESS", "IDENTITY"], ipcache_cells)
}

#[derive(Serialize)]
struct EndpointRow {
    ip: Ipv4Addr,
    id: u16,
    identity: u32,
    flags: u32,
    ifindex: u32,
    mac: String,
    node_mac: String,
}

fn endpoint_list(dir: &Path, output: Output) -> anyhow::Result<()> {
    let rows: Vec<EndpointRow> = LxcMap::from_pin_dir(dir)?
        .dump()?
        .into_iter()
        .map(|(ip, e)| EndpointRow {
            ip,
            id: e.endpoint_id,
            identity: e.identity,
            flags: e.flags,
            ifindex: e.ifindex,
            mac: format_mac(&e.mac),
            node_mac: format_mac(&e.node_mac),
        })
        .collect();
    emit(&rows, output, &["IP ADDRESS", "LOCAL ENDPOINT INFO"], |r| {
        let info = if r.flags & ciliate_common::endpoint::ENDPOINT_F_HOST != 0 {
            "(localhost)".to_owned()
        } else {
            format!(
                "id={:<5} sec_id={:<6} flags={:#06x} ifindex={:<4} mac={} nodemac={}",
                r.id, r.identity, r.flags, r.ifindex, r.mac, r.node_mac
            )
        };
        vec![format!("{}:0", r.ip), info]
    })
}
