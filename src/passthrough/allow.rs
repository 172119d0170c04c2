//! `passthrough.allow`: the routes that may pass when the gateway's own
//! vendor key pays. Entries are path prefixes matched on whole segments
//! (`/v1/models` allows `/v1/models` and `/v1/models/x`, not
//! `/v1/modelsx`), written with or without `/v1`; `/v1` alone allows every
//! route.

/// Parsed `passthrough.allow`; empty allows nothing.
#[derive(Debug, Clone, Default)]
pub struct Allowlist {
    /// Prefixes relative to `/v1`: `""` (everything) or `/seg/seg...`.
    prefixes: Vec<Vec<u8>>,
}

impl Allowlist {
    /// Reads the comma-separated setting; the error says which entry is bad.
    pub fn parse(list: &str) -> Result<Allowlist, String> {
        let mut prefixes = Vec::new();
        for entry in list.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let mut segments: Vec<&str> = entry.split('/').filter(|s| !s.is_empty()).collect();
            if segments.first() == Some(&"v1") {
                segments.remove(0);
            }
            let plain = |s: &&str| {
                !matches!(*s, "." | "..")
                    && !s
                        .chars()
                        .any(|c| matches!(c, '%' | '\\' | '?' | '#') || c.is_whitespace())
            };
            if !segments.iter().all(plain) {
                return Err(format!(
                    "{entry:?}: entries are plain paths such as /v1/models, \
                     without dot segments, %, \\, ?, # or spaces"
                ));
            }
            let prefix: String = segments.iter().map(|s| format!("/{s}")).collect();
            prefixes.push(prefix.into_bytes());
        }
        Ok(Allowlist { prefixes })
    }

    /// Whether `rest`, a checked and decoded path after `/v1`, may pass.
    pub fn allows(&self, rest: &[u8]) -> bool {
        self.prefixes.iter().any(|p| {
            rest.strip_prefix(p.as_slice())
                .is_some_and(|tail| tail.is_empty() || tail[0] == b'/')
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn allow(list: &str) -> Allowlist {
        Allowlist::parse(list).expect("valid list")
    }

    #[test]
    fn prefixes_match_whole_segments() {
        let a = allow("/v1/models");
        assert!(a.allows(b"/models"));
        assert!(a.allows(b"/models/"));
        assert!(a.allows(b"/models/gpt-4o"));
        assert!(!a.allows(b"/modelsx"));
        assert!(!a.allows(b"/chat/completions"));
        assert!(!a.allows(b""));
    }

    #[test]
    fn entries_with_or_without_v1_mean_the_same() {
        for list in [
            "/v1/chat/completions",
            "v1/chat/completions",
            "/chat/completions/",
            "chat/completions",
        ] {
            let a = allow(list);
            assert!(a.allows(b"/chat/completions"), "{list}");
            assert!(!a.allows(b"/chat"), "{list}");
        }
        let a = allow(" models , /v1/files ,");
        assert!(a.allows(b"/models/x") && a.allows(b"/files/f-1/content"));
        assert!(!a.allows(b"/batches"));
    }

    #[test]
    fn empty_allows_nothing_and_v1_allows_everything() {
        let none = allow("");
        assert!(!none.allows(b"/models") && !none.allows(b""));
        let all = allow("/v1");
        assert!(all.allows(b"/models") && all.allows(b"") && all.allows(b"/a/b"));
    }

    #[test]
    fn odd_entries_are_refused() {
        for bad in [
            "/v1/../admin",
            "models/.",
            "/v1/%2e%2e",
            "a b",
            "x?y",
            "a\\b",
        ] {
            assert!(Allowlist::parse(bad).is_err(), "{bad}");
        }
    }
}
