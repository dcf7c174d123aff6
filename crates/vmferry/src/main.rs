//! `vmferry`: the command line. Thin: every behaviour lives in the library crates; this
//! file parses flags, renders progress and prints errors as one line with their causes.

mod cli;
mod drain;
mod login;
mod migrate_cmd;
mod units;

use clap::Parser;

/// mimalloc keeps freed large buffers for reuse; glibc's malloc returns them to the kernel
/// and faults them back in, which cost the tunnel transport a quarter of its throughput
/// (bench/README.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let args = cli::Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMFERRY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(args.default_log_level()));
    match args.log_format() {
        cli::LogFormat::Text => tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .with_target(false)
            .init(),
        // The target stays: a collector tells audit lines (target "audit") from the rest.
        cli::LogFormat::Json => tracing_subscriber::fmt()
            .json()
            .with_env_filter(filter)
            .with_writer(std::io::stderr)
            .with_ansi(false)
            .with_target(true)
            .init(),
    }
    if let Err(e) = cli::run(args) {
        // The whole cause chain on one line, so an operator sees why at a glance.
        let mut msg = format!("{e}");
        let mut src = e.source();
        while let Some(s) = src {
            let s_text = s.to_string();
            if !msg.contains(&s_text) {
                msg.push_str(": ");
                msg.push_str(&s_text);
            }
            src = s.source();
        }
        eprintln!("vmferry: error: {msg}");
        std::process::exit(1);
    }
}
