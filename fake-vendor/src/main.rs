//! `fake-vendor`: the fake OpenAI API as a process, for scripts that drive
//! the official SDKs. Prints one `listening on http://ADDR/v1` line so a
//! script can pick up an ephemeral port, then serves until SIGTERM/SIGINT.

use std::io::Write as _;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use fake_vendor::{FakeVendor, Options};

#[derive(Parser)]
#[command(about = "Deterministic fake of OpenAI's HTTP API")]
struct Args {
    /// Address to listen on; port 0 picks a free one.
    #[arg(long, default_value = "127.0.0.1:0")]
    listen: SocketAddr,
    /// Delay added to every embeddings response.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Comma-separated API keys to accept; any non-empty key if omitted.
    #[arg(long, value_delimiter = ',')]
    keys: Option<Vec<String>>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let opts = Options {
        valid_keys: args.keys,
        latency: Duration::from_millis(args.latency_ms),
    };
    let vendor = match FakeVendor::bind(args.listen, opts).await {
        Ok(vendor) => vendor,
        Err(e) => {
            eprintln!("fake-vendor: cannot listen on {}: {e}", args.listen);
            return ExitCode::FAILURE;
        }
    };
    let mut stdout = std::io::stdout().lock();
    if writeln!(stdout, "listening on {}", vendor.base_url())
        .and_then(|()| stdout.flush())
        .is_err()
    {
        return ExitCode::FAILURE;
    }
    drop(stdout);
    shutdown_signal().await;
    drop(vendor);
    ExitCode::SUCCESS
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}
