//! The release as an operator gets it: the tarball `cargo xtask dist` makes (`cargo xtask test`
//! makes it before the tests run), the image its Dockerfile builds, and `deploy/weft.yaml`.
//!
//! - The tarball holds the stripped release binaries, the conflist the agent installs, the
//!   manifest and the Dockerfile; the Dockerfile copies only what the tarball holds and starts
//!   a binary it copied; the manifest runs binaries the image has, under the workspace
//!   version's tag; it passes `kubernetes-validate --strict`.
//! - The unpacked binaries run a cluster the way the DaemonSet runs them: the init container's
//!   install step with no capability at all, the agent with exactly the manifest's capabilities,
//!   a read-only root filesystem and a read-only /proc/sys (as a container runtime mounts them),
//!   the host's /proc/sys/net where the manifest mounts it; pods across nodes reach each other.
//! - Each of the manifest's capabilities is needed: without any one of them an agent of the
//!   bgp backend fails (NET_BIND_SERVICE is BIRD's, for BGP's port 179; an agent of another
//!   backend runs without it).
//! - The manifest's resource requests and limits cover what the agent measurably uses.
use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use weft_common::RouteMode;
use weft_tests::{
    cluster::{Cluster, ClusterOptions, bin_dir, cni},
    flow::tcp_transfer,
    netns::{Netns, unique_name, veth_pair},
    pins::PinDir,
    process::{NsProcess, wait_until},
};

const VERSION: &str = env!("CARGO_PKG_VERSION");

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn run(cmd: &str, args: &[&str]) -> std::process::Output {
    Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"))
}

fn run_ok(cmd: &str, args: &[&str]) -> String {
    let out = run(cmd, args);
    assert!(
        out.status.success(),
        "{cmd} {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The bootstrap's kubernetes-validate (`cargo xtask test` passes its path).
fn kubernetes_validate() -> PathBuf {
    let path = std::env::var_os("KUBERNETES_VALIDATE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(home).join(".cache"))
                .join("weft/kubernetes-validate/bin/kubernetes-validate")
        });
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask bootstrap` installs it (`cargo xtask test` does)",
        path.display()
    );
    path
}

/// deploy/weft.yaml's documents as JSON (PyYAML from kubernetes-validate's environment).
fn manifest() -> Vec<Value> {
    let python = kubernetes_validate().parent().unwrap().join("python");
    let path = workspace_root().join("deploy/weft.yaml");
    let out = run_ok(
        python.to_str().unwrap(),
        &[
            "-c",
            "import json, sys, yaml; print(json.dumps([d for d in yaml.safe_load_all(open(sys.argv[1])) if d]))",
            path.to_str().unwrap(),
        ],
    );
    serde_json::from_str(&out).expect("manifest as JSON")
}

fn daemonset(docs: &[Value]) -> &Value {
    docs.iter()
        .find(|d| d["kind"] == "DaemonSet")
        .expect("a DaemonSet")
}

fn container<'a>(ds: &'a Value, list: &str, name: &str) -> &'a Value {
    ds["spec"]["template"]["spec"][list]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no {list} entry named {name}"))
}

/// The agent's `--flag=value` from the manifest.
fn manifest_flag(agent: &Value, flag: &str) -> Option<String> {
    agent["command"].as_array()?.iter().find_map(|a| {
        a.as_str()?
            .strip_prefix(&format!("{flag}="))
            .map(str::to_string)
    })
}

/// The capabilities a container adds (after dropping ALL), as setpriv names them.
fn added_capabilities(c: &Value) -> Vec<String> {
    let caps = &c["securityContext"]["capabilities"];
    assert_eq!(
        caps["drop"],
        json!(["ALL"]),
        "{} must drop ALL capabilities",
        c["name"]
    );
    caps["add"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c.as_str().unwrap().to_lowercase())
                .collect()
        })
        .unwrap_or_default()
}

/// `target/dist/weft-<version>-<arch>-linux.tar.gz`, not older than the binaries it ships.
fn tarball() -> PathBuf {
    let target = bin_dir().parent().unwrap().to_path_buf();
    let path = target.join(format!(
        "dist/weft-{VERSION}-{}-linux.tar.gz",
        std::env::consts::ARCH
    ));
    assert!(
        path.exists(),
        "{} is missing: `cargo xtask dist` makes it (`cargo xtask test` does)",
        path.display()
    );
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).unwrap();
    for bin in ["weft-agent", "weft-cni", "weft"] {
        let built = bin_dir().join(bin);
        if built.exists() {
            assert!(
                mtime(&path) >= mtime(&built),
                "{} is older than {}: run `cargo xtask dist` again (`cargo xtask test` does)",
                path.display(),
                built.display()
            );
        }
    }
    path
}

/// The tarball unpacked into a fresh directory, removed on drop.
struct Unpacked {
    dir: PathBuf,
}

impl Unpacked {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(unique_name("weft-release-"));
        std::fs::create_dir_all(&dir).unwrap();
        run_ok(
            "tar",
            &[
                "-xzf",
                tarball().to_str().unwrap(),
                "-C",
                dir.to_str().unwrap(),
            ],
        );
        Self { dir }
    }

    /// `weft-<version>/`: the image's build context.
    fn top(&self) -> PathBuf {
        self.dir.join(format!("weft-{VERSION}"))
    }

    /// Every file, relative to the top directory.
    fn files(&self) -> BTreeSet<String> {
        fn walk(base: &Path, dir: &Path, out: &mut BTreeSet<String>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let p = e.unwrap().path();
                if p.is_dir() {
                    walk(base, &p, out);
                } else {
                    out.insert(p.strip_prefix(base).unwrap().display().to_string());
                }
            }
        }
        let mut out = BTreeSet::new();
        walk(&self.top(), &self.top(), &mut out);
        out
    }
}

impl Drop for Unpacked {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Dockerfile instructions: (keyword, arguments), continuation lines joined, comments dropped.
fn dockerfile_instructions(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            current.push_str(body);
            current.push(' ');
            continue;
        }
        current.push_str(t);
        let (kw, args) = current
            .split_once(char::is_whitespace)
            .unwrap_or((&current, ""));
        out.push((kw.to_uppercase(), args.trim().to_string()));
        current.clear();
    }
    out
}

/// The words of an instruction: its JSON form (`["a", "b"]`) or whitespace-separated.
fn instruction_words(args: &str) -> Vec<String> {
    if args.starts_with('[') {
        serde_json::from_str(args).expect("JSON-form instruction")
    } else {
        args.split_whitespace().map(str::to_string).collect()
    }
}

#[test]
fn tarball_image_and_manifest_agree() {
    let unpacked = Unpacked::new();
    let files = unpacked.files();
    let top = unpacked.top();
    for required in [
        "bin/weft-agent",
        "bin/weft-cni",
        "bin/weft",
        "cni/10-weft.conflist",
        "deploy/weft.yaml",
        "deploy/grafana/weft.json",
        "Dockerfile",
        "README.md",
        "docs/configuration.md",
    ] {
        assert!(
            files.contains(required),
            "{required} missing from the tarball: {files:?}"
        );
    }
    // Release binaries, stripped, reporting the workspace version.
    for bin in ["weft-agent", "weft-cni", "weft"] {
        let path = top.join("bin").join(bin);
        let sections = run_ok("readelf", &["-S", "-W", path.to_str().unwrap()]);
        assert!(!sections.contains(".symtab"), "{bin} is not stripped");
        assert!(
            !sections.contains(".debug_info"),
            "{bin} carries debug info"
        );
    }
    let version = run_ok(top.join("bin/weft-agent").to_str().unwrap(), &["--version"]);
    assert_eq!(version.trim(), format!("weft-agent {VERSION}"));
    // The shipped manifest and Dockerfile are the repository's.
    for f in ["deploy/weft.yaml", "Dockerfile"] {
        assert_eq!(
            std::fs::read(top.join(f)).unwrap(),
            std::fs::read(workspace_root().join(f)).unwrap(),
            "the tarball's {f} differs from the repository's: run `cargo xtask dist` again"
        );
    }
    // The conflist is the one `--install-cni` writes, naming the shipped plugin.
    let conflist: Value =
        serde_json::from_slice(&std::fs::read(top.join("cni/10-weft.conflist")).unwrap()).unwrap();
    assert_eq!(conflist["cniVersion"], "1.1.0");
    assert_eq!(conflist["plugins"][0]["type"], "weft-cni");

    // The Dockerfile builds from the unpacked tarball: everything it copies is there, and its
    // entrypoint is a binary it copied.
    let dockerfile = std::fs::read_to_string(top.join("Dockerfile")).unwrap();
    let instructions = dockerfile_instructions(&dockerfile);
    let mut installed: BTreeSet<String> = BTreeSet::new();
    let mut copies = 0;
    for (kw, args) in &instructions {
        if kw != "COPY" && kw != "ADD" {
            continue;
        }
        let words: Vec<String> = instruction_words(args)
            .into_iter()
            .filter(|w| !w.starts_with("--"))
            .collect();
        assert!(
            !args.contains("--from"),
            "{kw} {args}: the image is built from the tarball alone"
        );
        let (dest, sources) = words.split_last().expect("COPY needs a destination");
        for source in sources {
            assert!(
                files.contains(source.trim_start_matches("./")),
                "Dockerfile `{kw} {args}`: {source} is not in the tarball ({files:?})"
            );
            let name = Path::new(source).file_name().unwrap().to_string_lossy();
            let target = if dest.ends_with('/') || sources.len() > 1 {
                format!("{}/{name}", dest.trim_end_matches('/'))
            } else {
                dest.clone()
            };
            installed.insert(target);
            copies += 1;
        }
    }
    assert!(copies >= 3, "the Dockerfile copies no binaries");
    let entrypoint = instructions
        .iter()
        .find(|(kw, _)| kw == "ENTRYPOINT")
        .map(|(_, a)| instruction_words(a))
        .expect("an ENTRYPOINT");
    assert!(
        installed.contains(&entrypoint[0]),
        "ENTRYPOINT {} is not a binary the Dockerfile copies ({installed:?})",
        entrypoint[0]
    );
    // The base is the Debian release the binaries were built on (their glibc).
    let os_release = std::fs::read_to_string("/etc/os-release").unwrap();
    let codename = os_release
        .lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .expect("VERSION_CODENAME");
    let from = instructions
        .iter()
        .find(|(kw, _)| kw == "FROM")
        .map(|(_, a)| a.clone())
        .unwrap();
    assert_eq!(from, format!("debian:{codename}-slim"));
    // Every version the Dockerfile names is the workspace's.
    for word in dockerfile.split(|c: char| !(c.is_ascii_digit() || c == '.')) {
        let word = word.trim_matches('.');
        if word.split('.').count() == 3 && word.split('.').all(|p| p.parse::<u32>().is_ok()) {
            assert_eq!(word, VERSION, "the Dockerfile names version {word}");
        }
    }
    assert!(dockerfile.contains(&format!("org.opencontainers.image.version=\"{VERSION}\"")));
    // The bgp backend's speaker: the agent runs `bird` and `birdc` (Debian's bird2).
    let packages: BTreeSet<String> = instructions
        .iter()
        .filter(|(kw, _)| kw == "RUN")
        .flat_map(|(_, a)| instruction_words(a))
        .collect();
    assert!(
        packages.contains("bird2"),
        "the image does not install bird2: {packages:?}"
    );

    // The manifest runs that image, tagged with the workspace version, and binaries it has.
    let docs = manifest();
    let ds = daemonset(&docs);
    let pod = &ds["spec"]["template"]["spec"];
    let mut images = BTreeSet::new();
    for list in ["initContainers", "containers"] {
        for c in pod[list].as_array().unwrap() {
            let image = c["image"].as_str().unwrap();
            images.insert(image.to_string());
            assert!(
                image.ends_with(&format!(":{VERSION}")),
                "{} runs {image}: the tag must be the workspace version {VERSION} (Cargo.toml)",
                c["name"]
            );
            let program = c["command"][0].as_str().unwrap();
            assert!(
                installed.contains(program),
                "{} runs {program}, which the image does not have ({installed:?})",
                c["name"]
            );
        }
    }
    assert_eq!(images.len(), 1, "one image for every container: {images:?}");
}

#[test]
fn manifest_passes_kubernetes_validate_strict() {
    let validate = kubernetes_validate();
    let manifest_path = workspace_root().join("deploy/weft.yaml");
    // The oldest Kubernetes the manifest supports (appArmorProfile is 1.30's) and the newest
    // the validator knows.
    for version in [Some("1.30"), None] {
        let mut args = vec!["--strict"];
        if let Some(v) = version {
            args.extend(["--kubernetes-version", v]);
        }
        args.push(manifest_path.to_str().unwrap());
        let out = run(validate.to_str().unwrap(), &args);
        assert!(
            out.status.success(),
            "kubernetes-validate {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The validator is strict: a field the API does not have fails it.
    let text = std::fs::read_to_string(&manifest_path).unwrap();
    let bad = text.replacen(
        "      hostNetwork: true",
        "      hostNetwork: true\n      hostNetwrk: true",
        1,
    );
    assert_ne!(bad, text);
    let bad_path = std::env::temp_dir().join(format!("{}.yaml", unique_name("weft-bad-")));
    std::fs::write(&bad_path, bad).unwrap();
    let out = run(
        validate.to_str().unwrap(),
        &["--strict", bad_path.to_str().unwrap()],
    );
    let _ = std::fs::remove_file(&bad_path);
    assert!(
        !out.status.success(),
        "kubernetes-validate --strict accepted an unknown field"
    );

    // Least privilege: the verbs the agent uses, on nodes, and (NetworkPolicy) read-only on
    // pods, namespaces and networkpolicies.
    let docs = manifest();
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("a ClusterRole");
    let mut grants = BTreeSet::new();
    for rule in role["rules"].as_array().unwrap() {
        let group = rule["apiGroups"].as_array().unwrap();
        assert_eq!(group.len(), 1, "{rule}");
        let group = group[0].as_str().unwrap();
        for resource in rule["resources"].as_array().unwrap() {
            for verb in rule["verbs"].as_array().unwrap() {
                let resource = resource.as_str().unwrap();
                let resource = if group.is_empty() {
                    resource.to_string()
                } else {
                    format!("{resource}.{group}")
                };
                grants.insert(format!("{resource} {}", verb.as_str().unwrap()));
            }
        }
    }
    let want: BTreeSet<String> = [
        "nodes get",
        "nodes list",
        "nodes watch",
        "nodes patch",
        "pods get",
        "pods list",
        "pods watch",
        "namespaces get",
        "namespaces list",
        "namespaces watch",
        "networkpolicies.networking.k8s.io get",
        "networkpolicies.networking.k8s.io list",
        "networkpolicies.networking.k8s.io watch",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(grants, want);
    // No privileged container; the agent's capabilities are the measured set.
    let ds = daemonset(&docs);
    for list in ["initContainers", "containers"] {
        for c in ds["spec"]["template"]["spec"][list].as_array().unwrap() {
            assert_ne!(
                c["securityContext"]["privileged"],
                json!(true),
                "{} is privileged",
                c["name"]
            );
            assert!(
                c["resources"]["requests"].is_object() && c["resources"]["limits"].is_object(),
                "{} has no resource requests and limits",
                c["name"]
            );
        }
    }
    let agent = container(ds, "containers", "agent");
    let mut caps = added_capabilities(agent);
    caps.sort();
    assert_eq!(caps, ["bpf", "net_admin", "net_bind_service", "perfmon"]);
    assert!(added_capabilities(container(ds, "initContainers", "install-cni")).is_empty());
}

/// Linux capability names by bit number (capability.h).
const CAP_NAMES: [&str; 41] = [
    "chown",
    "dac_override",
    "dac_read_search",
    "fowner",
    "fsetid",
    "kill",
    "setgid",
    "setuid",
    "setpcap",
    "linux_immutable",
    "net_bind_service",
    "net_broadcast",
    "net_admin",
    "net_raw",
    "ipc_lock",
    "ipc_owner",
    "sys_module",
    "sys_rawio",
    "sys_chroot",
    "sys_ptrace",
    "sys_pacct",
    "sys_admin",
    "sys_boot",
    "sys_nice",
    "sys_resource",
    "sys_time",
    "sys_tty_config",
    "mknod",
    "lease",
    "audit_write",
    "audit_control",
    "setfcap",
    "mac_override",
    "mac_admin",
    "syslog",
    "wake_alarm",
    "block_suspend",
    "audit_read",
    "perfmon",
    "bpf",
    "checkpoint_restore",
];

/// A process's effective capabilities, by name.
fn effective_capabilities(pid: u32) -> BTreeSet<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    let bits = u64::from_str_radix(hex, 16).unwrap();
    (0..64)
        .filter(|b| bits & (1 << b) != 0)
        .map(|b| {
            CAP_NAMES
                .get(b)
                .map(|n| n.to_string())
                .unwrap_or(format!("cap{b}"))
        })
        .collect()
}

/// Runs the agent as the DaemonSet's container runs it: in a mount namespace of its own where
/// the root filesystem and /proc/sys are read-only (runtimes mount /proc/sys read-only in every
/// unprivileged container), the node's directory stays writable (the hostPath volumes), the
/// host's /proc/sys/net is bound where the manifest mounts it and passed as
/// `--sysctl-net-dir`, and only `caps` remain (as uid 0, like the container).
fn daemonset_wrapper(caps: Vec<String>, sysctl_dir: String) -> weft_tests::cluster::AgentWrapper {
    Arc::new(move |dir: &Path| {
        let dir = dir.display().to_string();
        let bounding: String = std::iter::once("-all".to_string())
            .chain(caps.iter().map(|c| format!("+{c}")))
            .collect::<Vec<_>>()
            .join(",");
        let sysctl = format!("{dir}{sysctl_dir}");
        let script = format!(
            "set -e
mount --bind '{dir}' '{dir}'
mkdir -p '{sysctl}'
mount --bind /proc/sys/net '{sysctl}'
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
mount -o remount,bind,ro /
exec setpriv --bounding-set={bounding} --inh-caps=-all -- \"$0\" \"$@\" --sysctl-net-dir='{sysctl}'"
        );
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "--",
            "sh",
            "-c",
            &script,
        ]
        .into_iter()
        .map(String::from)
        .collect()
    })
}

/// Sum of the `memlock` of every BPF map and program a process holds: memory charged to its
/// memory cgroup.
fn bpf_memlock_bytes(pid: u32) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(format!("/proc/{pid}/fdinfo")).unwrap() {
        let Ok(info) = std::fs::read_to_string(entry.unwrap().path()) else {
            continue;
        };
        if !(info.contains("map_type:") || info.contains("prog_type:")) {
            continue;
        }
        total += info
            .lines()
            .find_map(|l| l.strip_prefix("memlock:"))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    total
}

fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} of {pid}"))
}

/// utime + stime in clock ticks (USER_HZ = 100).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// "64Mi", "256Mi", "1Gi" in bytes; "50m", "1" in cores.
fn quantity_bytes(q: &Value) -> u64 {
    let s = q.as_str().unwrap();
    for (suffix, unit) in [("Ki", 1u64 << 10), ("Mi", 1 << 20), ("Gi", 1 << 30)] {
        if let Some(n) = s.strip_suffix(suffix) {
            return n.parse::<u64>().unwrap() * unit;
        }
    }
    s.parse().unwrap()
}

fn quantity_cores(q: &Value) -> f64 {
    let s = q.as_str().unwrap();
    match s.strip_suffix('m') {
        Some(milli) => milli.parse::<f64>().unwrap() / 1000.0,
        None => s.parse().unwrap(),
    }
}

#[test]
fn unpacked_release_runs_a_cluster_as_the_daemonset_runs_it() {
    let unpacked = Unpacked::new();
    let bin = unpacked.top().join("bin");
    let docs = manifest();
    let ds = daemonset(&docs);
    let agent_spec = container(ds, "containers", "agent");
    let init_spec = container(ds, "initContainers", "install-cni");

    // The init container's step, with its capabilities (none): the plugin and the conflist
    // land in the host's CNI directories.
    let host = unpacked.dir.join("host");
    let (cni_bin, cni_conf) = (host.join("opt/cni/bin"), host.join("etc/cni/net.d"));
    let mut install = vec![format!(
        "--bounding-set=-all{}",
        added_capabilities(init_spec)
            .iter()
            .map(|c| format!(",+{c}"))
            .collect::<String>()
    )];
    install.extend(
        [
            "--inh-caps=-all",
            "--",
            bin.join("weft-agent").to_str().unwrap(),
            "--install-cni",
            "--install-cni-only",
            "--cni-bin-dir",
            cni_bin.to_str().unwrap(),
            "--cni-conf-dir",
            cni_conf.to_str().unwrap(),
        ]
        .map(String::from),
    );
    let install: Vec<&str> = install.iter().map(String::as_str).collect();
    run_ok("setpriv", &install);
    assert_eq!(
        std::fs::read(cni_bin.join("weft-cni")).unwrap(),
        std::fs::read(bin.join("weft-cni")).unwrap()
    );
    let installed: Value =
        serde_json::from_slice(&std::fs::read(cni_conf.join("10-weft.conflist")).unwrap()).unwrap();
    let template: Value = serde_json::from_slice(
        &std::fs::read(unpacked.top().join("cni/10-weft.conflist")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        installed, template,
        "the tarball's conflist is what a node gets"
    );

    // The agent with the manifest's capabilities and mounts.
    let caps = added_capabilities(agent_spec);
    let sysctl_dir =
        manifest_flag(agent_spec, "--sysctl-net-dir").expect("the agent's --sysctl-net-dir");
    let mounted = agent_spec["volumeMounts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["mountPath"] == sysctl_dir.as_str())
        .unwrap_or_else(|| panic!("nothing is mounted at --sysctl-net-dir {sysctl_dir}"));
    let volume = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == mounted["name"])
        .unwrap();
    assert_eq!(volume["hostPath"]["path"], "/proc/sys/net");
    let options = ClusterOptions {
        nodes: 2,
        bin_dir: Some(bin.clone()),
        agent_wrapper: Some(daemonset_wrapper(caps.clone(), sysctl_dir)),
        ..Default::default()
    };
    let mut cluster = Cluster::new(options);
    for i in 0..cluster.nodes.len() {
        cluster.wait_ready(i);
        let pid = cluster.nodes[i].agent.as_ref().unwrap().pid();
        let want: BTreeSet<String> = caps.iter().cloned().collect();
        assert_eq!(
            effective_capabilities(pid),
            want,
            "the agent's capabilities"
        );
        let mountinfo = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
        let root = mountinfo
            .lines()
            .find(|l| l.split_whitespace().nth(4) == Some("/"))
            .unwrap();
        assert!(
            root.split_whitespace()
                .nth(5)
                .unwrap()
                .split(',')
                .any(|o| o == "ro"),
            "the agent's root filesystem is not read-only: {root}"
        );
    }
    // Pods through the shipped plugin: one per node with the harness's config, one with the
    // installed conflist's (the node's paths substituted).
    for i in 0..cluster.nodes.len() {
        cluster.add_pod(i);
    }
    {
        let node = &cluster.nodes[1];
        let mut conf = installed["plugins"][0].clone();
        conf["cniVersion"] = installed["cniVersion"].clone();
        conf["name"] = installed["name"].clone();
        for key in ["subnetFile", "dataDir", "pinRoot"] {
            conf[key] = node.cni_conf()[key].clone();
        }
        let ns = Netns::new("wp");
        let id = unique_name("ctr");
        let result = cni(node, "ADD", &id, &ns.path(), &conf);
        let ip: std::net::Ipv4Addr = result["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| panic!("no address in {result}"));
        cluster.nodes[1].pods.push(weft_tests::cluster::Pod {
            ns,
            container_id: id,
            ip,
        });
    }
    let probes = cluster.assert_full_matrix();
    assert!(probes >= 3 * 2 + 3 * 2 + 2 * 3, "{probes} probes");
    // A restart under the same capabilities adopts the pinned maps, programs and links.
    cluster.restart_agent(0);
    cluster.wait_ready(0);
    let restarted = cluster.nodes[0].agent.as_ref().unwrap().pid();
    assert_eq!(
        effective_capabilities(restarted),
        caps.iter().cloned().collect::<BTreeSet<String>>()
    );
    cluster.assert_full_matrix();
    // The shipped CLI reads a node's pinned maps: its route to the other node.
    let node = &cluster.nodes[0];
    let routes = run_ok(
        bin.join("weft").to_str().unwrap(),
        &["--pin-root", node.pins.path.to_str().unwrap(), "routes"],
    );
    let other = cluster.nodes[1].ip.to_string();
    assert!(
        routes.contains(&other),
        "weft routes lists no route to {other}:\n{routes}"
    );
    live_switch_without_entering_pods(&mut cluster);

    // Resources: what the agents use against what the manifest asks for.
    let resources = &agent_spec["resources"];
    let (req_mem, lim_mem) = (
        quantity_bytes(&resources["requests"]["memory"]),
        quantity_bytes(&resources["limits"]["memory"]),
    );
    let req_cpu = quantity_cores(&resources["requests"]["cpu"]);
    let pids: Vec<u32> = cluster
        .nodes
        .iter()
        .map(|n| n.agent.as_ref().unwrap().pid())
        .collect();
    let ticks0: Vec<u64> = pids.iter().map(|p| cpu_ticks(*p)).collect();
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    for (i, pid) in pids.iter().enumerate() {
        let idle_cores = (cpu_ticks(*pid) - ticks0[i]) as f64 / 100.0 / t0.elapsed().as_secs_f64();
        let (rss, peak) = (
            status_kib(*pid, "VmRSS:") << 10,
            status_kib(*pid, "VmHWM:") << 10,
        );
        let bpf = bpf_memlock_bytes(*pid);
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        eprintln!(
            "agent {i}: RSS {:.1} MiB, peak {:.1} MiB, BPF maps and programs {:.1} MiB, idle CPU {:.4} cores",
            mib(rss),
            mib(peak),
            mib(bpf),
            idle_cores
        );
        assert!(
            bpf > 1 << 20,
            "no BPF memory found for the agent ({bpf} bytes)"
        );
        assert!(
            req_mem >= rss + bpf,
            "memory request {:.0} MiB is below what an idle agent holds ({:.1} MiB resident + {:.1} MiB BPF)",
            mib(req_mem),
            mib(rss),
            mib(bpf)
        );
        assert!(
            lim_mem >= 2 * (peak + bpf),
            "memory limit {:.0} MiB leaves less than twice the agent's peak ({:.1} MiB + {:.1} MiB BPF): raise it in deploy/weft.yaml",
            mib(lim_mem),
            mib(peak),
            mib(bpf)
        );
        assert!(
            req_cpu >= idle_cores,
            "CPU request {req_cpu} is below the idle agent's {idle_cores:.4} cores"
        );
    }
}

/// A live backend switch under the manifest's capabilities. The agent may not enter pods'
/// network namespaces (that needs CAP_SYS_ADMIN, which the manifest does not give), so it
/// says so once per change and running pods keep their route MTU. Pods created under host-gw
/// (no route MTU, 1500-byte packets) still get bulk TCP both ways once vxlan is back: they
/// learn the path MTU from the datapath's fragmentation-needed.
fn live_switch_without_entering_pods(cluster: &mut Cluster) {
    const REFUSED: &str = "cannot enter pods' network namespaces";
    let refusals = |c: &Cluster, i: usize| c.nodes[i].log().matches(REFUSED).count();
    let switch = |c: &mut Cluster, backend: &str, mode: RouteMode, refused: usize| {
        c.options.backend = backend.into();
        c.write_net_conf();
        for i in 0..c.nodes.len() {
            wait_until(
                &format!("{} to switch to {backend}", c.nodes[i].name),
                Duration::from_secs(20),
                || c.nodes[i].routes_all_in(mode) && refusals(c, i) >= refused,
            );
        }
    };
    switch(cluster, "host-gw", RouteMode::Direct, 1);
    let before = cluster
        .nodes
        .iter()
        .map(|n| n.pods.len())
        .collect::<Vec<_>>();
    for i in 0..cluster.nodes.len() {
        cluster.add_pod(i);
    }
    switch(cluster, "vxlan", RouteMode::Vxlan, 2);
    let (a, b) = (
        &cluster.nodes[0].pods[before[0]],
        &cluster.nodes[1].pods[before[1]],
    );
    for pod in [a, b] {
        let route = pod.ns.exec("ip", &["-4", "route", "show", "default"]);
        assert!(!route.contains("mtu"), "a pod made under host-gw: {route}");
    }
    tcp_transfer(&b.ns, b.ip, 7500, &a.ns, 4 << 20, Duration::from_secs(30));
    tcp_transfer(&a.ns, a.ip, 7501, &b.ns, 4 << 20, Duration::from_secs(30));
    let sent: u64 = cluster
        .nodes
        .iter()
        .map(|n| {
            let stats = n.maps().stats().unwrap();
            stats
                .iter()
                .find(|(k, _)| *k == weft_common::Stat::FragNeededSent)
                .map_or(0, |(_, v)| *v)
        })
        .sum();
    assert!(sent >= 2, "{sent} fragmentation-needed sent");
    cluster.assert_full_matrix();
}

/// A node namespace with an underlay link, for one agent on its own (static datastore), with
/// `backend`. With bgp the other end of the link runs BIRD as the agent's mesh peer, and the
/// agent counts as working once that session is Established too.
fn lone_agent(bin: &Path, caps: &[String], backend: &str) -> (bool, String) {
    let a = Netns::new("wca");
    let b = Netns::new("wcb");
    veth_pair(&a, "eth0", &b, "eth0");
    a.ip("addr add 192.168.92.1/24 dev eth0");
    b.ip("addr add 192.168.92.2/24 dev eth0");
    a.ip("route add default via 192.168.92.2");
    // The sysctls the agent wants, set already (the agent writes only what differs): what
    // fails without a capability is then the datapath itself.
    for (key, value) in [
        ("net.ipv4.ip_forward", "1"),
        ("net.ipv4.conf.all.rp_filter", "0"),
        ("net.ipv4.conf.default.rp_filter", "0"),
        ("net.ipv4.conf.eth0.rp_filter", "0"),
    ] {
        a.sysctl(key, value);
    }
    let pins = PinDir::new("cap");
    let dir = std::env::temp_dir().join(unique_name("weft-cap-"));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("nodes.json"),
        json!({"nodes": [
            {"name": "a", "publicIP": "192.168.92.1", "subnet": "10.72.1.0/24"},
            {"name": "b", "publicIP": "192.168.92.2", "subnet": "10.72.2.0/24"},
        ]})
        .to_string(),
    )
    .unwrap();
    std::fs::write(
        dir.join("net-conf.json"),
        json!({"Network": "10.72.0.0/16", "Backend": {"Type": backend}}).to_string(),
    )
    .unwrap();
    let peer = (backend == "bgp").then(|| {
        weft_tests::bird::Bird::start(
            &b,
            "router id 192.168.92.2;\nprotocol device {}\n\
             protocol bgp a { local 192.168.92.2 as 64512; neighbor 192.168.92.1 as 64512;\n\
               connect delay time 1; ipv4 { import all; export none; }; }\n"
                .into(),
        )
    });
    let bounding = std::iter::once("-all".to_string())
        .chain(caps.iter().map(|c| format!("+{c}")))
        .collect::<Vec<_>>()
        .join(",");
    let args: Vec<String> = [
        &format!("--bounding-set={bounding}"),
        "--inh-caps=-all",
        "--",
        bin.join("weft-agent").to_str().unwrap(),
        "--datastore",
        "static",
        "--static-file",
        dir.join("nodes.json").to_str().unwrap(),
        "--net-conf",
        dir.join("net-conf.json").to_str().unwrap(),
        "--node-name",
        "a",
        "--pin-root",
        pins.path.to_str().unwrap(),
        "--subnet-file",
        dir.join("a.env").to_str().unwrap(),
        "--bgp-dir",
        dir.join("bird").to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let log = dir.join("agent.log");
    let mut agent = NsProcess::spawn(&a, Path::new("/usr/bin/setpriv"), &args, &[], &log);
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let text = agent.log();
        let peered = peer.as_ref().is_none_or(|p| p.established() == 1);
        if text.contains(" ready") && peered {
            break true;
        }
        // BIRD gives a session up when it cannot listen: it never comes up.
        if agent.exited()
            || text.contains("Cannot open listening socket")
            || Instant::now() > deadline
        {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let text = agent.log();
    agent.kill();
    let _ = std::fs::remove_dir_all(&dir);
    (ready, text)
}

#[test]
fn each_capability_of_the_manifest_is_needed() {
    let unpacked = Unpacked::new();
    let bin = unpacked.top().join("bin");
    let docs = manifest();
    let caps = added_capabilities(container(daemonset(&docs), "containers", "agent"));
    let (ready, log) = lone_agent(&bin, &caps, "bgp");
    assert!(
        ready,
        "the bgp agent with {caps:?} did not get ready and peered:\n{log}"
    );
    for left_out in &caps {
        let fewer: Vec<String> = caps.iter().filter(|c| *c != left_out).cloned().collect();
        let (ready, log) = lone_agent(&bin, &fewer, "bgp");
        assert!(
            !ready,
            "the agent got ready without {left_out}: drop it from deploy/weft.yaml\n{log}"
        );
        assert!(
            log.contains("Operation not permitted") || log.contains("Permission denied"),
            "without {left_out} the agent failed for another reason than a permission:\n{log}"
        );
        // Why each is needed (deploy/weft.yaml says so): maps need CAP_BPF; a sockmap (the
        // monitor's) and tc and XDP programs need CAP_NET_ADMIN; without CAP_PERFMON the
        // verifier refuses the programs' pointer arithmetic; BIRD binds BGP's port 179
        // (CAP_NET_BIND_SERVICE).
        let step = match left_out.as_str() {
            "bpf" => "failed to create map",
            "net_admin" => "failed to create map `WEFT_MONITOR_SOCKS`",
            // The first refusal depends on the program's code: `pointer -= pointer prohibited`,
            // `pointer arithmetic with it prohibited for !root`, ...
            "perfmon" => "prohibited",
            "net_bind_service" => "Cannot open listening socket",
            _ => "",
        };
        assert!(
            log.contains(step),
            "without {left_out} the agent should fail at {step:?}:\n{log}"
        );
        eprintln!(
            "without {left_out}: {}",
            log.lines()
                .rfind(|l| l.contains("weft-agent:") || l.contains(step))
                .unwrap_or("")
                .chars()
                .take(300)
                .collect::<String>()
        );
    }
    // Only BIRD needs NET_BIND_SERVICE: an agent of another backend runs without it.
    let fewer: Vec<String> = caps
        .iter()
        .filter(|c| *c != "net_bind_service")
        .cloned()
        .collect();
    let (ready, log) = lone_agent(&bin, &fewer, "vxlan");
    assert!(
        ready,
        "the vxlan agent needs no NET_BIND_SERVICE, yet did not get ready:\n{log}"
    );
}
