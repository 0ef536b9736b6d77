//! A bpffs directory unique to the test run, removed (with everything pinned in it) on drop.
use std::path::{Path, PathBuf};

use crate::netns::unique_name;

pub struct PinDir {
    pub path: PathBuf,
}

impl PinDir {
    pub fn new(prefix: &str) -> Self {
        weft_agent::datapath::ensure_bpffs().expect("bpffs at /sys/fs/bpf");
        let path = Path::new("/sys/fs/bpf").join(unique_name(&format!("weft-test-{prefix}-")));
        std::fs::create_dir_all(&path)
            .unwrap_or_else(|e| panic!("creating {}: {e}", path.display()));
        Self { path }
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        // Removing the pins releases maps and detaches pinned links.
        let _ = std::fs::remove_dir_all(&self.path);
    }
}
