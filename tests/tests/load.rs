//! The object loads (every program passes the verifier) and its maps carry BTF.
use weft_agent::datapath::Datapath;

#[test]
fn every_program_passes_the_verifier() {
    Datapath::load_unpinned().expect("loading the datapath");
}
