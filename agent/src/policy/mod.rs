//! NetworkPolicy (networking.k8s.io/v1): semantics, validation, the reference evaluator, the
//! compiler to the datapath's maps and a userspace emulation of the datapath's lookups.
pub mod evaluate;
pub mod model;
pub mod selector;
pub mod validate;
pub mod cases;
pub mod compile;
pub mod emulate;
#[cfg(test)]
mod proptests;
