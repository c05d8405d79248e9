//! The file descriptor budget. Every client connection costs a descriptor, and a proxied
//! request may cost one more for its upstream connection; the admin lane and the runtime need
//! a few of their own. The soft `RLIMIT_NOFILE` is raised to the hard limit at start, and client
//! connections are kept within what remains, so that running out of descriptors (and with it,
//! the probes' lane) takes a flood far beyond `--max-connections`.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors kept for the admin lane, the runtime, logs and the app health checks.
const RESERVED: u64 = 128;

/// Raises the soft descriptor limit to the hard one. Returns the (soft) limit now in force,
/// or `None` if it cannot be read.
pub fn raise_limit() -> Option<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

/// The soft descriptor limit, or `None` when it cannot be read or is unlimited.
pub(super) fn soft_limit() -> Option<u64> {
    let (soft, _) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    (soft != nix::sys::resource::RLIM_INFINITY).then_some(soft)
}

/// The most client connections a descriptor limit of `nofile` allows, after the reserve and
/// one upstream connection per request in flight (`max_concurrency`, or one per client
/// connection when unlimited).
pub(super) fn connection_ceiling(nofile: u64, max_concurrency: Option<u32>) -> usize {
    let usable = nofile.saturating_sub(RESERVED);
    let clients = match max_concurrency {
        Some(n) => usable.saturating_sub(u64::from(n)),
        None => usable / 2,
    };
    clients.max(1) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_leaves_room_for_upstream_connections() {
        assert_eq!(connection_ceiling(1 << 20, Some(50)), (1 << 20) - 128 - 50);
        assert_eq!(connection_ceiling(1024, None), (1024 - 128) / 2);
        assert_eq!(connection_ceiling(100, None), 1);
    }
}
