//! Test harness shared by weft's test suites: network namespaces and pin directories that clean
//! up after themselves (also on panic), running code inside a namespace, and packet-injection
//! helpers around `BPF_PROG_TEST_RUN`.
pub mod agentless;
pub mod cluster;
pub mod cni;
pub mod demo;
pub mod etcd;
pub mod flow;
pub mod injection_node;
pub mod netns;
pub mod packets;
pub mod pins;
pub mod pki;
pub mod process;
pub mod testrun;
