//! CNI errors: the spec's well-known codes, weft's own codes (100+), and their JSON form.
use std::fmt;

use serde::Serialize;

/// The spec's well-known error codes (CNI 1.1, "Error" section).
pub mod code {
    pub const INCOMPATIBLE_VERSION: u32 = 1;
    pub const UNSUPPORTED_FIELD: u32 = 2;
    pub const UNKNOWN_CONTAINER: u32 = 3;
    pub const INVALID_ENVIRONMENT: u32 = 4;
    pub const IO_FAILURE: u32 = 5;
    pub const DECODE_FAILURE: u32 = 6;
    pub const INVALID_CONFIG: u32 = 7;
    pub const TRY_AGAIN_LATER: u32 = 11;
    pub const NOT_AVAILABLE: u32 = 50;
    pub const LIMITED_CONNECTIVITY: u32 = 51;
    /// weft: the node's pod subnet has no free address.
    pub const ADDRESSES_EXHAUSTED: u32 = 100;
    /// weft: creating or configuring an interface, address, route or neighbour failed.
    pub const INTERFACE_SETUP: u32 = 101;
    /// weft: registering the endpoint or attaching the datapath program failed.
    pub const DATAPATH: u32 = 102;
    /// weft: the IPAM store could not be read or written.
    pub const IPAM_STORE: u32 = 103;
    /// weft: CHECK found the pod's network differs from what ADD set up.
    pub const CHECK_MISMATCH: u32 = 104;
    /// The address the runtime asked for (`CNI_ARGS` `IP=`, `runtimeConfig.ips`) is outside the
    /// node's subnet or held by another attachment.
    pub const ADDRESS_UNAVAILABLE: u32 = 105;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

pub type CniResult<T> = Result<T, CniError>;

impl CniError {
    pub fn new(code: u32, msg: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: String::new(),
        }
    }

    /// An error whose cause chain goes into `details`.
    pub fn with_cause(code: u32, msg: impl Into<String>, cause: &anyhow::Error) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: format!("{cause:#}"),
        }
    }

    pub fn invalid_config(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_CONFIG, msg)
    }

    pub fn invalid_env(msg: impl Into<String>) -> Self {
        Self::new(code::INVALID_ENVIRONMENT, msg)
    }

    /// The error object the spec prescribes (`cniVersion`, `code`, `msg`, `details`).
    pub fn to_json(&self, cni_version: &str) -> serde_json::Value {
        #[derive(Serialize)]
        struct Reply<'a> {
            #[serde(rename = "cniVersion")]
            cni_version: &'a str,
            code: u32,
            msg: &'a str,
            #[serde(skip_serializing_if = "str::is_empty")]
            details: &'a str,
        }
        serde_json::to_value(Reply {
            cni_version,
            code: self.code,
            msg: &self.msg,
            details: &self.details,
        })
        .expect("serializable")
    }
}

impl fmt::Display for CniError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "code {}: {}", self.code, self.msg)?;
        if !self.details.is_empty() {
            write!(f, " ({})", self.details)?;
        }
        Ok(())
    }
}

impl std::error::Error for CniError {}
