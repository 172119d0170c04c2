//! `embgate purge` and `POST /admin/purge`: deleting entries by model,
//! upstream, tenant or age (or all of them), batch by batch, safe while the
//! gateway serves (a purged input is simply a miss next time). A dry run
//! reports what would go: entries, bytes, and the tokens and dollars those
//! entries cost.
//!
//! Filters match the tags in each entry's header (see `cache/entry.rs`):
//! entries written before their format recorded an upstream or tenant
//! (tag 0) match no such filter, only `all`, model (if they have its tag)
//! and age.
//!
//! A purge is resumable: after each batch its cursor is saved in the
//! store's `meta` with a fingerprint of its filter; the same purge started
//! again continues from there, a different one starts over.

use std::collections::HashMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cache::entry::{self, HEADER_LEN, Header};
use crate::cache::store::{Cursor, Store, StoreError};
use crate::config::Settings;

const CURSOR_FIELD: &str = "purge_cursor";
const FILTER_FIELD: &str = "purge_filter";

#[derive(Debug, thiserror::Error)]
pub enum PurgeError {
    #[error("{0}")]
    Filter(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Which entries go. At least one filter, or `all`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, clap::Args)]
#[serde(deny_unknown_fields)]
pub struct Filter {
    /// Entries of this model.
    #[arg(long)]
    #[serde(default)]
    pub model: Option<String>,
    /// Entries of this upstream: a name under `upstreams` (`default` for
    /// `upstream`) or its base URL.
    #[arg(long)]
    #[serde(default)]
    pub upstream: Option<String>,
    /// Entries kept apart for this (isolated) tenant.
    #[arg(long)]
    #[serde(default)]
    pub tenant: Option<String>,
    /// Entries written longer ago than this: `30d`, `12h`, `15m`, `45s`, or
    /// seconds.
    #[arg(long, value_name = "AGE")]
    #[serde(default)]
    pub older_than: Option<String>,
    /// Every entry.
    #[arg(long)]
    #[serde(default)]
    pub all: bool,
}

/// What a purge did, or would do (`dry_run`).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    pub dry_run: bool,
    pub scanned: u64,
    /// Entries matching the filter.
    pub matched: u64,
    pub bytes: u64,
    /// Tokens the matched entries were billed, and what that cost (for
    /// models with a price).
    pub tokens: u64,
    pub usd: f64,
    pub deleted: u64,
    /// False when stopped by `max_batches`: run it again to go on.
    pub complete: bool,
}

/// A filter turned into the header fields it compares.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Matcher {
    all: bool,
    model: Option<u32>,
    upstream: Option<u32>,
    tenant: Option<u32>,
    /// Entries written before this unix second match.
    written_before: Option<u32>,
}

impl Matcher {
    fn matches(&self, header: Option<&Header>) -> bool {
        if self.all {
            return true;
        }
        let Some(h) = header else { return false };
        self.model.is_none_or(|t| h.model_tag == t)
            && self.upstream.is_none_or(|t| h.upstream_tag == t)
            && self.tenant.is_none_or(|t| h.tenant_tag == t)
            && self.written_before.is_none_or(|t| h.written_at < t)
    }

    /// Identifies the purge for resuming it (an age filter counts by its
    /// length, not its moving cut-off).
    fn fingerprint(filter: &Filter) -> String {
        format!(
            "all={} model={:?} upstream={:?} tenant={:?} older_than={:?}",
            filter.all, filter.model, filter.upstream, filter.tenant, filter.older_than
        )
    }
}

/// What a purge needs from the configuration: upstream names, prices, and
/// the model names to tell from their tags.
pub struct Context {
    upstreams: HashMap<String, String>,
    prices: HashMap<String, f64>,
}

impl Context {
    pub fn new(settings: &Settings) -> Context {
        let mut upstreams: HashMap<String, String> = settings
            .upstreams
            .iter()
            .map(|(name, u)| (name.clone(), u.base_url.trim_end_matches('/').to_owned()))
            .collect();
        upstreams.insert(
            "default".to_owned(),
            settings.upstream.base_url.trim_end_matches('/').to_owned(),
        );
        Context {
            upstreams,
            prices: settings.prices.models.clone(),
        }
    }

    fn matcher(&self, filter: &Filter) -> Result<Matcher, PurgeError> {
        let bad = |m: String| Err(PurgeError::Filter(m));
        let filtered = filter.model.is_some()
            || filter.upstream.is_some()
            || filter.tenant.is_some()
            || filter.older_than.is_some();
        match (filter.all, filtered) {
            (false, false) => {
                return bad(
                    "say what to purge: --model, --upstream, --tenant, --older-than, or --all"
                        .into(),
                );
            }
            (true, true) => return bad("--all purges everything: give it alone".into()),
            _ => {}
        }
        let upstream = match &filter.upstream {
            None => None,
            Some(u) => match self.upstreams.get(u) {
                Some(url) => Some(entry::tag(url)),
                None if reqwest::Url::parse(u).is_ok() => Some(entry::tag(u.trim_end_matches('/'))),
                None => {
                    let mut names: Vec<&str> = self.upstreams.keys().map(String::as_str).collect();
                    names.sort_unstable();
                    return bad(format!(
                        "unknown upstream {u:?}: name one of {} or give its base URL",
                        names.join(", ")
                    ));
                }
            },
        };
        let written_before = match &filter.older_than {
            None => None,
            Some(age) => {
                let age = parse_age(age).ok_or_else(|| {
                    PurgeError::Filter(format!(
                        "--older-than {age:?}: give an age like 30d, 12h, 15m, 45s or seconds"
                    ))
                })?;
                let cut = u64::from(entry::unix_now()).saturating_sub(age.as_secs());
                Some(u32::try_from(cut).unwrap_or(u32::MAX))
            }
        };
        Ok(Matcher {
            all: filter.all,
            model: filter.model.as_deref().map(entry::tag),
            upstream,
            tenant: filter.tenant.as_deref().map(entry::tag),
            written_before,
        })
    }

    /// The models the configuration names (to tell entries' model tags).
    pub fn models(&self) -> Vec<String> {
        self.prices.keys().cloned().collect()
    }

    /// USD per 1M tokens, by model tag.
    fn prices_by_tag(&self) -> HashMap<u32, f64> {
        self.prices
            .iter()
            .map(|(model, price)| (entry::tag(model), *price))
            .collect()
    }
}

/// `30d`, `12h`, `15m`, `45s`, or plain seconds.
pub fn parse_age(text: &str) -> Option<Duration> {
    let text = text.trim();
    let (number, unit) = match text.char_indices().last()? {
        (i, c) if c.is_ascii_alphabetic() => (&text[..i], c),
        _ => (text, 's'),
    };
    let n: u64 = number.trim().parse().ok()?;
    let unit = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return None,
    };
    n.checked_mul(unit).map(Duration::from_secs)
}

/// Purges what `filter` names, `batch` entries per step; with
/// `max_batches`, stops after that many steps (a later run resumes).
pub async fn run(
    store: &dyn Store,
    context: &Context,
    filter: &Filter,
    dry_run: bool,
    batch: usize,
    max_batches: Option<u64>,
) -> Result<Report, PurgeError> {
    let matcher = context.matcher(filter)?;
    let prices = context.prices_by_tag();
    let fingerprint = Matcher::fingerprint(filter);
    let mut cursor = Cursor::start();
    if !dry_run
        && store.meta_get(FILTER_FIELD).await?.as_deref() == Some(fingerprint.as_str())
        && let Some(saved) = store.meta_get(CURSOR_FIELD).await?
    {
        cursor = Cursor(saved);
    }
    if !dry_run {
        store.meta_set(FILTER_FIELD, &fingerprint).await?;
    }
    let mut report = Report {
        dry_run,
        ..Report::default()
    };
    let mut steps = 0u64;
    loop {
        if max_batches.is_some_and(|max| steps >= max) {
            return Ok(report);
        }
        steps += 1;
        let (next, heads) = store.scan_heads(&cursor, batch.max(1), HEADER_LEN).await?;
        let mut doomed = Vec::new();
        for head in heads {
            report.scanned += 1;
            let header = entry::read_header(&head.head);
            if !matcher.matches(header.as_ref()) {
                continue;
            }
            report.matched += 1;
            report.bytes += head.len;
            if let Some(h) = header {
                report.tokens += u64::from(h.tokens);
                report.usd +=
                    f64::from(h.tokens) * prices.get(&h.model_tag).copied().unwrap_or(0.0) / 1e6;
            }
            doomed.push(head.hash);
        }
        if !dry_run {
            report.deleted += store.delete_many(&doomed).await?;
            store.meta_set(CURSOR_FIELD, &next.0).await?;
        }
        if next.is_start() {
            break;
        }
        cursor = next;
    }
    if !dry_run {
        store.meta_delete(CURSOR_FIELD).await?;
        store.meta_delete(FILTER_FIELD).await?;
    }
    report.complete = true;
    Ok(report)
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let verb = if self.dry_run {
            "would delete"
        } else {
            "deleted"
        };
        let count = if self.dry_run {
            self.matched
        } else {
            self.deleted
        };
        writeln!(
            f,
            "{verb} {count} of {} entries scanned ({} bytes), which cost {} tokens (${:.4})",
            self.scanned, self.bytes, self.tokens, self.usd
        )?;
        if !self.complete {
            writeln!(f, "stopped early: run the same purge again to go on")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_read_as_operators_write_them() {
        assert_eq!(parse_age("30d"), Some(Duration::from_secs(30 * 86_400)));
        assert_eq!(parse_age("12h"), Some(Duration::from_secs(12 * 3600)));
        assert_eq!(parse_age("15m"), Some(Duration::from_secs(900)));
        assert_eq!(parse_age("45s"), Some(Duration::from_secs(45)));
        assert_eq!(parse_age(" 90 "), Some(Duration::from_secs(90)));
        for bad in ["", "d", "-1d", "1w", "1.5h", "99999999999999999999d"] {
            assert_eq!(parse_age(bad), None, "{bad}");
        }
    }

    #[test]
    fn filters_match_the_header_tags() {
        let header = Header {
            value_type: entry::ValueType::F32,
            tokens: 3,
            model_tag: entry::tag("m"),
            written_at: 1_000,
            upstream_tag: entry::tag("https://u/v1"),
            tenant_tag: 0,
        };
        let by = |m: Matcher| m.matches(Some(&header));
        let none = Matcher {
            all: false,
            model: None,
            upstream: None,
            tenant: None,
            written_before: None,
        };
        assert!(by(Matcher {
            model: Some(entry::tag("m")),
            ..none.clone()
        }));
        assert!(!by(Matcher {
            model: Some(entry::tag("other")),
            ..none.clone()
        }));
        assert!(by(Matcher {
            upstream: Some(entry::tag("https://u/v1")),
            written_before: Some(1_001),
            ..none.clone()
        }));
        assert!(!by(Matcher {
            written_before: Some(1_000),
            ..none.clone()
        }));
        assert!(!by(Matcher {
            tenant: Some(entry::tag("t")),
            ..none.clone()
        }));
        assert!(
            !none.matches(None),
            "an unreadable header matches no filter"
        );
        assert!(Matcher { all: true, ..none }.matches(None));
    }
}
