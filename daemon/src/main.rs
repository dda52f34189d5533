//! The `skillkv` binary: a thin entry point over [`skillkv_daemon::cli`] that prints a failure's
//! whole cause chain on one line and exits 1.

use std::process::ExitCode;

fn main() -> ExitCode {
    match skillkv_daemon::cli::main() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}
