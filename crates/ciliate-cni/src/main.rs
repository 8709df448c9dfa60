//! The Ciliate CNI plugin (CNI spec 1.1): ADD, DEL, CHECK, VERSION,
//! STATUS, GC.
//!
//! ADD asks the agent for an address, creates the veth pair (`lxc<hash>` on
//! the host, `CNI_IFNAME` in the pod), gives the pod its /32, an on-link
//! route to the gateway (the node's router IP) and a default route via it,
//! then asks the agent to create the endpoint, and prints the result. A
//! failure half-way undoes what was done. DEL succeeds when repeated and
//! when the namespace or the endpoint is already gone.
//!
//! Network configuration (besides `cniVersion`, `name`, `type`):
//! `agent_socket` (default `/run/ciliate/<hostname>/agent.sock`), `mtu`
//! (default 1500), and labels in `args.cni.labels` (`[{"key", "value"}]`)
//! or `args.labels` (`{"key": "value"}`). `K8S_POD_NAMESPACE` in
//! `CNI_ARGS` becomes the label `io.kubernetes.pod.namespace`.

use ciliate_cni::cni;

fn main() {
    let mut stdin = String::new();
    let _ = std::io::Read::read_to_string(&mut std::io::stdin(), &mut stdin);
    let env: std::collections::HashMap<String, String> = std::env::vars().collect();
    let (out, code) = cni::run(&env, &stdin);
    if !out.is_empty() {
        println!("{out}");
    }
    std::process::exit(code);
}
