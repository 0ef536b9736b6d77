//! Idempotent installation of everything the build, tests, demo and benchmarks need on a fresh
//! Debian machine of this kind. Each prerequisite is checked first; only what is missing is
//! installed, so a prepared machine passes in about a second.
use std::{
    process::{Command, Stdio},
    time::Instant,
};

use anyhow::{Context as _, Result, bail};

/// Debian packages: LLVM 22 for bpf-linker, and the tools tests and benchmarks drive.
const DEBIAN_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libclang-22-dev",
    "libpolly-22-dev",
    "bpftool",
    "iproute2",
    "nftables",
    "iptables",
    "iputils-ping",
    "iperf3",
    "etcd-server",
    "containernetworking-plugins",
    "ethtool",
    "util-linux",
    "openssl",
    // `strip` for the release tarball (`cargo xtask dist`).
    "binutils",
    // A virtual environment for kubernetes-validate.
    "python3-venv",
    // BIRD 2: the BGP speaker of the bgp backend (weft-agent supervises one per node) and the
    // route reflector of the bgp demo and tests.
    "bird2",
];
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Validates deploy/weft.yaml against the Kubernetes API schemas (`--strict`: no unknown
/// fields); from PyPI, into a virtual environment of its own.
const KUBERNETES_VALIDATE_VERSION: &str = "1.37.0";

/// The virtual environment kubernetes-validate is installed in: under the user's cache, so
/// that every worktree and CI run on the machine shares it.
pub fn kubernetes_validate_venv() -> std::path::PathBuf {
    let cache = std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| std::path::PathBuf::from("/root/.cache"));
    cache.join("weft/kubernetes-validate")
}

/// The `kubernetes-validate` program of that environment.
pub fn kubernetes_validate() -> std::path::PathBuf {
    kubernetes_validate_venv().join("bin/kubernetes-validate")
}

pub fn run() -> Result<()> {
    let start = Instant::now();
    let missing: Vec<&str> = DEBIAN_PACKAGES
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "bootstrap: installing Debian packages: {}",
            missing.join(" ")
        );
        let t = Instant::now();
        sh("apt-get", &["update", "-qq"], &[])?;
        let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
        args.extend(missing.iter().copied());
        sh("apt-get", &args, &[("DEBIAN_FRONTEND", "noninteractive")])?;
        eprintln!(
            "bootstrap: packages installed in {:.0} s",
            t.elapsed().as_secs_f64()
        );
        if missing.contains(&"bird2") {
            stop_distro_bird();
        }
    }
    if !nightly_has_rust_src() {
        eprintln!("bootstrap: adding rust-src to the nightly toolchain");
        sh(
            "rustup",
            &["component", "add", "rust-src", "--toolchain", "nightly"],
            &[],
        )?;
    }
    // The lint gate of `cargo xtask test`: rustfmt and clippy on stable, clippy on nightly
    // (node-ebpf).
    for (toolchain, component) in [
        ("stable", "rustfmt"),
        ("stable", "clippy"),
        ("nightly", "clippy"),
    ] {
        if !has_component(toolchain, component) {
            eprintln!("bootstrap: adding {component} to the {toolchain} toolchain");
            sh(
                "rustup",
                &["component", "add", component, "--toolchain", toolchain],
                &[],
            )?;
        }
    }
    if !bpf_linker_ok() {
        eprintln!(
            "bootstrap: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about two minutes)"
        );
        let t = Instant::now();
        let prefix = output("llvm-config-22", &["--prefix"])?;
        let prefix = prefix.trim();
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        sh(
            &cargo,
            &[
                "install",
                "bpf-linker",
                "--version",
                BPF_LINKER_VERSION,
                "--no-default-features",
                "--features",
                "llvm-22",
                "--force",
            ],
            &[("LLVM_PREFIX", prefix), ("LLVM_SYS_221_PREFIX", prefix)],
        )?;
        eprintln!(
            "bootstrap: bpf-linker built in {:.0} s",
            t.elapsed().as_secs_f64()
        );
    }
    if !kubernetes_validate_ok() {
        eprintln!(
            "bootstrap: installing kubernetes-validate {KUBERNETES_VALIDATE_VERSION} into {}",
            kubernetes_validate_venv().display()
        );
        let venv = kubernetes_validate_venv();
        let venv_str = venv.to_str().context("cache path is not UTF-8")?;
        // Debian's python3 (python3-venv is installed above), whatever else is on PATH.
        sh(
            "/usr/bin/python3",
            &["-m", "venv", "--clear", venv_str],
            &[],
        )?;
        let pip = venv.join("bin/pip");
        sh(
            pip.to_str().context("cache path is not UTF-8")?,
            &[
                "install",
                "--quiet",
                "--disable-pip-version-check",
                &format!("kubernetes-validate=={KUBERNETES_VALIDATE_VERSION}"),
            ],
            &[],
        )?;
        if !kubernetes_validate_ok() {
            bail!("kubernetes-validate was installed but does not run");
        }
    }
    eprintln!("bootstrap: ready ({:.1} s)", start.elapsed().as_secs_f64());
    Ok(())
}

/// Debian's bird2 enables and starts a system-wide `bird.service` (where systemd runs): weft
/// never uses it (every weft node runs its own BIRD with per-node sockets and files), so the
/// instance the package just started is stopped and disabled rather than left speaking in the
/// machine's own namespace. Only right after this bootstrap installed the package: a BIRD the
/// machine already had is not ours to touch.
fn stop_distro_bird() {
    let active = Command::new("systemctl")
        .args(["is-enabled", "--quiet", "bird.service"])
        .status()
        .is_ok_and(|s| s.success());
    if active {
        eprintln!("bootstrap: disabling the distribution's bird.service (weft runs its own)");
        let _ = sh("systemctl", &["disable", "--now", "bird.service"], &[]);
    }
}

fn dpkg_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).contains("install ok installed")
        })
        .unwrap_or(false)
}

fn has_component(toolchain: &str, component: &str) -> bool {
    Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", toolchain])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with(component))
        })
        .unwrap_or(false)
}

fn nightly_has_rust_src() -> bool {
    Command::new("rustup")
        .args(["+nightly", "component", "list", "--installed"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .any(|l| l.starts_with("rust-src"))
        })
        .unwrap_or(false)
}

fn bpf_linker_ok() -> bool {
    Command::new("bpf-linker")
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success() && String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION)
        })
        .unwrap_or(false)
}

fn kubernetes_validate_ok() -> bool {
    Command::new(kubernetes_validate())
        .arg("--version")
        .output()
        .map(|o| {
            o.status.success()
                && String::from_utf8_lossy(&o.stdout).trim() == KUBERNETES_VALIDATE_VERSION
        })
        .unwrap_or(false)
}

fn output(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn sh(cmd: &str, args: &[&str], env: &[(&str, &str)]) -> Result<()> {
    let mut c = Command::new(cmd);
    c.args(args).stdin(Stdio::null());
    for (k, v) in env {
        c.env(k, v);
    }
    let status = c.status().with_context(|| format!("running {cmd}"))?;
    if !status.success() {
        bail!("{cmd} {} failed ({status})", args.join(" "));
    }
    Ok(())
}
