//! `crdgen`: write the CRD manifests generated from the types (`make crds`), or with
//! `--check` report drift between the committed manifests and the types.

use std::path::PathBuf;
use std::process::ExitCode;

use skillkv_api::crdgen;

fn main() -> ExitCode {
    let mut check = false;
    let mut root = PathBuf::from(".");
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--check" => check = true,
            "-h" | "--help" => {
                println!(
                    "usage: crdgen [--check] [REPO_ROOT]\n\nWrites the CRD manifests into {:?} under REPO_ROOT (default: .).\n--check reports drift instead and exits 1 if there is any.",
                    crdgen::MANIFEST_DIRS
                );
                return ExitCode::SUCCESS;
            }
            other => root = PathBuf::from(other),
        }
    }
    let result = if check {
        crdgen::drift(&root).map(|problems| {
            for p in &problems {
                eprintln!("drift: {p}");
            }
            if problems.is_empty() {
                println!("CRD manifests match the types");
                ExitCode::SUCCESS
            } else {
                eprintln!("run `make crds` and commit the result");
                ExitCode::FAILURE
            }
        })
    } else {
        crdgen::write_all(&root).map(|written| {
            for p in written {
                println!("wrote {}", p.display());
            }
            ExitCode::SUCCESS
        })
    };
    result.unwrap_or_else(|e| {
        let mut msg = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            msg.push_str(&format!(": {s}"));
            source = s.source();
        }
        eprintln!("crdgen: {msg}");
        ExitCode::FAILURE
    })
}
