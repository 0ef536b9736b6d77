//! `cargo xtask netpol FILE...`: runs NetworkPolicy truth-table case files against a real
//! 3-node weft cluster in network namespaces (`weft_tests::netpol` says how), prints a line per
//! case, writes the report (`--report`, default `target/netpol/report.json`) and exits non-zero
//! when any probe is wrong.
use std::{path::PathBuf, process::ExitCode};

fn main() -> ExitCode {
    let mut files = Vec::new();
    let mut report_path = PathBuf::from("target/netpol/report.json");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--report" => match args.next() {
                Some(p) => report_path = PathBuf::from(p),
                None => {
                    eprintln!("--report needs a path");
                    return ExitCode::from(2);
                }
            },
            "-h" | "--help" => {
                println!("usage: weft-netpol [--report PATH] FILE...");
                return ExitCode::SUCCESS;
            }
            f => files.push(PathBuf::from(f)),
        }
    }
    if files.is_empty() {
        eprintln!("usage: weft-netpol [--report PATH] FILE...");
        return ExitCode::from(2);
    }
    let started = std::time::Instant::now();
    let report = match weft_tests::netpol::run_files(&files, |l| println!("{l}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("weft-netpol: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(dir) = report_path.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    if let Err(e) = std::fs::write(
        &report_path,
        serde_json::to_vec_pretty(&report).expect("serializable"),
    ) {
        eprintln!("writing {}: {e}", report_path.display());
        return ExitCode::FAILURE;
    }
    println!(
        "{} cases, {} probes, {} wrong, in {:.0} s; report: {}",
        report.cases.len(),
        report.total_probes,
        report.wrong_probes,
        started.elapsed().as_secs_f64(),
        report_path.display()
    );
    if report.failed() {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
