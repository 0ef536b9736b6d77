//! Driving CNI plugins as a container runtime does: exec the binary in the node's network
//! namespace (`nsenter --net`, so bpffs pins stay visible) with the `CNI_*` environment and the
//! configuration on stdin; conflists run plugin after plugin with `prevResult`.
//!
//! `CniNode` is a node without an agent: the datapath loaded and pinned under its own pin
//! directory, the config map READY, and a `subnet.env` in its own directory, as the agent
//! would leave them.
use std::{
    io::Write as _,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
};

use ipnet::Ipv4Net;
use serde_json::{Value, json};
use weft_agent::{
    datapath::{Datapath, Maps},
    subnet_env::SubnetEnv,
};
use weft_common::{CONFIG_F_READY, NodeConfig};

use crate::{
    cluster::binary,
    netns::{Netns, unique_name},
    pins::PinDir,
};

/// Where Debian's reference plugins live.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A temporary directory removed on drop.
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> Self {
        let path = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// A plugin's exit status and output.
#[derive(Debug)]
pub struct CniOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

impl CniOutput {
    fn from(out: Output) -> Self {
        Self {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// The stdout JSON (Null when empty), panicking when it is not JSON.
    pub fn json(&self) -> Value {
        if self.stdout.trim().is_empty() {
            return Value::Null;
        }
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {:?}", self.stdout))
    }

    /// The result of a successful call.
    pub fn ok(&self) -> Value {
        assert!(
            self.success,
            "plugin failed: stdout {} stderr {}",
            self.stdout, self.stderr
        );
        self.json()
    }

    /// The error code of a failed call (checking the error object's shape).
    pub fn err_code(&self) -> u64 {
        assert!(
            !self.success,
            "plugin succeeded but an error was expected: {}",
            self.stdout
        );
        let v = self.json();
        assert!(
            v["msg"].as_str().is_some_and(|m| !m.is_empty()),
            "error without msg: {v}"
        );
        assert!(v["cniVersion"].is_string(), "error without cniVersion: {v}");
        v["code"]
            .as_u64()
            .unwrap_or_else(|| panic!("error without code: {v}"))
    }

    pub fn err_msg(&self) -> String {
        self.json()["msg"].as_str().unwrap_or_default().to_string()
    }
}

/// One plugin invocation.
#[derive(Debug, Clone)]
pub struct Call {
    pub plugin: PathBuf,
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub env: Vec<(String, String)>,
    pub stdin: Vec<u8>,
}

impl Call {
    pub fn new(plugin: &Path, command: &str, conf: &Value) -> Self {
        Self {
            plugin: plugin.to_path_buf(),
            command: command.into(),
            container_id: None,
            netns: None,
            ifname: Some("eth0".into()),
            env: Vec::new(),
            stdin: conf.to_string().into_bytes(),
        }
    }

    pub fn attachment(mut self, container_id: &str, netns: Option<&str>) -> Self {
        self.container_id = Some(container_id.into());
        self.netns = netns.map(String::from);
        self
    }

    fn command_in(&self, node: &Netns) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", node.path()))
            .arg(&self.plugin)
            .env_remove("CNI_COMMAND")
            .env("CNI_PATH", plugin_path());
        if !self.command.is_empty() {
            cmd.env("CNI_COMMAND", &self.command);
        }
        if let Some(c) = &self.container_id {
            cmd.env("CNI_CONTAINERID", c);
        }
        if let Some(n) = &self.netns {
            cmd.env("CNI_NETNS", n);
        }
        if let Some(i) = &self.ifname {
            cmd.env("CNI_IFNAME", i);
        }
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    }

    /// Starts the plugin in `node` (stdin written, not waited for).
    pub fn spawn(&self, node: &Netns) -> Child {
        let mut child = self
            .command_in(node)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.plugin.display()));
        let mut stdin = child.stdin.take().unwrap();
        // A plugin killed early closes its stdin: ignore EPIPE.
        let _ = stdin.write_all(&self.stdin);
        drop(stdin);
        child
    }

    pub fn run(&self, node: &Netns) -> CniOutput {
        let child = self.spawn(node);
        CniOutput::from(child.wait_with_output().expect("waiting for the plugin"))
    }
}

/// `CNI_PATH`: weft's build directory, then the reference plugins.
pub fn plugin_path() -> String {
    format!(
        "{}:{REFERENCE_PLUGINS}",
        crate::cluster::bin_dir().display()
    )
}

pub fn weft_cni() -> PathBuf {
    binary("weft-cni")
}

/// The executable of a plugin `type`.
pub fn plugin_binary(plugin_type: &str) -> PathBuf {
    if plugin_type == "weft-cni" {
        return weft_cni();
    }
    let p = Path::new(REFERENCE_PLUGINS).join(plugin_type);
    assert!(
        p.exists(),
        "{} is missing: install Debian's containernetworking-plugins",
        p.display()
    );
    p
}

/// Runs a conflist as libcni does: ADD through the plugins in order with `prevResult`, DEL in
/// reverse order with the final result as `prevResult`, CHECK in order with it. Returns the
/// final result (ADD) or Null, or the first failure.
pub fn run_conflist(
    node: &Netns,
    command: &str,
    conflist: &Value,
    container_id: &str,
    netns: &str,
    prev: Option<&Value>,
) -> Result<Value, CniOutput> {
    let version = conflist["cniVersion"].clone();
    let name = conflist["name"].clone();
    let mut plugins: Vec<Value> = conflist["plugins"].as_array().expect("plugins").clone();
    if command == "DEL" {
        plugins.reverse();
    }
    let mut result = prev.cloned();
    for plugin in plugins {
        let mut conf = plugin.clone();
        conf["cniVersion"] = version.clone();
        conf["name"] = name.clone();
        if let Some(r) = &result {
            conf["prevResult"] = r.clone();
        }
        let call = Call::new(
            &plugin_binary(plugin["type"].as_str().expect("type")),
            command,
            &conf,
        )
        .attachment(container_id, Some(netns));
        let out = call.run(node);
        if !out.success {
            return Err(out);
        }
        if command == "ADD" {
            result = Some(out.json());
        }
    }
    Ok(if command == "ADD" {
        result.unwrap_or(Value::Null)
    } else {
        Value::Null
    })
}

pub struct CniNode {
    // Drop order: the namespace (and its links) first, then pins and files.
    pub ns: Netns,
    pub pins: PinDir,
    pub dir: TempDir,
    pub subnet: Ipv4Net,
    pub mtu: u32,
}

impl CniNode {
    /// A node whose pod subnet is `subnet` (inside 10.244.0.0/16) with pod MTU `mtu`.
    pub fn new(subnet: &str, mtu: u32) -> Self {
        let ns = Netns::new("wcn");
        ns.sysctl("net.ipv4.ip_forward", "1");
        ns.sysctl("net.ipv4.conf.all.rp_filter", "0");
        ns.sysctl("net.ipv4.conf.default.rp_filter", "0");
        let pins = PinDir::new("cni");
        let root = pins.path.clone();
        ns.run(move || {
            let mut dp = Datapath::load_pinned(&root).expect("loading the pinned datapath");
            dp.pin_programs().expect("pinning programs");
            dp.maps
                .set_config(&NodeConfig {
                    node_ip: [192, 168, 77, 1],
                    underlay_ifindex: 1,
                    vni: weft_common::VXLAN_VNI_DEFAULT,
                    vxlan_port: weft_common::VXLAN_PORT_DEFAULT,
                    flags: CONFIG_F_READY,
                    vtep_mac: [0x02, 0, 0, 0, 0x77, 1],
                    _pad: [0; 2],
                    bgp_table: weft_common::BGP_TABLE_DEFAULT,
                })
                .expect("writing the config");
            // As an agent with no policy does: new pods are not isolated.
            dp.maps
                .put_policy_ns_default("", Some(weft_common::policy::POLICY_NS_F_SYNCED))
                .expect("marking the policy maps synced");
        });
        let dir = TempDir::new("weft-cni-node-");
        let subnet: Ipv4Net = subnet.parse().expect("subnet");
        let node = Self {
            ns,
            pins,
            dir,
            subnet,
            mtu,
        };
        node.write_subnet_env();
        node
    }

    pub fn write_subnet_env(&self) {
        SubnetEnv {
            network: "10.244.0.0/16".parse().unwrap(),
            subnet: self.subnet,
            mtu: self.mtu,
            // As the agent writes it: the pod MTU is the underlay's minus 50.
            underlay_mtu: Some(self.mtu + weft_common::VXLAN_OVERHEAD),
            route_mtu: None,
            ipmasq: true,
            pin_root: self.pins.path.clone(),
        }
        .write(&self.subnet_file())
        .expect("writing subnet.env");
    }

    pub fn subnet_file(&self) -> PathBuf {
        self.dir.path.join("subnet.env")
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path.join("ipam")
    }

    /// weft's network configuration for this node. The pin root comes from subnet.env.
    pub fn conf(&self, version: &str) -> Value {
        json!({
            "cniVersion": version,
            "name": "weft",
            "type": "weft-cni",
            "subnetFile": self.subnet_file(),
            "dataDir": self.data_dir(),
        })
    }

    pub fn call(&self, command: &str, conf: &Value) -> Call {
        Call::new(&weft_cni(), command, conf)
    }

    /// ADD for `container_id` in `pod`, returning the result (panics on failure).
    pub fn add(&self, container_id: &str, pod: &Netns, version: &str) -> Value {
        self.call("ADD", &self.conf(version))
            .attachment(container_id, Some(&pod.path()))
            .run(&self.ns)
            .ok()
    }

    pub fn del(&self, container_id: &str, pod: Option<&Netns>, version: &str) -> CniOutput {
        let path = pod.map(|p| p.path());
        self.call("DEL", &self.conf(version))
            .attachment(container_id, path.as_deref())
            .run(&self.ns)
    }

    pub fn check(&self, container_id: &str, pod: &Netns, prev: &Value) -> CniOutput {
        let mut conf = self.conf(prev["cniVersion"].as_str().unwrap_or("1.1.0"));
        conf["prevResult"] = prev.clone();
        self.call("CHECK", &conf)
            .attachment(container_id, Some(&pod.path()))
            .run(&self.ns)
    }

    /// GC keeping only `valid` (container id, ifname) attachments.
    pub fn gc(&self, valid: &[(&str, &str)]) -> CniOutput {
        let mut conf = self.conf("1.1.0");
        conf["cni.dev/valid-attachments"] = valid
            .iter()
            .map(|(c, i)| json!({"containerID": c, "ifname": i}))
            .collect();
        self.call("GC", &conf).run(&self.ns)
    }

    pub fn maps(&self) -> Maps {
        Maps::open_pinned(&self.pins.path).expect("opening the node's pinned maps")
    }

    /// The IPAM store's allocations as (ip, container id, ifname).
    pub fn allocations(&self) -> Vec<(Ipv4Addr, String, String)> {
        let path = self.data_dir().join("weft").join("allocations.json");
        let Ok(text) = std::fs::read_to_string(&path) else {
            return Vec::new();
        };
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("{} is not JSON ({e}): {text}", path.display()));
        let mut out: Vec<_> = v["allocations"]
            .as_array()
            .expect("allocations array")
            .iter()
            .map(|a| {
                (
                    a["ip"].as_str().unwrap().parse().unwrap(),
                    a["containerID"].as_str().unwrap().to_string(),
                    a["ifname"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        out.sort();
        out
    }

    /// Names of the node's links starting with `wft` (weft's host-side veths).
    pub fn host_links(&self) -> Vec<String> {
        let out = self.ns.ip("-o link show");
        let mut names: Vec<String> = out
            .lines()
            .filter_map(|l| l.split(": ").nth(1))
            .map(|n| n.split('@').next().unwrap().to_string())
            .filter(|n| n.starts_with("wft"))
            .collect();
        names.sort();
        names
    }

    /// Whether `from_pod` (ingress) and `to_pod` (egress) hang off the host link `ifname` as
    /// the CNI plugin attaches them (cls_bpf filters of its clsact qdisc).
    pub fn pod_programs_attached(&self, ifname: &str) -> bool {
        let ifindex = self.ns.ifindex(ifname);
        self.ns.run(move || {
            let nl = weft_agent::netlink::BlockingNetlink::open().unwrap();
            [(false, "from_pod"), (true, "to_pod")]
                .into_iter()
                .all(|(egress, name)| {
                    nl.block_on(nl.bpf_filters(ifindex, egress))
                        .unwrap_or_default()
                        .iter()
                        .any(|f| {
                            f.priority == weft_agent::datapath::POD_FILTER_PRIORITY
                                && f.name == name
                        })
                })
        })
    }

    /// Link pins of `from_pod` under the node's pin dir.
    pub fn link_pins(&self) -> Vec<String> {
        let dir = weft_agent::datapath::pin_dir(&self.pins.path).join("links");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
    }
}

/// The pod address of an ADD result (first IPv4 entry of `ips`).
pub fn result_ip(result: &Value) -> Ipv4Addr {
    result["ips"]
        .as_array()
        .and_then(|ips| ips.iter().find_map(|ip| ip["address"].as_str()))
        .and_then(|a| a.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no IPv4 address in the result: {result}"))
}
