//! `keyward`: one binary for the server, the admin CLI and agent helpers.
#![forbid(unsafe_code)]

mod args;
mod client;
mod commands;
mod input;
mod logpipe;
mod output;

use clap::Parser;

/// glibc's malloc/free and their consolidation took about a fifth of the
/// proxy's CPU under load (perf, bench/proxy); mimalloc is much cheaper for
/// the many short-lived buffers of an HTTP proxy.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = args::Cli::parse();
    let json = cli.json;
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("tokio runtime");
    let result = runtime.block_on(commands::run(cli));
    if let Err(e) = result {
        if json {
            let body = serde_json::json!({"error": {"code": e.code(), "message": e.to_string()}});
            eprintln!("{body}");
        } else {
            eprintln!("keyward: {e}");
        }
        std::process::exit(e.exit_code());
    }
}
