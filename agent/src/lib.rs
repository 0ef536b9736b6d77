//! weft's node agent (`weft-agent`) and the modules it is made of: flannel's net-conf, the
//! datastores, the reconciler, the node's own networking and the metrics server. The node-local
//! layer it shares with the CNI plugin and the CLI lives in `weft-node` and is re-exported here.
pub mod admission;
pub mod bgp;
pub mod config;
pub mod control_loop;
pub mod datastore;
pub mod metrics;
pub mod monitor;
pub mod netpol;
pub mod node_net;
pub mod policy;
pub mod reconcile;
pub mod trace;

pub use weft_node::{cni, conntrack, datapath, ipam, json, mac, netlink, ns, subnet_env, test_run};
