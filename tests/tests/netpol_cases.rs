//! Every truth-table case file (`tests/netpol/*.json`) run through both kernel-free deciders:
//! the reference evaluator and the compiled form decided by the emulated datapath maps of a
//! three-node cluster. Both must agree with the file; a mismatch is a bug in the evaluator, the
//! compiler or the case, and the message says which two agree.
use std::{collections::BTreeMap, net::Ipv4Addr, path::Path};

use weft_agent::policy::cases::{self, Layout, Report};

#[test]
fn case_files_agree_with_reference_and_emulated_datapath() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("netpol");
    let files = cases::case_files(&dir).unwrap();
    assert!(!files.is_empty(), "no case files in {}", dir.display());
    let nodes: BTreeMap<String, Vec<Ipv4Addr>> = (1..=3u8)
        .map(|n| {
            (
                format!("node-{n}"),
                vec![Ipv4Addr::new(192, 168, 100, 10 + n)],
            )
        })
        .collect();
    let layout = Layout::standard(nodes);
    let mut reference = Report::default();
    let mut emulated = Report::default();
    let mut emulated_decider = cases::emulated();
    let mut names = std::collections::BTreeSet::new();
    let mut n_cases = 0;
    for file in &files {
        for case in cases::load_file(file).unwrap() {
            assert!(
                names.insert(case.name.clone()),
                "duplicate case name {}",
                case.name
            );
            assert!(!case.probes.is_empty(), "{}: no probes", case.name);
            n_cases += 1;
            let r = cases::run_case(&layout, &case, &mut cases::reference).unwrap();
            let e = cases::run_case(&layout, &case, &mut emulated_decider).unwrap();
            println!("reference {}", r.line());
            println!("emulated  {}", e.line());
            reference.push(r);
            emulated.push(e);
        }
    }
    println!(
        "{n_cases} cases, {} probes: reference {} wrong, emulated {} wrong",
        reference.total_probes, reference.wrong_probes, emulated.wrong_probes
    );
    assert!(n_cases >= 50, "{n_cases} cases");
    let failed = |r: &Report| -> Vec<String> {
        r.cases
            .iter()
            .filter(|c| !c.wrong.is_empty() || c.error.is_some())
            .map(|c| c.line())
            .collect()
    };
    let (rf, ef) = (failed(&reference), failed(&emulated));
    assert!(
        rf.is_empty() && ef.is_empty(),
        "reference evaluator disagrees with the files:\n{}\nemulated datapath disagrees with the files:\n{}",
        rf.join("\n"),
        ef.join("\n")
    );
}
