//! The cilium.io/v2 objects the agent and the operator write, as Rust
//! types with Cilium's field names: what they serialize is what the CRDs
//! (`crds.rs`, generated from these types) describe.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A CiliumEndpoint's `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct EndpointStatus {
    /// The endpoint's ID on its node.
    #[serde(default)]
    pub id: i64,
    #[serde(default)]
    pub identity: EndpointIdentity,
    #[serde(default)]
    pub networking: EndpointNetworking,
    /// The endpoint's state (ready, waiting-for-identity, ...).
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub policy: EndpointPolicy,
    #[serde(default)]
    pub external_identifiers: ExternalIdentifiers,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct EndpointIdentity {
    /// The security identity.
    #[serde(default)]
    pub id: i64,
    /// Its labels (`source:key=value`).
    #[serde(default)]
    pub labels: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct EndpointNetworking {
    #[serde(default)]
    pub addressing: Vec<Addressing>,
    /// The address of the node it runs on.
    #[serde(default)]
    pub node: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct Addressing {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv6: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct EndpointPolicy {
    #[serde(default)]
    pub ingress: Enforcement,
    #[serde(default)]
    pub egress: Enforcement,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct Enforcement {
    /// Is policy enforced in this direction?
    #[serde(default)]
    pub enforcing: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub struct ExternalIdentifiers {
    #[serde(default)]
    pub container_id: String,
    #[serde(default)]
    pub k8s_namespace: String,
    #[serde(default)]
    pub k8s_pod_name: String,
    /// `namespace/name`.
    #[serde(default)]
    pub pod_name: String,
}

/// A CiliumNode's `spec`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct NodeSpec {
    /// The node's addresses: `InternalIP`, and `CiliumInternalIP` (its
    /// router address in the pod CIDR).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<NodeAddress>,
    #[serde(default)]
    pub ipam: NodeIpam,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub health: Option<NodeHealth>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct NodeAddress {
    #[serde(rename = "type")]
    pub kind: String,
    pub ip: String,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeIpam {
    /// The node's pod CIDRs (cluster-pool IPAM: written by the operator).
    #[serde(default, rename = "podCIDRs", skip_serializing_if = "Vec::is_empty")]
    pub pod_cidrs: Vec<String>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct NodeHealth {
    /// The node's health endpoint address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4: Option<String>,
}

/// A CiliumIdentity's labels (the object has no spec: `security-labels`
/// sits beside its metadata, named by the ID).
pub type SecurityLabels = BTreeMap<String, String>;

/// One node's word on a CiliumNetworkPolicy or
/// CiliumClusterwideNetworkPolicy (`status.nodes.<node>`).
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyNodeStatus {
    /// Was the policy taken?
    #[serde(default)]
    pub ok: bool,
    /// Is it in force on the node?
    #[serde(default)]
    pub enforcing: bool,
    /// Why it was refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The node's policy revision that holds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_policy_revision: Option<u64>,
    /// When the node wrote this (RFC 3339).
    #[serde(default)]
    pub last_updated: String,
}

/// A policy's `status`.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, JsonSchema)]
pub struct PolicyStatus {
    /// By node name.
    #[serde(default)]
    pub nodes: BTreeMap<String, PolicyNodeStatus>,
}
