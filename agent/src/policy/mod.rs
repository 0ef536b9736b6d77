//! NetworkPolicy (`networking.k8s.io/v1`): semantics, validation, the reference evaluator, the
//! compiler to the datapath's maps, and a userspace emulation of the datapath's lookups.
//!
//! - [`model`]: the world (namespaces, pods, nodes) and validated policies, from k8s-openapi types;
//! - [`selector`]: label selectors; [`validate`]: the API server's validation and messages;
//! - [`evaluate`]: the reference evaluator, the semantic oracle;
//! - [`compile`]: per-node compilation to map contents and ordered, atomic update plans;
//! - [`emulate`]: the maps and the datapath's lookups in userspace; an emulated cluster;
//! - [`cases`]: the truth-table case files and the runner's report.
//!
//! # Semantics
//!
//! As the API reference and the upstream e2e suite (`test/e2e/network/netpol`) define them:
//!
//! - A pod is isolated for ingress (egress) when a policy of its namespace selects it
//!   (`podSelector`, `{}` = every pod of the namespace) and has that type. `policyTypes` defaults
//!   to `Ingress`, plus `Egress` when `egress` has rules. An isolated direction allows the union
//!   of the rules of every policy selecting the pod; both ends must allow a connection.
//! - Peers: `podSelector` alone means the policy's namespace; `namespaceSelector` alone (`{}` =
//!   every namespace) means every pod there; both in one peer is an AND; several peers an OR;
//!   `ipBlock` matches addresses, pod addresses included, minus its `except`s. An empty or absent
//!   `from`/`to` means every peer, also outside the cluster; `ingress: [{}]` allows everything,
//!   `ingress: []` nothing.
//! - Ports: protocol defaults to TCP; `endPort` ranges; a named port is resolved on the
//!   destination pod by name and protocol, per pod (the endpoint itself for ingress, the remote
//!   pod for egress; an address that is not a pod has no named ports). A rule without ports
//!   allows every port of every protocol (ICMP too).
//! - Always allowed: a pod to itself; traffic between a pod and its own node's addresses (kubelet
//!   probes), in both directions; replies of allowed connections (the datapath's conntrack).
//! - **Host-network pods** are their node's address. As in Cilium, no pod or namespace selector
//!   matches them (a policy allowing `podSelector: {app: x}` does not let a host-network pod
//!   labelled `app: x` in), only an ipBlock containing the node's address does; and no policy
//!   isolates them (they have no endpoint of their own). On their own node they are the node,
//!   so they reach its pods.
//! - Unknown sources fail closed: an address with no known pod matches no selector, only
//!   ipBlocks and "every peer" rules.
//!
//! # Maps (`weft_common::policy`)
//!
//! | map | key → value | filled with |
//! | --- | --- | --- |
//! | `WEFT_POLICY_ENDPOINTS` (hash, 16k) | local pod address → ingress rule set, egress rule set, flags (isolated, pending, failed) | every local pod |
//! | `WEFT_POLICY_ADDRS` (hash, 64k) | address → class | every pod address in the cluster; this node's addresses (class HOST) |
//! | `WEFT_POLICY_CIDRS` (LPM, 16k) | prefix → class | every ipBlock `cidr` and `except` boundary |
//! | `WEFT_POLICY_RULES` (hash, 256k) | {rule set, class or ANY, protocol or ANY, direction} → 6 inline port ranges + overflow set | only where something is allowed |
//! | `WEFT_POLICY_PORT_BLOCKS` (hash, 64k) | {overflow set, port >> 8} → 256-bit bitmap | port sets with more than 6 ranges |
//! | `WEFT_POLICY_NS_DEFAULTS` (hash, 16k) | namespace name → isolation of a new pod | namespaces with policies; `""` = synced marker |
//!
//! A **class** is an address's membership signature: which peers (ipBlocks included) it matches
//! and, for names used by egress rules, the number it gives each named port. Addresses with the
//! same signature share a class (one per label set and namespace in practice). A **rule set** is
//! the signature of the policies selecting an endpoint in one direction (plus, for ingress, the
//! numbers the endpoint gives the named ports they use); endpoints share rule sets.
//!
//! Per new flow and direction the datapath makes: 1 endpoint lookup; 1 address lookup (+1 LPM
//! lookup only for an address that is not a pod's); 4 rule probes (class/protocol, ANY
//! class/protocol, class/ANY protocol, ANY/ANY; it stops at the first hit); +1 bitmap lookup for
//! a probe whose inline ranges missed and that has an overflow set. All are hash lookups except
//! the LPM one, whose depth is bounded by the 32 bits of the key and does not depend on the
//! number of rules. So at most 11 lookups (typically 3-6), whether an endpoint has 1 or 10,000
//! rules (`proptests::lookups_per_verdict_do_not_grow_with_rules`). Egress is decided at the
//! source (`from_pod`) with the destination's class, ingress at the destination (every path into
//! a pod) with the source's class; the same maps serve both.
//!
//! **Fail closed.** An address unknown to the node (not yet learnt, or never a pod) has no class
//! of its own: it matches ipBlocks by address (exact: the LPM regions are computed from the
//! boundaries) and no selector, so it is denied unless an ipBlock or an "every peer" rule allows
//! it. A full rule or port-block map leaves a rule set incomplete: every endpoint using it is
//! switched to the deny rule set in that direction with a `FAILED` flag, and the apply report
//! names the endpoint, direction and map (the agent logs it and counts it); `retry_plan` restores
//! it once there is room. A full LPM map closes every endpoint whose rules use an ipBlock (a
//! missing `except` boundary could otherwise lend an enclosing block's class). A full address
//! map leaves the address to the LPM (ipBlocks only: closed for selectors). A local endpoint
//! without a state is denied both ways by the datapath. A full namespace-default map removes the
//! synced marker, so new pods are isolated both ways.
//!
//! **A brand-new pod is isolated before CNI ADD returns.** The CNI plugin has no datastore, only
//! `K8S_POD_NAMESPACE`: it reads `WEFT_POLICY_NS_DEFAULTS[namespace]` (isolated in a direction
//! when any policy of that type exists in the namespace; both directions when the agent has
//! never synced) and writes the endpoint's state with the deny rule set and `PENDING`
//! ([`emulate::new_endpoint_state`]) before it returns. The agent later writes the real rule
//! sets (entries first, then the state). Allows lag; isolation does not.
//!
//! # Update ordering
//!
//! Class and rule-set numbers stand for immutable contents and are never reused, so an entry is
//! added and deleted but never modified. Each phase of a plan writes: namespace defaults that
//! isolate more; port blocks; rule entries of every new (rule set, class) pair (dead classes and
//! rule sets are kept until the phase ends, so pairs of an outgoing rule set and an incoming
//! class have entries too); LPM prefixes, longest first; address classes; endpoint states;
//! endpoint deletions; rule entries and port blocks of what died; namespace defaults that
//! isolate less. A policy change is three phases: its new peers join (addresses move to classes
//! that also say whether they match them; no verdict changes), endpoints switch to the new rule
//! sets, the old peers leave. Every (endpoint, address) pair so flips from its old verdict to its
//! new one exactly once: no intermediate state allows what neither the old nor the new state
//! allows, or denies what both allow (`proptests::every_intermediate_state_is_between_old_and_new`
//! applies every plan write by write and checks exactly that). This holds per node and
//! direction; the two ends of a connection on two nodes update independently.
//!
//! An agent restarting over pinned maps does not know what the old numbers meant. It numbers
//! above them ([`compile::Compiler::with_id_floor`]) and [`compile::Compiler::adoption_plan`]
//! goes through transitional classes, one per (old class, new class) pair found at an address or
//! LPM location, whose entries are copies of the old class's old entries and of the new class's
//! new ones: addresses move to them (no verdict changes), endpoints switch (each flips once),
//! addresses move on to the new classes, the rest is deleted
//! (`proptests::restart_over_pinned_maps_opens_nothing`, with the world changed while the agent
//! was down).
pub mod cases;
pub mod compile;
pub mod emulate;
pub mod evaluate;
pub mod model;
pub mod selector;
pub mod validate;

#[cfg(test)]
mod proptests;
