use std::path::PathBuf;

/// Everything that can go wrong between Ciliate and the kernel. Each variant
/// names the object it failed on.
#[derive(Debug, thiserror::Error)]
pub enum DatapathError {
    #[error("mounting bpffs at {path}: {source}")]
    MountBpffs {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("loading eBPF object {object}: {source}")]
    Load {
        object: String,
        #[source]
        source: Box<aya::EbpfError>,
    },
    #[error("program {program} not found in object {object}")]
    NoProgram { object: String, program: String },
    #[error("map {map} not found in object {object}")]
    NoMap { object: String, map: String },
    #[error("{action} program {program}: {source}")]
    Program {
        action: String,
        program: String,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("{action} map {map}: {source}")]
    Map {
        action: String,
        map: String,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("pinning {what} at {path}: {source}")]
    Pin {
        what: String,
        path: PathBuf,
        #[source]
        source: Box<aya::pin::PinError>,
    },
    #[error(
        "program {program} in object {object}: program type {kind} is not handled by the loader"
    )]
    UnsupportedProgram { object: String, program: String, kind: String },
    #[error("policy rule {rule}: {reason}")]
    BadPolicy { rule: String, reason: String },
    #[error("prefix {prefix}: {reason}")]
    BadPrefix { prefix: String, reason: String },
    #[error("{what}: {reason}")]
    BadValue { what: String, reason: String },
    #[error(
        "map {map} is too small for this change: it would need {needed} entries at its fullest, and holds {capacity} ({in_use} in use now); nothing was written"
    )]
    MapFull { map: String, needed: usize, in_use: usize, capacity: usize },
    #[error(
        "map ciliate_policy: the policy of endpoint {endpoint} would need {needed} entries, more than the {capacity} one endpoint may hold (--bpf-policy-map-max); nothing was written"
    )]
    EndpointPolicyFull { endpoint: u16, needed: usize, capacity: usize },
    #[error("{what}: {source}; what it had written was undone")]
    RolledBack {
        what: String,
        #[source]
        source: Box<DatapathError>,
    },
    #[error("device {name}: {reason}")]
    Device { name: String, reason: String },
    #[error("test run of {program}: output buffer of {size} bytes too small")]
    TestRunOutput { program: String, size: usize },
}

impl DatapathError {
    /// A failed program operation: `action` ("loading", "attaching to eth0")
    /// on `program`.
    pub fn program(
        action: impl Into<String>,
        program: impl Into<String>,
        source: aya::programs::ProgramError,
    ) -> Self {
        Self::Program { action: action.into(), program: program.into(), source: Box::new(source) }
    }
}

pub type Result<T, E = DatapathError> = std::result::Result<T, E>;
