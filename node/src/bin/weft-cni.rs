//! weft's CNI plugin: called by the container runtime with the CNI environment and the
//! network configuration on stdin; the result (or error) goes to stdout as JSON.
use std::io::{Read as _, Write as _};

fn main() {
    let mut stdin = Vec::new();
    // VERSION may come without stdin; an unreadable stdin decodes as empty (code 6 later).
    let _ = std::io::stdin().read_to_end(&mut stdin);
    let outcome = weft_node::cni::run(&|k| std::env::var(k).ok(), &stdin);
    if let Some(json) = outcome.stdout {
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut out, &json);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }
    std::process::exit(if outcome.success { 0 } else { 1 });
}
