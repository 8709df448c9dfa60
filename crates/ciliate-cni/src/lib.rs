//! The Ciliate CNI plugin as a library: [`cni::run`] is one invocation
//! (the binary's whole work), [`cni::check_input`] what it checks before
//! touching anything (for the fuzz targets).

pub mod cni;
