//! What a runtime hands the plugin: the `CNI_*` environment and the network configuration on
//! stdin (a single config or one entry of a conflist, with `prevResult`, `runtimeConfig`,
//! `args` and, for GC, `cni.dev/valid-attachments`). Every bad field is named in the error.
use std::path::PathBuf;

use serde::Deserialize;
use serde_json::{Map, Value};

use super::error::{CniError, CniResult, code};

/// Versions the plugin speaks, oldest first; results are written in the version asked for.
pub const SUPPORTED_VERSIONS: [&str; 3] = ["0.4.0", "1.0.0", "1.1.0"];
/// The newest version: what VERSION answers with when the request carries none.
pub const CURRENT_VERSION: &str = "1.1.0";

pub const DEFAULT_SUBNET_FILE: &str = crate::subnet_env::DEFAULT_PATH;
pub const DEFAULT_DATA_DIR: &str = "/var/lib/weft/ipam";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Add,
    Del,
    Check,
    Gc,
    Status,
    Version,
}

impl Command {
    pub fn parse(s: &str) -> CniResult<Self> {
        Ok(match s {
            "ADD" => Self::Add,
            "DEL" => Self::Del,
            "CHECK" => Self::Check,
            "GC" => Self::Gc,
            "STATUS" => Self::Status,
            "VERSION" => Self::Version,
            other => {
                return Err(CniError::invalid_env(format!(
                    "CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, GC, STATUS, VERSION"
                )));
            }
        })
    }

    /// Commands that act on one attachment need container id, netns and interface name.
    pub fn per_attachment(self) -> bool {
        matches!(self, Self::Add | Self::Del | Self::Check)
    }
}

/// The `CNI_*` variables of one invocation.
#[derive(Debug, Clone)]
pub struct Env {
    pub command: Command,
    pub container_id: String,
    pub netns: Option<PathBuf>,
    pub ifname: String,
    pub args: String,
}

impl Env {
    /// Reads the command only (everything else depends on it).
    pub fn command(get: &dyn Fn(&str) -> Option<String>) -> CniResult<Command> {
        let cmd = get("CNI_COMMAND")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| CniError::invalid_env("CNI_COMMAND is not set"))?;
        Command::parse(&cmd)
    }

    pub fn read(command: Command, get: &dyn Fn(&str) -> Option<String>) -> CniResult<Self> {
        let mut env = Self {
            command,
            container_id: String::new(),
            netns: None,
            ifname: String::new(),
            args: get("CNI_ARGS").unwrap_or_default(),
        };
        if !command.per_attachment() {
            return Ok(env);
        }
        env.container_id = get("CNI_CONTAINERID")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| CniError::invalid_env("CNI_CONTAINERID is not set"))?;
        validate_container_id(&env.container_id)?;
        env.ifname = get("CNI_IFNAME")
            .filter(|s| !s.is_empty())
            .ok_or_else(|| CniError::invalid_env("CNI_IFNAME is not set"))?;
        validate_ifname(&env.ifname)?;
        let netns = get("CNI_NETNS").filter(|s| !s.is_empty());
        match (&netns, command) {
            // DEL must work after the runtime already removed the namespace.
            (None, Command::Del) => {}
            (None, _) => return Err(CniError::invalid_env("CNI_NETNS is not set")),
            (Some(path), _) => {
                // `ip` takes the path as a batch word.
                if path.chars().any(char::is_whitespace) {
                    return Err(CniError::invalid_env(format!(
                        "CNI_NETNS {path:?} contains whitespace"
                    )));
                }
            }
        }
        env.netns = netns.map(PathBuf::from);
        Ok(env)
    }
}

/// What weft reads from `CNI_ARGS` (`K=V` pairs separated by `;`, as the reference plugins
/// parse it; unknown keys are ignored, as `IgnoreUnknown` asks).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniArgs {
    /// `K8S_POD_NAMESPACE`: the pod's namespace (its NetworkPolicy isolation at ADD).
    pub pod_namespace: Option<String>,
    /// `K8S_POD_NAME`.
    pub pod_name: Option<String>,
    /// `IP`: the address asked for (host-local's `IP=`).
    pub ip: Option<std::net::Ipv4Addr>,
}

impl CniArgs {
    /// `namespace/name` of the pod (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, as the kubelet's
    /// runtimes pass them), when the runtime gave both: `weft monitor` names endpoints with it.
    pub fn pod(&self) -> Option<String> {
        Some(format!(
            "{}/{}",
            self.pod_namespace.as_deref()?,
            self.pod_name.as_deref()?
        ))
    }
}

impl Env {
    /// The parsed `CNI_ARGS`; a malformed `IP` is refused (code 7, naming it).
    pub fn cni_args(&self) -> CniResult<CniArgs> {
        let mut out = CniArgs::default();
        for pair in self.args.split(';').filter(|p| !p.is_empty()) {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(CniError::invalid_env(format!(
                    "CNI_ARGS: {pair:?} is not KEY=VALUE"
                )));
            };
            match k {
                "K8S_POD_NAMESPACE" if !v.is_empty() => out.pod_namespace = Some(v.to_string()),
                "K8S_POD_NAME" if !v.is_empty() => out.pod_name = Some(v.to_string()),
                "IP" => {
                    out.ip = Some(v.parse().map_err(|_| {
                        CniError::invalid_env(format!("CNI_ARGS: IP={v:?} is not an IPv4 address"))
                    })?)
                }
                _ => {}
            }
        }
        Ok(out)
    }
}

/// The spec's container id rule: alphanumeric first, then alphanumerics, `_`, `.`, `-`.
fn validate_container_id(id: &str) -> CniResult<()> {
    let mut chars = id.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return Err(CniError::invalid_env(format!(
            "CNI_CONTAINERID {id:?} must start with a letter or digit and contain only letters, digits, '_', '.', '-'"
        )));
    }
    Ok(())
}

/// Linux interface names: 1 to 15 bytes, no '/', ':' or whitespace, not "." or "..".
fn validate_ifname(name: &str) -> CniResult<()> {
    if name.len() > 15
        || name == "."
        || name == ".."
        || name
            .chars()
            .any(|c| c == '/' || c == ':' || c.is_whitespace())
    {
        return Err(CniError::invalid_env(format!(
            "CNI_IFNAME {name:?} is not a valid interface name (at most 15 bytes, no '/', ':' or spaces)"
        )));
    }
    Ok(())
}

/// One entry of `cni.dev/valid-attachments` (GC).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct Attachment {
    #[serde(rename = "containerID")]
    pub container_id: String,
    pub ifname: String,
}

/// The network configuration as weft uses it.
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    pub cni_version: String,
    pub name: String,
    pub plugin_type: String,
    pub subnet_file: PathBuf,
    pub data_dir: PathBuf,
    pub pin_root: Option<PathBuf>,
    pub mtu: Option<u32>,
    pub log_file: Option<PathBuf>,
    pub prev_result: Option<Value>,
    pub valid_attachments: Option<Vec<Attachment>>,
    /// The runtime asks for bandwidth limits (`runtimeConfig.bandwidth` with a rate, the
    /// `bandwidth` capability): the `bandwidth` plugin chained after weft shapes the pod, so its
    /// traffic must pass the qdiscs that plugin installs.
    pub bandwidth: bool,
    /// The address the runtime asks for (`runtimeConfig.ips`, the `ips` capability).
    pub requested_ip: Option<std::net::Ipv4Addr>,
}

/// The configuration on stdin as written (fields weft does not use are ignored). Public only so
/// the configuration reference test can list the fields from the type itself.
#[doc(hidden)]
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RawConfig {
    name: Option<String>,
    #[serde(rename = "type")]
    plugin_type: Option<String>,
    subnet_file: Option<String>,
    data_dir: Option<String>,
    pin_root: Option<String>,
    log_file: Option<String>,
    mtu: Option<u32>,
    prev_result: Option<Map<String, Value>>,
    #[serde(rename = "cni.dev/valid-attachments")]
    valid_attachments: Option<Vec<Attachment>>,
    runtime_config: Option<RuntimeConfig>,
}

/// `runtimeConfig`: what the runtime passes for the capabilities the entry declares.
#[derive(Debug, Deserialize)]
struct RuntimeConfig {
    bandwidth: Option<BandwidthLimits>,
    /// The `ips` capability (as the reference plugins read it): the addresses asked for.
    ips: Option<Vec<String>>,
}

/// `runtimeConfig.bandwidth`, as the `bandwidth` plugin reads it (bits per second; 0: none).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct BandwidthLimits {
    ingress_rate: Option<u64>,
    egress_rate: Option<u64>,
}

/// Just the version (VERSION, and the version of an error answer).
#[derive(Debug, Deserialize)]
struct VersionOnly {
    #[serde(rename = "cniVersion")]
    cni_version: Option<String>,
}

fn field_error(e: crate::json::FieldError) -> CniError {
    CniError::invalid_config(format!("field `{}`: {}", e.path, e.message))
}

/// Parses stdin as JSON (decode failure, code 6) into an object.
pub fn decode(stdin: &[u8]) -> CniResult<Value> {
    let value: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            code::DECODE_FAILURE,
            format!("the network configuration on stdin is not valid JSON: {e}"),
        )
    })?;
    if !value.is_object() {
        return Err(CniError::new(
            code::DECODE_FAILURE,
            format!(
                "the network configuration on stdin must be a JSON object, got {}",
                type_name(&value)
            ),
        ));
    }
    Ok(value)
}

/// The `cniVersion` asked for in `stdin`, when there is a supported one.
pub fn requested_version(stdin: &[u8]) -> Option<String> {
    crate::json::from_slice::<VersionOnly>(stdin)
        .ok()?
        .cni_version
        .filter(|v| SUPPORTED_VERSIONS.contains(&v.as_str()))
}

/// The `cniVersion` of a decoded config: required, and one the plugin speaks (code 1 if not).
pub fn version_of(raw: &Value) -> CniResult<String> {
    let version = crate::json::from_value::<VersionOnly>(raw.clone())
        .map_err(field_error)?
        .cni_version
        .ok_or_else(|| {
            CniError::invalid_config("field `cniVersion` is missing from the network configuration")
        })?;
    check_version(version)
}

fn check_version(version: String) -> CniResult<String> {
    if !SUPPORTED_VERSIONS.contains(&version.as_str()) {
        return Err(CniError::new(
            code::INCOMPATIBLE_VERSION,
            format!(
                "cniVersion {version:?} is not supported; weft-cni supports {}",
                SUPPORTED_VERSIONS.join(", ")
            ),
        ));
    }
    Ok(version)
}

/// Compares two dotted versions ("0.4.0" < "1.1.0").
pub fn version_at_least(version: &str, min: &str) -> bool {
    let parse = |v: &str| -> Vec<u32> { v.split('.').map(|p| p.parse().unwrap_or(0)).collect() };
    parse(version) >= parse(min)
}

impl NetworkConfig {
    pub fn parse(raw: Value) -> CniResult<Self> {
        let cni_version = version_of(&raw)?;
        let raw: RawConfig = crate::json::from_value(raw).map_err(field_error)?;
        let non_empty = |key: &str, v: Option<String>| -> CniResult<Option<String>> {
            match v {
                Some(s) if s.is_empty() => Err(CniError::invalid_config(format!(
                    "field `{key}` must not be empty"
                ))),
                other => Ok(other),
            }
        };
        let required = |key: &str, v: Option<String>| -> CniResult<String> {
            non_empty(key, v)?.ok_or_else(|| {
                CniError::invalid_config(format!(
                    "field `{key}` is missing from the network configuration"
                ))
            })
        };
        let name = required("name", raw.name)?;
        validate_network_name(&name)?;
        let plugin_type = required("type", raw.plugin_type)?;
        let path = |key: &str, v: Option<String>| -> CniResult<Option<PathBuf>> {
            Ok(non_empty(key, v)?.map(PathBuf::from))
        };
        let subnet_file = path("subnetFile", raw.subnet_file)?
            .unwrap_or_else(|| PathBuf::from(DEFAULT_SUBNET_FILE));
        let data_dir =
            path("dataDir", raw.data_dir)?.unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let pin_root = path("pinRoot", raw.pin_root)?;
        let log_file = path("logFile", raw.log_file)?;
        if let Some(m) = raw.mtu
            && !(68..=65535).contains(&m)
        {
            return Err(CniError::invalid_config(format!(
                "field `mtu` must be an integer between 68 and 65535, got {m}"
            )));
        }
        let bandwidth = raw
            .runtime_config
            .as_ref()
            .and_then(|r| r.bandwidth.as_ref())
            .is_some_and(|b| b.ingress_rate.unwrap_or(0) > 0 || b.egress_rate.unwrap_or(0) > 0);
        let mut requested_ip = None;
        for ip in raw
            .runtime_config
            .as_ref()
            .and_then(|r| r.ips.as_ref())
            .into_iter()
            .flatten()
        {
            let addr = ip.split('/').next().unwrap_or("");
            match addr.parse::<std::net::Ipv4Addr>() {
                Ok(a) => requested_ip = requested_ip.or(Some(a)),
                // IPv6 entries are for another plugin of a dual-stack chain.
                Err(_) if addr.parse::<std::net::Ipv6Addr>().is_ok() => {}
                Err(_) => {
                    return Err(CniError::invalid_config(format!(
                        "field `runtimeConfig.ips`: {ip:?} is not an IP address"
                    )));
                }
            }
        }
        Ok(Self {
            cni_version,
            name,
            plugin_type,
            subnet_file,
            data_dir,
            pin_root,
            mtu: raw.mtu,
            log_file,
            prev_result: raw.prev_result.map(Value::Object),
            valid_attachments: raw.valid_attachments,
            bandwidth,
            requested_ip,
        })
    }
}

/// The spec's network name rule; the name is also a directory name of the IPAM store.
fn validate_network_name(name: &str) -> CniResult<()> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c)) {
        return Err(CniError::invalid_config(format!(
            "field `name` {name:?} must start with a letter or digit and contain only letters, digits, '_', '.', '-'"
        )));
    }
    Ok(())
}

pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn conf(v: Value) -> CniResult<NetworkConfig> {
        NetworkConfig::parse(v)
    }

    #[test]
    fn names_bad_fields() {
        let e = conf(json!({"cniVersion": "1.1.0", "type": "weft-cni"})).unwrap_err();
        assert_eq!(e.code, code::INVALID_CONFIG);
        assert!(e.msg.contains("`name`"), "{e}");
        let e = conf(json!({"cniVersion": "1.1.0", "name": "n", "type": "weft-cni", "dataDir": 3}))
            .unwrap_err();
        assert!(e.msg.contains("`dataDir`"), "{e}");
        let e = conf(json!({"cniVersion": "0.3.1", "name": "n", "type": "t"})).unwrap_err();
        assert_eq!(e.code, code::INCOMPATIBLE_VERSION);
        let e =
            conf(json!({"cniVersion": "1.1.0", "name": "n", "type": "t", "mtu": 20})).unwrap_err();
        assert!(e.msg.contains("`mtu`"), "{e}");
        let e = conf(json!({"cniVersion": "1.1.0", "name": "n", "type": "t",
            "cni.dev/valid-attachments": [{"containerID": "a"}]}))
        .unwrap_err();
        assert!(e.msg.contains("valid-attachments[0].ifname"), "{e}");
    }

    #[test]
    fn defaults_and_overrides() {
        let c = conf(
            json!({"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni",
            "pinRoot": "/sys/fs/bpf/x"}),
        )
        .unwrap();
        assert_eq!(c.subnet_file, PathBuf::from(DEFAULT_SUBNET_FILE));
        assert_eq!(c.data_dir, PathBuf::from(DEFAULT_DATA_DIR));
        assert_eq!(c.pin_root, Some(PathBuf::from("/sys/fs/bpf/x")));
        assert!(!c.bandwidth);
        let c = conf(
            json!({"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni",
            "runtimeConfig": {"bandwidth": {"egressRate": 1000000, "egressBurst": 10000}}}),
        )
        .unwrap();
        assert!(c.bandwidth);
        let e = conf(
            json!({"cniVersion": "1.0.0", "name": "weft", "type": "weft-cni",
            "runtimeConfig": {"bandwidth": 5}}),
        )
        .unwrap_err();
        assert!(e.msg.contains("runtimeConfig.bandwidth"), "{e}");
        assert!(version_at_least("1.1.0", "1.0.0"));
        assert!(!version_at_least("0.4.0", "1.0.0"));
    }

    #[test]
    fn environment_is_validated() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |k: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == k)
                    .map(|(_, v)| v.to_string())
            }
        };
        let e = Env::command(&env(&[])).unwrap_err();
        assert!(e.msg.contains("CNI_COMMAND"));
        let get = env(&[("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "eth0")]);
        let e = Env::read(Command::Add, &get).unwrap_err();
        assert!(e.msg.contains("CNI_NETNS"), "{e}");
        assert!(Env::read(Command::Del, &get).is_ok());
        let get = env(&[("CNI_CONTAINERID", "abc"), ("CNI_IFNAME", "a/b")]);
        assert!(
            Env::read(Command::Del, &get)
                .unwrap_err()
                .msg
                .contains("CNI_IFNAME")
        );
        let get = env(&[("CNI_CONTAINERID", "-x"), ("CNI_IFNAME", "eth0")]);
        assert!(
            Env::read(Command::Del, &get)
                .unwrap_err()
                .msg
                .contains("CNI_CONTAINERID")
        );
    }

    #[test]
    fn pod_name_comes_from_the_runtime_args() {
        let args = |a: &str| {
            Env {
                command: Command::Add,
                container_id: "c".into(),
                netns: None,
                ifname: "eth0".into(),
                args: a.into(),
            }
            .cni_args()
            .unwrap()
        };
        let a = args(
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=prod;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=abc",
        );
        assert_eq!(a.pod().as_deref(), Some("prod/web-0"));
        assert_eq!(a.pod_namespace.as_deref(), Some("prod"));
        assert_eq!(args("").pod(), None);
        assert_eq!(args("K8S_POD_NAME=web-0").pod(), None, "no namespace");
        assert_eq!(args("K8S_POD_NAMESPACE=prod;K8S_POD_NAME=").pod(), None);
    }
}
