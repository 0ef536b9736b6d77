//! weft's userspace: the datapath loader and map access shared by the agent, the CNI plugin,
//! the CLI and the tests.
pub mod datapath;
