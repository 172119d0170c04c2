use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use embgate::StartupError;
use embgate::cache::store::embedded::lock::{self, Command as StoreCommand};
use embgate::config::Settings;

// Requests allocate many short-lived buffers; mimalloc handles that
// pattern markedly better than the system allocator (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// An OpenAI-compatible gateway that caches embeddings.
#[derive(Parser)]
#[command(name = "embgate", version, about)]
struct Cli {
    /// TOML configuration file (environment variables EMBGATE__* override it).
    #[arg(long, global = true, env = "EMBGATE_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve,
    /// Apply pending keyspace migrations (resumable; safe to run twice).
    Migrate {
        /// Keys per SCAN step.
        #[arg(long, default_value_t = 500)]
        batch: usize,
    },
    /// Print entries, bytes (by model) and the all-time savings ledger.
    Stats,
    /// Print the SHA-256 of a client key, for `auth.tenants.<name>.key_sha256`.
    HashKey {
        /// The client key.
        key: String,
    },
    /// Fill the cache from a JSONL file of inputs (resumable batch re-indexing).
    Warm(embgate::warm::WarmOptions),
    /// Delete entries by model, upstream, tenant or age (resumable; safe
    /// while the gateway serves).
    Purge {
        #[command(flatten)]
        filter: embgate::purge::Filter,
        /// Only report what would go: entries, bytes, tokens and dollars.
        #[arg(long)]
        dry_run: bool,
        /// Entries scanned per step.
        #[arg(long, default_value_t = 500)]
        batch: usize,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    // Logs go to stderr: stdout carries command output (stats, warm summary).
    // Colours only for a terminal: they cost time on every span and line.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();
    let cli = Cli::parse();
    let settings = match Settings::load(cli.config.as_deref()) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("embgate: {e}");
            return ExitCode::from(2);
        }
    };
    let (result, operation) = match cli.command {
        Command::Serve => (embgate::run(&settings, shutdown_signal()).await, None),
        Command::Migrate { batch } => {
            (migrate(&settings, batch).await, Some(StoreCommand::Migrate))
        }
        Command::Stats => (stats(&settings).await, Some(StoreCommand::Stats)),
        Command::HashKey { key } => {
            println!("{}", embgate::auth::hash_key(&key));
            (Ok(()), None)
        }
        Command::Warm(options) => return embgate::warm::cli(&settings, &options).await,
        Command::Purge {
            filter,
            dry_run,
            batch,
        } => (
            purge(&settings, &filter, dry_run, batch).await,
            Some(StoreCommand::Purge),
        ),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // Settings refused only when serving (an undecided `auth.mode`) are
        // configuration errors too.
        Err(e @ embgate::StartupError::Config(_)) => {
            eprintln!("embgate: {e}");
            ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("embgate: {e}");
            if let (Some(operation), StartupError::Store(store)) = (operation, &e)
                && lock::is_held(store)
            {
                eprintln!("{}", lock::what_to_do(operation));
            }
            ExitCode::FAILURE
        }
    }
}

async fn migrate(settings: &Settings, batch: usize) -> Result<(), StartupError> {
    let store = embgate::cache::store::open(&settings.store)?;
    let report = embgate::migrate::run_pending(store.as_ref(), batch.max(1), None)
        .await
        .map_err(StartupError::Keyspace)?;
    if report.from_version == report.to_version {
        println!(
            "keyspace at version {}: nothing to migrate",
            report.to_version
        );
    } else {
        println!(
            "keyspace migrated from version {} to {}: {} entries scanned, {} rewritten, {} unreadable (left as misses)",
            report.from_version,
            report.to_version,
            report.scanned,
            report.rewritten,
            report.unreadable
        );
    }
    Ok(())
}

async fn stats(settings: &Settings) -> Result<(), StartupError> {
    let store = embgate::cache::store::open(&settings.store)?;
    let models = settings.prices.keys().map(String::as_str);
    let stats = embgate::stats::collect(store.as_ref(), models).await?;
    print!("{}", stats.render());
    Ok(())
}

async fn purge(
    settings: &Settings,
    filter: &embgate::purge::Filter,
    dry_run: bool,
    batch: usize,
) -> Result<(), embgate::StartupError> {
    let store = embgate::cache::store::open(&settings.store)?;
    let context = embgate::purge::Context::new(settings);
    let report = embgate::purge::run(store.as_ref(), &context, filter, dry_run, batch, None)
        .await
        .map_err(embgate::StartupError::Purge)?;
    print!("{report}");
    Ok(())
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    embgate::signal::terminated().await;
    tracing::info!("shutting down: finishing in-flight requests");
}
