//! Header rewriting per RFC 9110: hop-by-hop fields removed both ways, `X-Forwarded-*` set.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// Fields that describe one connection, never forwarded (RFC 9110 §7.6.1, plus the
/// de-facto `Proxy-Connection` and `Keep-Alive`).
const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("proxy-connection"),
    HeaderName::from_static("keep-alive"),
    header::TE,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHORIZATION,
];

/// `X-Forwarded-For`.
pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// `X-Forwarded-Proto`.
pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
/// `X-Forwarded-Host`.
pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

const VIA_VALUE: HeaderValue = HeaderValue::from_static("1.1 tidegate");

/// Whether a request asks for a protocol upgrade (`Connection: upgrade` + `Upgrade`).
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && connection_has(headers, "upgrade")
}

/// Removes hop-by-hop fields, including every field named in `Connection`.
///
/// `TE: trailers` is kept on requests (it is end-to-end in meaning: the client accepts
/// trailers) so trailers can pass through; `keep_upgrade` keeps `Upgrade` and sets
/// `Connection: upgrade` for a tunnel.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    // Most messages carry none of them: one pass over the names, no hashing, and done.
    // (Fields named in `Connection` matter only when `Connection` itself is present.)
    if !keep_upgrade && !headers.keys().any(|name| HOP_BY_HOP.contains(name)) {
        return;
    }
    let accepts_trailers = headers
        .get_all(header::TE)
        .iter()
        .any(|v| has_token(v, "trailers"));
    let upgrade = if keep_upgrade {
        headers.get(header::UPGRADE).cloned()
    } else {
        None
    };
    // Names listed in Connection are hop-by-hop too; collect them before removing it.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    if accepts_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if let Some(upgrade) = upgrade {
        headers.insert(header::UPGRADE, upgrade);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// Sets the `X-Forwarded-*` fields for a request from `client` (its IP address as a header
/// value, see [`client_ip`]): appends to `X-Forwarded-For`, sets `X-Forwarded-Proto` and
/// `X-Forwarded-Host` (from `Host`, or the `:authority` given).
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client: Option<&HeaderValue>,
    authority: Option<&str>,
) {
    // Up to four fields are added: grow the map once rather than field by field (a parsed
    // request's map is sized to the fields it arrived with).
    headers.reserve(4);
    if let Some(ip) = client {
        let prior = headers
            .get(&X_FORWARDED_FOR)
            .map(HeaderValue::as_bytes)
            .filter(|v| !v.trim_ascii().is_empty());
        let value = match prior {
            Some(prior) => {
                let mut joined = Vec::with_capacity(prior.len() + 2 + ip.len());
                joined.extend_from_slice(prior);
                joined.extend_from_slice(b", ");
                joined.extend_from_slice(ip.as_bytes());
                HeaderValue::from_bytes(&joined).ok()
            }
            None => Some(ip.clone()),
        };
        if let Some(value) = value {
            headers.insert(X_FORWARDED_FOR, value);
        }
    }
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    let host = match headers.entry(header::HOST) {
        header::Entry::Occupied(host) => Some(host.get().clone()),
        // HTTP/2 clients send :authority instead of Host; HTTP/1.1 apps need Host.
        header::Entry::Vacant(slot) => authority
            .and_then(|a| HeaderValue::from_str(a).ok())
            .map(|host| slot.insert(host).clone()),
    };
    if let Some(host) = host {
        headers.insert(X_FORWARDED_HOST, host);
    }
}

/// A client address as an `X-Forwarded-For` entry.
pub fn client_ip(ip: IpAddr) -> HeaderValue {
    HeaderValue::try_from(ip.to_string()).unwrap_or(HeaderValue::from_static("unknown"))
}

/// Appends `Via: 1.1 tidegate`.
pub fn add_via(headers: &mut HeaderMap) {
    headers.append(header::VIA, VIA_VALUE);
}

/// Whether a `Connection` field of `headers` lists `token` (case-insensitive).
pub fn connection_has(headers: &HeaderMap, token: &str) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| has_token(v, token))
}

fn has_token(value: &HeaderValue, token: &str) -> bool {
    value
        .to_str()
        .map(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn strips_hop_by_hop_and_connection_named_fields() {
        let mut h = map(&[
            ("connection", "keep-alive, x-secret"),
            ("keep-alive", "timeout=5"),
            ("x-secret", "1"),
            ("transfer-encoding", "chunked"),
            ("te", "gzip, trailers"),
            ("x-kept", "yes"),
        ]);
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("connection"));
        assert!(!h.contains_key("keep-alive"));
        assert!(!h.contains_key("x-secret"));
        assert!(!h.contains_key("transfer-encoding"));
        assert_eq!(h["te"], "trailers");
        assert_eq!(h["x-kept"], "yes");
    }

    #[test]
    fn keeps_upgrade_for_tunnels() {
        let mut h = map(&[("connection", "Upgrade"), ("upgrade", "websocket")]);
        assert!(wants_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = map(&[("x-forwarded-for", "10.0.0.1"), ("host", "example.com")]);
        set_forwarded(&mut h, Some(&client_ip("127.0.0.1".parse().unwrap())), None);
        assert_eq!(h["x-forwarded-for"], "10.0.0.1, 127.0.0.1");
        assert_eq!(h["x-forwarded-host"], "example.com");
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn host_kept_over_authority_and_absent_host_stays_absent() {
        let mut h = map(&[("host", "a.example")]);
        set_forwarded(&mut h, None, Some("b.example"));
        assert_eq!(h["host"], "a.example");
        assert_eq!(h["x-forwarded-host"], "a.example");
        assert!(!h.contains_key("x-forwarded-for"));
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, None, None);
        assert!(!h.contains_key("host"));
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(h["x-forwarded-proto"], "http");
    }

    #[test]
    fn host_from_authority_for_h2() {
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, None, Some("svc.local:8080"));
        assert_eq!(h["host"], "svc.local:8080");
    }
}
