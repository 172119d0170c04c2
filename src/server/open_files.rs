//! Fits the connection cap into the process's open-file limit, so that
//! accepting never fails for want of a file descriptor (`EMFILE`): a
//! listener that hits it fails every accept until a socket closes.

use crate::config::Settings;

/// Descriptors for everything but sockets: Redis, the runtime, the
/// listener, standard streams, and some slack.
const RESERVED: u64 = 64;

/// The connection cap to serve with: `wanted`, once the soft open-file
/// limit has been raised (up to the hard limit) to make room for it beside
/// `others` descriptors; lowered, with a warning, if the limit cannot be
/// raised that far.
pub fn connection_cap(wanted: usize, others: u64) -> usize {
    let wanted = wanted as u64;
    match rlimit::increase_nofile_limit(wanted.saturating_add(others)) {
        Ok(limit) => {
            let cap = fit(wanted, others, limit);
            if cap < wanted {
                tracing::warn!(
                    max_connections = wanted,
                    open_file_limit = limit,
                    serving_with = cap,
                    "the open-file limit is too low for server.max_connections; \
                     raise it (ulimit -n) or lower the setting"
                );
            }
            usize::try_from(cap).unwrap_or(usize::MAX)
        }
        Err(e) => {
            tracing::warn!(error = %e, "open-file limit unknown; connection cap as configured");
            usize::try_from(wanted).unwrap_or(usize::MAX)
        }
    }
}

/// Descriptors the settings may need besides client connections: a
/// socket to the vendor for each chunk of each request in flight, and
/// [`RESERVED`].
pub fn besides_connections(settings: &Settings) -> u64 {
    let in_flight = settings.server.max_requests_in_flight as u64;
    let per_request = settings.upstream.max_concurrency as u64;
    RESERVED.saturating_add(in_flight.saturating_mul(per_request))
}

/// Connections that fit in `limit` descriptors beside `others`; at least
/// half the limit, since the estimate of `others` is a worst case.
fn fit(wanted: u64, others: u64, limit: u64) -> u64 {
    wanted
        .min(limit.saturating_sub(others).max(limit / 2))
        .max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_fits_the_limit() {
        assert_eq!(fit(4096, 4160, 1 << 20), 4096, "room enough");
        assert_eq!(fit(4096, 4160, 10_000), 4096);
        assert_eq!(fit(4096, 1000, 3000), 2000, "what is left");
        assert_eq!(fit(4096, 4160, 4096), 2048, "half when others fill it");
        assert_eq!(fit(4096, 64, 1), 1, "never zero");
    }
}
