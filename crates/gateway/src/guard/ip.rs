//! Client addresses: who is really asking (behind trusted proxies), and allow/deny
//! rules by network.
//!
//! Every address is compared in canonical form: an IPv4-mapped IPv6 address
//! (`::ffff:10.1.2.3`, what a dual-stack socket reports for an IPv4 peer) is the IPv4
//! address, and a rule written as a mapped network means the IPv4 network. Otherwise
//! `deny = ["10.0.0.0/8"]` would not stop `::ffff:10.1.2.3`.

use axum::response::{IntoResponse, Response};
use http::{HeaderMap, StatusCode};
pub(crate) use ipnet::IpNet;
use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer};
use shoal_core::ApiError;
use std::net::{IpAddr, SocketAddr};

/// Most `X-Forwarded-For` entries read: a chain longer than this is not a real proxy
/// chain, and the walk stops at the last trusted hop as for a garbage entry.
const MAX_FORWARDED_HOPS: usize = 32;

/// Which client addresses may use a route.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpRules {
    /// Networks allowed; empty allows every address that `deny` does not refuse.
    #[serde(default, deserialize_with = "deserialize_nets")]
    pub allow: Vec<IpNet>,
    /// Networks refused, even when `allow` lists them too.
    #[serde(default, deserialize_with = "deserialize_nets")]
    pub deny: Vec<IpNet>,
}

impl IpRules {
    /// Whether `ip` may pass: deny wins over allow; an empty allow list allows all.
    pub(crate) fn permits(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if self.deny.iter().any(|n| n.contains(&ip)) {
            return false;
        }
        self.allow.is_empty() || self.allow.iter().any(|n| n.contains(&ip))
    }
}

/// Read a list of networks: `"10.0.0.0/8"`, `"fd00::/8"`, or a bare address meaning
/// that address alone (/32, /128). For `#[serde(deserialize_with)]` on any such list
/// (the rules above, the trusted proxies).
pub(crate) fn deserialize_nets<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|s| parse_net(s).map_err(serde::de::Error::custom))
        .collect()
}

/// One network in the forms [`deserialize_nets`] reads, host bits cleared and mapped
/// IPv6 networks turned into IPv4 ones.
pub(crate) fn parse_net(s: &str) -> Result<IpNet, String> {
    let net = if s.contains('/') {
        s.parse::<IpNet>().ok()
    } else {
        s.parse::<IpAddr>().ok().map(IpNet::from)
    };
    let Some(net) = net else {
        return Err(format!(
            "invalid network {:?}: expected an address (\"10.1.2.3\", \"::1\") or a \
             CIDR network (\"10.0.0.0/8\", \"fd00::/8\") with a prefix of at most 32 \
             (IPv4) or 128 (IPv6)",
            super::truncate(s, 64)
        ));
    };
    Ok(canonical_net(net.trunc()))
}

fn canonical_net(net: IpNet) -> IpNet {
    if let IpNet::V6(v6) = net {
        if let (Some(v4), Some(len)) = (v6.addr().to_ipv4_mapped(), v6.prefix_len().checked_sub(96))
        {
            if let Ok(n) = Ipv4Net::new(v4, len) {
                return IpNet::V4(n);
            }
        }
    }
    net
}

/// The client's address. `peer` is the connection's source address; when it is one of
/// `trusted_proxies`, `X-Forwarded-For` (every header line, comma-separated entries)
/// is read from the right, skipping trusted proxies, and the first untrusted address is
/// the client. Only the right end of the header can be trusted: each trusted proxy
/// appends the address it saw, while anything to the left may have been written by the
/// client itself. From an untrusted peer the header is ignored entirely.
///
/// When the walk meets an entry that is not an address (a non-UTF-8 line, `unknown`, an
/// obfuscated name) or more than [`MAX_FORWARDED_HOPS`] entries, it stops and answers
/// the last trusted hop seen (the peer, if the first entry already fails). That is the
/// safe choice: it is an address a trusted proxy vouched for, never one a client could
/// have chosen; what lies beyond is unknown. (It is a proxy's address, so an allow rule
/// must not list the proxies' own network unless anyone behind them may pass.)
///
/// Entries are bare addresses; `1.2.3.4:5678` and `[2001:db8::1]:443`, which some
/// proxies write, are read as their address. Empty entries are skipped.
pub(crate) fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted_proxies: &[IpNet]) -> IpAddr {
    let trusted = |ip: &IpAddr| trusted_proxies.iter().any(|n| n.contains(ip));
    let peer = peer.to_canonical();
    if !trusted(&peer) {
        return peer;
    }
    let mut last_trusted = peer;
    let mut hops = 0;
    for line in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(line) = line.to_str() else {
            return last_trusted;
        };
        for entry in line.rsplit(',').map(str::trim).filter(|e| !e.is_empty()) {
            hops += 1;
            let Some(ip) = parse_hop(entry).filter(|_| hops <= MAX_FORWARDED_HOPS) else {
                return last_trusted;
            };
            if !trusted(&ip) {
                return ip;
            }
            last_trusted = ip;
        }
    }
    last_trusted
}

fn parse_hop(entry: &str) -> Option<IpAddr> {
    let ip = entry
        .parse::<IpAddr>()
        .or_else(|_| entry.parse::<SocketAddr>().map(|s| s.ip()))
        .or_else(|_| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))
                .unwrap_or(entry)
                .parse::<IpAddr>()
        })
        .ok()?;
    Some(ip.to_canonical())
}

/// The answer to a client whose address may not use the route: 403, code `forbidden`.
pub(crate) fn forbidden() -> Response {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "forbidden",
        "this route is not open to your address",
    )
    .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn rules(toml_src: &str) -> Result<IpRules, String> {
        toml::from_str(toml_src).map_err(|e| e.to_string())
    }

    fn xff(lines: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for l in lines {
            h.append("x-forwarded-for", HeaderValue::from_str(l).unwrap());
        }
        h
    }

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| parse_net(s).unwrap()).collect()
    }

    #[test]
    fn networks_and_bare_addresses_parse() {
        let r = rules(
            r#"
            allow = ["10.0.0.0/8", "::1/128", "192.168.1.7", "2001:db8::/32"]
            deny = ["10.1.0.0/16"]
            "#,
        )
        .unwrap();
        assert_eq!(r.allow[2], "192.168.1.7/32".parse::<IpNet>().unwrap());
        for yes in ["10.2.3.4", "192.168.1.7", "::1", "2001:db8::5"] {
            assert!(r.permits(ip(yes)), "{yes}");
        }
        for no in ["192.168.1.8", "11.0.0.1", "::2", "10.1.2.3"] {
            assert!(!r.permits(ip(no)), "{no}");
        }
        // Host bits are cleared, and the default is an empty rule set.
        assert_eq!(
            parse_net("10.9.9.9/8").unwrap(),
            parse_net("10.0.0.0/8").unwrap()
        );
        assert!(rules("").unwrap().permits(ip("8.8.8.8")));
    }

    #[test]
    fn bad_networks_fail_with_the_value_named() {
        for bad in [
            "10.0.0.0/33",
            "10.0.0",
            "banana",
            "::1/129",
            "10.0.0.0/",
            "",
        ] {
            let e = rules(&format!("allow = [{bad:?}]")).unwrap_err();
            assert!(
                e.contains(&format!("invalid network {bad:?}")),
                "{bad}: {e}"
            );
        }
        assert!(rules("alow = []").is_err(), "unknown keys are refused");
    }

    #[test]
    fn deny_wins_and_an_empty_allow_list_allows_the_rest() {
        let r = IpRules {
            allow: vec![],
            deny: nets(&["203.0.113.0/24", "2001:db8:bad::/48"]),
        };
        assert!(r.permits(ip("198.51.100.1")));
        assert!(!r.permits(ip("203.0.113.9")));
        assert!(!r.permits(ip("2001:db8:bad::1")));
        assert!(r.permits(ip("2001:db8:900d::1")));
        let both = IpRules {
            allow: nets(&["10.0.0.0/8"]),
            deny: nets(&["10.0.0.0/8"]),
        };
        assert!(!both.permits(ip("10.0.0.1")));
    }

    #[test]
    fn ipv4_mapped_addresses_are_ipv4() {
        let r = IpRules {
            allow: nets(&["10.0.0.0/8"]),
            deny: nets(&["::ffff:10.66.0.0/112"]),
        };
        assert_eq!(r.deny[0], "10.66.0.0/16".parse::<IpNet>().unwrap());
        assert!(r.permits(ip("::ffff:10.1.2.3")));
        assert!(!r.permits(ip("::ffff:10.66.1.1")));
        assert!(!r.permits(ip("10.66.1.1")));
        assert!(!r.permits(ip("::ffff:11.0.0.1")));
    }

    #[test]
    fn forwarded_for_from_an_untrusted_peer_is_ignored() {
        let trusted = nets(&["10.0.0.0/8"]);
        let h = xff(&["1.2.3.4", "10.0.0.1"]);
        assert_eq!(
            client_ip(ip("203.0.113.9"), &h, &trusted),
            ip("203.0.113.9")
        );
        assert_eq!(client_ip(ip("203.0.113.9"), &h, &[]), ip("203.0.113.9"));
        // A trusted peer without the header is the client itself.
        assert_eq!(
            client_ip(ip("10.0.0.2"), &HeaderMap::new(), &trusted),
            ip("10.0.0.2")
        );
    }

    #[test]
    fn the_chain_is_walked_from_the_right_through_trusted_proxies() {
        let trusted = nets(&["10.0.0.0/8"]);
        // The client wrote 6.6.6.6 itself; the edge proxy 10.0.0.1 appended the real
        // client 203.0.113.9; the peer 10.0.0.2 appended 10.0.0.1.
        let one_line = xff(&["6.6.6.6, 203.0.113.9, 10.0.0.1"]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &one_line, &trusted),
            ip("203.0.113.9")
        );
        let lines = xff(&["6.6.6.6", "203.0.113.9,10.0.0.1"]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &lines, &trusted),
            ip("203.0.113.9")
        );
        // Everything trusted: the leftmost hop is as far as we know.
        let all = xff(&["10.0.0.5, 10.0.0.1"]);
        assert_eq!(client_ip(ip("10.0.0.2"), &all, &trusted), ip("10.0.0.5"));
        // Empty entries are skipped; ports are dropped.
        let ports = xff(&["203.0.113.9:4711, , 10.0.0.1:80,"]);
        assert_eq!(
            client_ip(ip("10.0.0.2"), &ports, &trusted),
            ip("203.0.113.9")
        );
    }

    #[test]
    fn garbage_stops_the_walk_at_the_last_trusted_hop() {
        let trusted = nets(&["10.0.0.0/8"]);
        let peer = ip("10.0.0.2");
        let h = xff(&["203.0.113.9, unknown, 10.0.0.1"]);
        assert_eq!(client_ip(peer, &h, &trusted), ip("10.0.0.1"));
        let h = xff(&["203.0.113.9, 10.0.0.1/8"]);
        assert_eq!(client_ip(peer, &h, &trusted), peer);
        let mut h = xff(&["203.0.113.9"]);
        h.append(
            "x-forwarded-for",
            HeaderValue::from_bytes(b"10.0.0.1, \xff").unwrap(),
        );
        assert_eq!(client_ip(peer, &h, &trusted), peer);
        // An absurdly long chain of trusted hops is cut short the same way.
        let long = format!("203.0.113.9{}", ", 10.0.0.7".repeat(40));
        assert_eq!(client_ip(peer, &xff(&[&long]), &trusted), ip("10.0.0.7"));
    }

    #[test]
    fn ipv6_chains_and_mapped_hops() {
        let trusted = nets(&["fd00::/8", "10.0.0.0/8"]);
        let h = xff(&["2001:db8::7, fd00::2"]);
        assert_eq!(client_ip(ip("fd00::1"), &h, &trusted), ip("2001:db8::7"));
        let h = xff(&["[2001:db8::7]:443, [fd00::2]"]);
        assert_eq!(client_ip(ip("fd00::1"), &h, &trusted), ip("2001:db8::7"));
        // A dual-stack socket reports the IPv4 proxy as a mapped address.
        let h = xff(&["::ffff:198.51.100.1"]);
        assert_eq!(
            client_ip(ip("::ffff:10.0.0.2"), &h, &trusted),
            ip("198.51.100.1")
        );
        assert_eq!(client_ip(ip("::ffff:8.8.8.8"), &h, &trusted), ip("8.8.8.8"));
    }

    #[tokio::test]
    async fn forbidden_is_a_json_403() {
        let e = crate::guard::tests::api_error(forbidden()).await;
        assert_eq!(e.status, StatusCode::FORBIDDEN);
        assert_eq!(e.code, "forbidden");
    }
}
