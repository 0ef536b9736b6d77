//! weft's userspace: the datapath loader and map access, and the modules shared by the agent
//! (`weft-agent`), the CNI plugin (`weft-cni`), the CLI (`weft`) and the tests.
pub mod bgp;
pub mod cni;
pub mod config;
pub mod datapath;
pub mod datastore;
pub mod ipam;
pub mod mac;
pub mod metrics;
pub mod netlink;
pub mod node_net;
pub mod ns;
pub mod reconcile;
pub mod rtnl;
pub mod subnet_env;
pub mod tcx;
