//! One process at a time: the store takes an exclusive lock on a file next
//! to the database (`<file>.lock`) before opening it, and writes its pid and
//! command there, so a second process can say who holds the store. The
//! command is the program and its subcommand only: other arguments may hold
//! a key (`warm --api-key`), and the record is shown to other processes.
//!
//! The kernel releases the lock when its holder exits, however it exits:
//! what the file says is believed only while it is locked, so a file left
//! by a killed process is simply taken over. The file is never removed
//! (removing it would let two processes lock two different files).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read as _, Seek as _, Write as _};
use std::path::{Path, PathBuf};

use crate::cache::store::StoreError;

pub(super) struct Lock {
    _file: File,
}

/// The lock file of the store at `path`.
pub fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(".lock");
    PathBuf::from(name)
}

impl Lock {
    /// Takes the lock of the store at `path`, or says who holds it.
    pub(super) fn acquire(path: &Path) -> Result<Lock, StoreError> {
        let lock_path = lock_path(path);
        let io = |source| StoreError::Io {
            path: lock_path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                let mut holder = String::new();
                let _ = file.read_to_string(&mut holder);
                return Err(StoreError::InUse {
                    path: path.to_owned(),
                    holder: describe(&holder),
                });
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        file.set_len(0).map_err(io)?;
        file.rewind().map_err(io)?;
        file.write_all(holder_record().as_bytes()).map_err(io)?;
        Ok(Lock { _file: file })
    }
}

/// The subcommands that open the store.
const SUBCOMMANDS: [&str; 4] = ["serve", "stats", "warm", "migrate"];

/// This process, as the lock file records it: pid, then program and
/// subcommand.
fn holder_record() -> String {
    record(std::process::id(), std::env::args())
}

fn record(pid: u32, mut args: impl Iterator<Item = String>) -> String {
    let mut command = args.next().unwrap_or_default();
    if let Some(subcommand) = args.find(|a| SUBCOMMANDS.contains(&a.as_str())) {
        command.push(' ');
        command.push_str(&subcommand);
    }
    format!("{pid}\n{command}\n")
}

/// At most this much of another process's record is repeated.
const MAX_SHOWN: usize = 256;

/// Who holds the lock, from what it recorded.
fn describe(record: &str) -> String {
    let mut lines = record.lines();
    match (lines.next().map(str::trim), lines.next()) {
        (Some(pid), command)
            if (1..=20).contains(&pid.len()) && pid.chars().all(|c| c.is_ascii_digit()) =>
        {
            match command.map(str::trim).filter(|c| !c.is_empty()) {
                Some(command) => {
                    let command: String = command.chars().take(MAX_SHOWN).collect();
                    format!("process {pid} ({command})")
                }
                None => format!("process {pid}"),
            }
        }
        // Locked but not yet written: the holder is starting.
        _ => "another process (it is just starting)".to_owned(),
    }
}

/// The commands that open the store besides `serve`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Stats,
    Warm,
    Migrate,
    Purge,
}

/// What to do when `command` finds the store held by a running server.
pub fn what_to_do(command: Command) -> &'static str {
    match command {
        Command::Stats => {
            "The running server reports the same figures on its /metrics \
             (embgate_store_entries, embgate_store_memory_bytes, embgate_ledger_*). \
             For `embgate stats` itself, stop the server (SIGTERM: it finishes its requests and \
             closes the store) and run it again. To run it beside servers, have them share a Redis \
             (EMBGATE__STORE__URL=redis://HOST:6379/0) and run it with the same setting."
        }
        Command::Warm => {
            "Stop the server (SIGTERM: it finishes its requests and closes the store), run \
             `embgate warm` (a stopped run resumes where it ended), then start the server again; \
             or send the inputs through the running server's /v1/embeddings. To warm beside \
             running servers, have them share a Redis (EMBGATE__STORE__URL=redis://HOST:6379/0) \
             and run `embgate warm` with the same setting."
        }
        Command::Migrate => {
            "Stop the server (SIGTERM: it finishes its requests and closes the store), run \
             `embgate migrate`, then start the server again."
        }
        Command::Purge => {
            "Purge through the running server's admin API instead (POST /admin/purge with the \
             same filters as JSON; it needs admin.key_sha256), or stop the server (SIGTERM), run \
             `embgate purge` (an interrupted purge resumes), then start the server again."
        }
    }
}

/// Whether `error` is a store held by another process.
pub fn is_held(error: &StoreError) -> bool {
    matches!(error, StoreError::InUse { .. })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_names_the_holder_and_a_released_one_is_taken_over() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("cache.redb");
        let held = Lock::acquire(&path).expect("first lock");
        let Err(StoreError::InUse {
            path: named,
            holder,
        }) = Lock::acquire(&path)
        else {
            panic!("a second lock must be refused");
        };
        assert_eq!(named, path);
        assert!(
            holder.starts_with(&format!("process {} (", std::process::id())),
            "{holder}"
        );
        drop(held);
        // The record of a holder that is gone is not believed: taken over.
        Lock::acquire(&path).expect("taken over once released");
    }

    #[test]
    fn the_record_names_program_and_subcommand_but_no_argument() {
        let args = [
            "/bin/embgate",
            "--config",
            "e.toml",
            "warm",
            "in.jsonl",
            "--api-key",
            "sk-secret",
        ];
        let record = record(7, args.into_iter().map(String::from));
        assert_eq!(record, "7\n/bin/embgate warm\n");
        assert_eq!(describe(&record), "process 7 (/bin/embgate warm)");
    }

    #[test]
    fn records_are_described_even_when_partial() {
        assert_eq!(
            describe("42\nembgate serve\n"),
            "process 42 (embgate serve)"
        );
        assert_eq!(describe("42\n"), "process 42");
        assert_eq!(describe(""), "another process (it is just starting)");
    }
}
