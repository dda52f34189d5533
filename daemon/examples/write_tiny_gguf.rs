//! Writes the tiny synthetic test model (random Llama weights, a byte-level BPE tokenizer and a
//! ChatML template; see `skillkv_daemon::engine::testing`) to a file, so that something outside
//! the Rust tests (the container image smoke test, `scripts/images-test.sh`) can serve a chat
//! request in milliseconds without downloading a real model.
//!
//! ```sh
//! cargo run -p skillkv-daemon --example write_tiny_gguf -- /tmp/tiny.gguf
//! ```
//!
//! The served model id is the file stem (`tiny` above).

use std::path::PathBuf;
use std::process::ExitCode;

use skillkv_daemon::engine::testing::{TinyModelSpec, write_tiny_gguf};

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let (Some(path), None) = (args.next(), args.next()) else {
        eprintln!("usage: write_tiny_gguf PATH");
        return ExitCode::from(2);
    };
    let path = PathBuf::from(path);
    match write_tiny_gguf(&path, &TinyModelSpec::default()) {
        Ok(()) => {
            println!("{}", path.display());
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("write_tiny_gguf: {error}");
            let mut source = std::error::Error::source(&error);
            while let Some(cause) = source {
                eprintln!("  caused by: {cause}");
                source = cause.source();
            }
            ExitCode::FAILURE
        }
    }
}
