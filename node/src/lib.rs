//! What every weft process on a node shares, without the control plane: the embedded datapath
//! and its pinned maps (`datapath`), the GC of its conntrack map (`conntrack`), netlink, network namespaces, IPAM, the subnet file the agent
//! writes for the CNI plugin, and the CNI plugin itself (`cni`, the `weft-cni` binary).
pub mod cni;
pub mod conntrack;
pub mod datapath;
pub mod ipam;
pub mod json;
pub mod mac;
pub mod netlink;
pub mod ns;
pub mod subnet_env;
