//! The Ciliate CNI plugin. ADD/DEL/CHECK/STATUS/GC arrive with the
//! single-node issue (they need the agent's API). Until then every command
//! answers with a CNI error object, as the spec asks of a plugin that
//! cannot serve a request, so a runtime never mistakes it for working.

fn main() {
    let command = std::env::var("CNI_COMMAND").unwrap_or_default();
    // Error code 11 ("try again later") would invite retries; 4 ("invalid
    // environment variables") is what the spec offers for an unusable
    // plugin environment.
    println!(
        "{{\"cniVersion\":\"1.1.0\",\"code\":4,\"msg\":\"ciliate-cni is not implemented yet\",\"details\":\"CNI_COMMAND={command}\"}}"
    );
    std::process::exit(1);
}
