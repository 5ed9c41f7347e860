//! The other end of a connection, as the transport saw it: what
//! authentication starts from.

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
    sync::Arc,
};

use rustls::pki_types::CertificateDer;

/// The other end of a connection, as the transport saw it. The gate reads
/// it to authenticate the caller.
#[derive(Clone)]
pub struct Peer {
    /// The TCP peer's address.
    pub addr: Option<SocketAddr>,
    /// A Unix-socket peer's uid.
    pub uid: Option<u32>,
    /// The client certificate chain a TLS peer presented (leaf first),
    /// already verified by rustls against the configured client CA.
    pub certificates: Option<Arc<[CertificateDer<'static>]>>,
}

impl fmt::Debug for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Peer")
            .field("addr", &self.addr)
            .field("uid", &self.uid)
            .field("certificates", &self.certificates.as_ref().map_or(0, |c| c.len()))
            .finish()
    }
}

impl fmt::Display for Peer {
    /// How the peer is counted: `10.0.0.7` for TCP (no port: one peer opens
    /// many), `2001:db8::/64` for IPv6, `uid 1000` for a Unix socket.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.addr, self.uid) {
            (Some(addr), _) => match peer_ip_key(addr.ip()) {
                IpAddr::V6(prefix) => write!(f, "{prefix}/64"),
                v4 => write!(f, "{v4}"),
            },
            (None, Some(uid)) => write!(f, "uid {uid}"),
            (None, None) => f.write_str("unknown"),
        }
    }
}

/// How a TCP peer is counted for failed authentications and audit records:
/// its IP address, an IPv6 address by its /64 (which one host usually
/// holds whole), an IPv4-mapped IPv6 address as the IPv4 address.
pub fn peer_ip_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut octets = v6.octets();
                octets[8..].fill(0);
                IpAddr::from(octets)
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peers_are_shown_as_they_are_counted() {
        let peer = |addr: &str| Peer {
            addr: addr.parse().ok(),
            uid: None,
            certificates: None,
        };
        assert_eq!(peer("10.0.0.7:4000").to_string(), "10.0.0.7");
        assert_eq!(peer("[2001:db8::1:2]:4000").to_string(), "2001:db8::/64");
        assert_eq!(peer("[::ffff:10.0.0.7]:4000").to_string(), "10.0.0.7");
        let uds = Peer {
            addr: None,
            uid: Some(1000),
            certificates: None,
        };
        assert_eq!(uds.to_string(), "uid 1000");
    }
}
