//! Test harness shared by weft's test suites: network namespaces and pin directories that clean
//! up after themselves (also on panic), running code inside a namespace, and packet-injection
//! helpers around `BPF_PROG_TEST_RUN`.
pub mod agentless;
pub mod bird;
pub mod capture;
pub mod cluster;
pub mod cni;
pub mod demo;
pub mod etcd;
pub mod flow;
pub mod inject;
pub mod injection_node;
pub mod kube_proxy;
pub mod netns;
pub mod netpol;
pub mod packets;
pub mod pins;
pub mod pki;
pub mod process;
pub mod route_watch;
pub mod testrun;
pub mod whoami;

/// Conntrack capacity of test nodes: the 512k default preallocates ~50 MB per map, too much
/// for dozens of simulated nodes on one machine.
pub const TEST_CONNTRACK_MAX: u32 = 16_384;
