//! What one request may do with the cache: its caller's directives
//! (`Cache-Control`, or `x-embgate-cache-control` for clients that cannot
//! set that one) within what its tenant may (`auth.tenants.<name>.cache`).
//!
//! - `no-cache`: every input is fetched fresh from the vendor, and the
//!   entries are overwritten.
//! - `no-store`: hits are served, nothing new is stored.
//! - `max-age=N`: entries written more than N seconds ago count as misses
//!   (and are refreshed).
//!
//! As HTTP has it, a directive that is not understood, or a `max-age`
//! without a valid number, is ignored: never an error.

use axum::http::{HeaderMap, HeaderName, header};

use crate::cache::entry::{Entry, unix_now};
use crate::config::TenantCache;
use crate::metrics::Metrics;

pub const X_EMBGATE_CACHE_CONTROL: HeaderName = HeaderName::from_static("x-embgate-cache-control");

/// The directives a request carried, by kind (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Directives {
    pub no_cache: bool,
    pub no_store: bool,
    /// Seconds; the first valid one.
    pub max_age: Option<u64>,
    /// Directives ignored (unknown, or a `max-age` without a number).
    pub ignored: usize,
}

impl Directives {
    /// The directives of both headers, if present.
    pub fn of(headers: &HeaderMap) -> Directives {
        let mut directives = Directives::default();
        for name in [&header::CACHE_CONTROL, &X_EMBGATE_CACHE_CONTROL] {
            for value in headers.get_all(name) {
                match value.to_str() {
                    Ok(text) => directives.add(text),
                    Err(_) => directives.ignored += 1,
                }
            }
        }
        directives
    }

    /// Counts each kind present in `embgate_cache_directives_total`.
    pub fn count(&self, metrics: &Metrics) {
        if *self == Directives::default() {
            return;
        }
        let counter = |kind: &str| metrics.cache_directives.with_label_values(&[kind]);
        if self.no_cache {
            counter("no-cache").inc();
        }
        if self.no_store {
            counter("no-store").inc();
        }
        if self.max_age.is_some() {
            counter("max-age").inc();
        }
        if self.ignored > 0 {
            counter("ignored").inc_by(self.ignored as u64);
        }
    }

    /// Adds the comma-separated directives of one header value.
    pub fn add(&mut self, value: &str) {
        for directive in value.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let (name, argument) = match directive.split_once('=') {
                Some((name, argument)) => (name.trim(), Some(argument.trim())),
                None => (directive, None),
            };
            if name.eq_ignore_ascii_case("no-cache") {
                self.no_cache = true;
            } else if name.eq_ignore_ascii_case("no-store") {
                self.no_store = true;
            } else if name.eq_ignore_ascii_case("max-age") {
                // Senders should not quote it; recipients accept both forms.
                let seconds = argument
                    .map(|a| a.trim_matches('"'))
                    .and_then(|a| a.parse::<u64>().ok());
                match seconds {
                    Some(s) if self.max_age.is_none() => self.max_age = Some(s),
                    Some(_) => {}
                    None => self.ignored += 1,
                }
            } else {
                self.ignored += 1;
            }
        }
    }
}

/// What a request may do with the cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// Look entries up (false: every input is a miss).
    pub read: bool,
    /// Keep what is fetched (false: nothing is stored, not even in the L1).
    pub write: bool,
    /// Entries older than this many seconds are misses.
    pub max_age: Option<u64>,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            read: true,
            write: true,
            max_age: None,
        }
    }
}

impl CachePolicy {
    /// The policy of `directives` within the tenant's `mode`.
    pub fn new(mode: TenantCache, directives: &Directives) -> CachePolicy {
        let (read, write) = match mode {
            TenantCache::ReadWrite => (true, true),
            TenantCache::ReadOnly => (true, false),
            TenantCache::Off => (false, false),
        };
        CachePolicy {
            read: read && !directives.no_cache,
            write: write && !directives.no_store,
            max_age: directives.max_age,
        }
    }

    /// Whether `entry` may be served: not older than `max-age`.
    pub fn accepts(&self, entry: &Entry) -> bool {
        match self.max_age {
            None => true,
            Some(max_age) => {
                u64::from(entry.written_at()).saturating_add(max_age) >= u64::from(unix_now())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn parse(values: &[&str]) -> Directives {
        let mut d = Directives::default();
        for v in values {
            d.add(v);
        }
        d
    }

    #[test]
    fn reads_the_three_directives_and_ignores_the_rest() {
        let d = parse(&["No-Cache, max-age=60", "no-store, max-age=5, private"]);
        assert!(d.no_cache && d.no_store);
        assert_eq!(d.max_age, Some(60), "the first max-age");
        assert_eq!(d.ignored, 1);
        let d = parse(&["max-age=\"30\""]);
        assert_eq!(d.max_age, Some(30));
        for bad in [
            "max-age",
            "max-age=",
            "max-age=-1",
            "max-age=abc",
            "max-age=1.5",
        ] {
            let d = parse(&[bad]);
            assert_eq!((d.max_age, d.ignored), (None, 1), "{bad}");
        }
        assert_eq!(parse(&["", " , ,"]), Directives::default());
    }

    #[test]
    fn both_headers_count() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(
            X_EMBGATE_CACHE_CONTROL,
            HeaderValue::from_static("max-age=0"),
        );
        let d = Directives::of(&headers);
        assert!(d.no_store && !d.no_cache);
        assert_eq!(d.max_age, Some(0));
    }

    #[test]
    fn tenants_bound_what_directives_ask() {
        let none = Directives::default();
        let no_cache = parse(&["no-cache"]);
        assert_eq!(
            CachePolicy::new(TenantCache::ReadWrite, &none),
            CachePolicy::default()
        );
        let fresh = CachePolicy::new(TenantCache::ReadWrite, &no_cache);
        assert!(
            !fresh.read && fresh.write,
            "fetched fresh, then overwritten"
        );
        let read_only = CachePolicy::new(TenantCache::ReadOnly, &none);
        assert!(read_only.read && !read_only.write);
        let off = CachePolicy::new(TenantCache::Off, &parse(&["max-age=9"]));
        assert!(!off.read && !off.write);
    }
}
