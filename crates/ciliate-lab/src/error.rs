#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("running {cmd}: {source}")]
    Spawn {
        cmd: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{cmd} failed ({status}): {stderr}")]
    Command { cmd: String, status: String, stderr: String },
    #[error("entering network namespace {ns}: {source}")]
    Enter {
        ns: String,
        #[source]
        source: std::io::Error,
    },
    #[error("datapath in {ns}: {source}")]
    Datapath {
        ns: String,
        #[source]
        source: ciliate_datapath::DatapathError,
    },
    #[error("lab state {path}: {reason}")]
    State { path: String, reason: String },
    #[error("{0}")]
    Invalid(String),
}

pub type Result<T, E = LabError> = std::result::Result<T, E>;
