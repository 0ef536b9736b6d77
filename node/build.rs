//! Builds the eBPF object (`node-ebpf`) with aya-build; the library embeds it.
use anyhow::{Context as _, anyhow};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let root = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("agent has no parent directory"))?
        .join("node-ebpf");
    let root = root.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    // The object depends on the kernel-side crate and the shared types only: without these,
    // cargo reruns this script (a two-minute BPF build) whenever any file of this crate changes.
    for dir in [root.to_string(), format!("{root}/../common")] {
        println!("cargo:rerun-if-changed={dir}");
    }
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "node-ebpf",
            root_dir: root,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
