//! `cargo xtask dist`: the release tarball. Release binaries (stripped), the conflist the agent
//! installs, the Kubernetes manifest and the Dockerfile that builds the image from the unpacked
//! tarball. The workspace version names the tarball and must be the manifest's image tag, so one
//! place (Cargo.toml) decides it.
use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, workspace_root};

/// The binaries the tarball ships: `weft-agent` and `weft` from the `weft-agent` package,
/// `weft-cni` from `weft-node`.
pub const BINARIES: [&str; 3] = ["weft-agent", "weft-cni", "weft"];

pub fn version() -> &'static str {
    env!("CARGO_PKG_VERSION")
}

/// `target/dist`.
pub fn dist_dir() -> PathBuf {
    workspace_root().join("target/dist")
}

/// The top directory inside the tarball: `weft-<version>`.
pub fn top_dir_name() -> String {
    format!("weft-{}", version())
}

/// `weft-<version>-<arch>-linux.tar.gz`.
pub fn tarball_name() -> String {
    format!("weft-{}-{}-linux.tar.gz", version(), std::env::consts::ARCH)
}

/// The image the manifest names, checked against the workspace version: `repo:version`.
fn manifest_image(manifest: &str) -> Result<String> {
    let images: Vec<&str> = manifest
        .lines()
        .filter_map(|l| l.trim().strip_prefix("image:"))
        .map(|i| i.trim().trim_matches('"'))
        .collect();
    let Some(first) = images.first() else {
        bail!("deploy/weft.yaml names no image");
    };
    if let Some(other) = images.iter().find(|i| *i != first) {
        bail!("deploy/weft.yaml names two images: {first} and {other}");
    }
    let want = format!(":{}", version());
    if !first.ends_with(&want) {
        bail!(
            "deploy/weft.yaml's image {first} is not tagged with the workspace version {} (Cargo.toml): change the tag there",
            version()
        );
    }
    Ok(first.to_string())
}

pub fn run() -> Result<PathBuf> {
    let root = workspace_root();
    let manifest = std::fs::read_to_string(root.join("deploy/weft.yaml"))
        .context("reading deploy/weft.yaml")?;
    let image = manifest_image(&manifest)?;
    cargo(&[
        "build",
        "--release",
        "-p",
        "weft-agent",
        "-p",
        "weft-node",
        "--bins",
    ])?;

    let dist = dist_dir();
    let top = dist.join(top_dir_name());
    if top.exists() {
        std::fs::remove_dir_all(&top).with_context(|| format!("removing {}", top.display()))?;
    }
    for sub in ["bin", "cni", "deploy", "docs"] {
        std::fs::create_dir_all(top.join(sub))?;
    }
    for bin in BINARIES {
        let to = top.join("bin").join(bin);
        std::fs::copy(root.join("target/release").join(bin), &to)
            .with_context(|| format!("copying target/release/{bin}"))?;
        run_cmd("strip", &["--strip-all", path_str(&to)?])?;
    }
    // The conflist is the one the agent itself installs (`--install-cni`), so the template
    // cannot differ from what a node gets.
    let scratch = dist.join(".install-cni");
    let _ = std::fs::remove_dir_all(&scratch);
    run_cmd(
        path_str(&top.join("bin/weft-agent"))?,
        &[
            "--install-cni",
            "--install-cni-only",
            "--cni-bin-dir",
            path_str(&scratch)?,
            "--cni-conf-dir",
            path_str(&top.join("cni"))?,
        ],
    )?;
    std::fs::remove_dir_all(&scratch)?;
    std::fs::copy(root.join("deploy/weft.yaml"), top.join("deploy/weft.yaml"))?;
    std::fs::create_dir_all(top.join("deploy/grafana"))?;
    std::fs::copy(
        root.join("deploy/grafana/weft.json"),
        top.join("deploy/grafana/weft.json"),
    )?;
    std::fs::copy(root.join("Dockerfile"), top.join("Dockerfile"))?;
    std::fs::copy(root.join("README.md"), top.join("README.md"))?;
    for entry in std::fs::read_dir(root.join("docs")).context("reading docs/")? {
        let entry = entry?;
        if entry.path().extension().is_some_and(|e| e == "md") {
            std::fs::copy(entry.path(), top.join("docs").join(entry.file_name()))?;
        }
    }

    // Reproducible: sorted names, root-owned, one timestamp (the last commit's), no gzip name
    // or time.
    let mtime = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .or_else(|| {
            Command::new("git")
                .args(["log", "-1", "--format=%ct"])
                .current_dir(&root)
                .output()
                .ok()
                .filter(|o| o.status.success())
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        })
        .unwrap_or_else(|| "0".into());
    let tarball = dist.join(tarball_name());
    run_cmd(
        "tar",
        &[
            "--sort=name",
            "--owner=0",
            "--group=0",
            "--numeric-owner",
            &format!("--mtime=@{mtime}"),
            "--use-compress-program=gzip -n -9",
            "-C",
            path_str(&dist)?,
            "-cf",
            path_str(&tarball)?,
            &top_dir_name(),
        ],
    )?;

    let size = std::fs::metadata(&tarball)?.len();
    println!(
        "{} ({:.1} MiB)",
        tarball.display(),
        size as f64 / (1 << 20) as f64
    );
    print_tree(&top, &top)?;
    println!(
        "\nimage: tar xzf {} -C /tmp && docker build -t {image} /tmp/{}",
        tarball.display(),
        top_dir_name()
    );
    Ok(tarball)
}

fn print_tree(base: &Path, dir: &Path) -> Result<()> {
    let mut entries: Vec<_> = std::fs::read_dir(dir)?.collect::<std::io::Result<_>>()?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let path = e.path();
        if path.is_dir() {
            print_tree(base, &path)?;
        } else {
            println!(
                "  {:<32} {:>9} bytes",
                path.strip_prefix(base)?.display(),
                e.metadata()?.len()
            );
        }
    }
    Ok(())
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str()
        .with_context(|| format!("{} is not UTF-8", p.display()))
}

fn run_cmd(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed ({}): {}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}
