//! Test harness shared by weft's test suites: network namespaces and pin directories that clean
//! up after themselves (also on panic), running code inside a namespace, and packet-injection
//! helpers around `BPF_PROG_TEST_RUN`.
pub mod agents;
pub mod bird;
pub mod capture;
pub mod cluster;
pub mod cni;
pub mod etcd;
pub mod fixture;
pub mod flow;
pub mod manual;
pub mod netns;
pub mod packets;
pub mod pins;
pub mod process;
pub mod testrun;
