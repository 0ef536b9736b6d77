use which::which;

/// Rebuild when bpf-linker changes (a new LLVM changes the object).
fn main() {
    let bpf_linker = which("bpf-linker")
        .expect("bpf-linker not found: run `cargo xtask test`, which installs it");
    println!(
        "cargo:rerun-if-changed={}",
        bpf_linker.to_str().expect("utf-8 path")
    );
}
