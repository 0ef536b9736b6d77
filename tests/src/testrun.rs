//! `BPF_PROG_TEST_RUN` through aya's `TestRun`: the helpers live in `weft_node::test_run`
//! (`weft trace` runs the programs the same way).
pub use weft_agent::test_run::*;
