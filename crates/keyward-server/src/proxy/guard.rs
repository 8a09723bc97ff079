//! Network guard for upstreams. Every address a name resolves to is
//! checked, and the connection goes to a checked address: the resolver below
//! is the only one the upstream client uses, so there is no window between
//! checking a name and connecting to it (DNS rebinding).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddrClass {
    Public,
    /// Private, loopback, link-local, CGNAT, unique-local, multicast,
    /// unspecified, reserved, NAT64/6to4: allowed only for secrets that opt in.
    Internal,
    /// Cloud instance metadata: never.
    Metadata,
}

const METADATA_V4: [Ipv4Addr; 3] = [
    Ipv4Addr::new(169, 254, 169, 254), // AWS, GCP, Azure, OpenStack
    Ipv4Addr::new(169, 254, 170, 2),   // AWS ECS task metadata
    Ipv4Addr::new(100, 100, 100, 200), // Alibaba Cloud
];
const METADATA_V6: [Ipv6Addr; 1] = [Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)];

pub fn classify(ip: IpAddr) -> AddrClass {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            if METADATA_V6.contains(&v6) {
                return AddrClass::Metadata;
            }
            if let Some(v4) = v6.to_ipv4_mapped() {
                return classify_v4(v4);
            }
            let s = v6.segments();
            // Forms that embed an IPv4 address a gateway, translator or
            // tunnel will reach: the embedded address decides metadata, and
            // the form itself counts as internal.
            let embedded = embedded_v4(&v6);
            if !embedded.is_empty() {
                return embedded.into_iter().map(classify_v4).fold(AddrClass::Internal, worst);
            }
            let internal = v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local fc00::/7
                || (s[0] & 0xffc0) == 0xfe80 // link local fe80::/10
                || (s[0] & 0xffc0) == 0xfec0 // site local (deprecated)
                || (s[0] == 0x2001 && s[1] == 0x0db8); // documentation
            if internal { AddrClass::Internal } else { AddrClass::Public }
        }
    }
}

/// The IPv4 addresses an IPv6 address carries, by the forms that carry one
/// (several layouts where the prefix length is the operator's choice).
fn embedded_v4(v6: &Ipv6Addr) -> Vec<Ipv4Addr> {
    let s = v6.segments();
    let o = v6.octets();
    let at = |i: [usize; 4]| Ipv4Addr::new(o[i[0]], o[i[1]], o[i[2]], o[i[3]]);
    let last32 = at([12, 13, 14, 15]);
    if s[..6] == [0, 0, 0, 0, 0, 0] || s[..6] == [0, 0, 0, 0, 0xffff, 0] {
        // IPv4-compatible (`::a.b.c.d`, `::` and `::1` among them) and
        // IPv4-translated (`::ffff:0:a.b.c.d`, SIIT). IPv4-mapped addresses
        // are plain IPv4 to the socket layer: `classify` takes them as such.
        return vec![last32];
    }
    if s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1 {
        // Local-use NAT64 (64:ff9b:1::/48, RFC 8215): RFC 6052's /48, /56,
        // /64 and /96 layouts, the u octet (8) skipped.
        return vec![at([6, 7, 9, 10]), at([7, 9, 10, 11]), at([9, 10, 11, 12]), last32];
    }
    if s[0] == 0x64 && s[1] == 0xff9b {
        return vec![last32]; // well-known NAT64 prefix 64:ff9b::/96
    }
    if s[0] == 0x2002 {
        return vec![at([2, 3, 4, 5])]; // 6to4 2002::/16
    }
    if s[0] == 0x2001 && s[1] == 0 {
        // Teredo 2001::/32: the server, and the client with its bits inverted.
        let client = Ipv4Addr::new(!o[12], !o[13], !o[14], !o[15]);
        return vec![at([4, 5, 6, 7]), client];
    }
    Vec::new()
}

fn classify_v4(ip: Ipv4Addr) -> AddrClass {
    if METADATA_V4.contains(&ip) {
        return AddrClass::Metadata;
    }
    let o = ip.octets();
    let internal = ip.is_private()
        || ip.is_loopback()
        || ip.is_link_local()
        || ip.is_multicast()
        || ip.is_broadcast()
        || ip.is_documentation()
        || o[0] == 0 // 0.0.0.0/8
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // CGNAT 100.64.0.0/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18.0.0/15
        || o[0] >= 240; // reserved
    if internal { AddrClass::Internal } else { AddrClass::Public }
}

fn worst(a: AddrClass, b: AddrClass) -> AddrClass {
    use AddrClass::*;
    match (a, b) {
        (Metadata, _) | (_, Metadata) => Metadata,
        (Internal, _) | (_, Internal) => Internal,
        _ => Public,
    }
}

/// Why an upstream address was refused; found in the client's error chain.
#[derive(Debug)]
pub struct Refused(pub String);

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Refused {}

/// Checks one address against a secret's policy.
pub fn check(ip: IpAddr, allow_internal: bool) -> Result<(), Refused> {
    match classify(ip) {
        AddrClass::Public => Ok(()),
        AddrClass::Internal if allow_internal => Ok(()),
        AddrClass::Internal => Err(Refused(format!(
            "upstream address {ip} is internal; allow it for this secret with --allow-internal-upstream"
        ))),
        AddrClass::Metadata => Err(Refused(format!("upstream address {ip} is a cloud metadata address"))),
    }
}

/// Name → addresses. Tests and operators can pin names (`--resolve
/// HOST=ADDR`, like curl's `--resolve`); everything else goes to the system
/// resolver. Pinned addresses are checked like any other.
#[derive(Clone, Default)]
pub struct Lookup {
    pub pinned: Arc<HashMap<String, Vec<IpAddr>>>,
}

impl Lookup {
    pub async fn resolve(&self, host: &str) -> std::io::Result<Vec<IpAddr>> {
        // `localhost` is loopback (RFC 6761), whatever DNS, a search domain
        // or a pin says: `http://localhost` is allowed as loopback only.
        if host.eq_ignore_ascii_case("localhost") {
            return Ok(vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)]);
        }
        if let Some(ips) = self.pinned.get(&host.to_ascii_lowercase()) {
            return Ok(ips.clone());
        }
        Ok(tokio::net::lookup_host((host, 0)).await?.map(|a: SocketAddr| a.ip()).collect())
    }
}

/// The upstream client's resolver: refuses a name if any address it
/// resolves to is not allowed, so a name cannot mix a public and an internal
/// address to slip through.
pub struct GuardedResolver {
    pub lookup: Lookup,
    pub allow_internal: bool,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let lookup = self.lookup.clone();
        let allow_internal = self.allow_internal;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let ips = lookup.resolve(&host).await?;
            if ips.is_empty() {
                return Err(Box::new(Refused(format!("{host} resolves to no address"))) as _);
            }
            for ip in &ips {
                check(*ip, allow_internal).map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)?;
            }
            let addrs: reqwest::dns::Addrs = Box::new(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)));
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(s: &str) -> AddrClass {
        classify(s.parse().unwrap())
    }

    #[test]
    fn classes() {
        for public in ["8.8.8.8", "104.18.6.192", "2606:4700::6810:6c0", "1.1.1.1"] {
            assert_eq!(c(public), AddrClass::Public, "{public}");
        }
        for internal in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.1.1",
            "100.64.0.1",
            "0.0.0.0",
            "0.1.2.3",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "ff02::1",
            "::ffff:10.0.0.1",
            "::ffff:127.0.0.1",
            "64:ff9b::808:808",
            "2002:0808:0808::1",
            "::808:808",                            // IPv4-compatible
            "::ffff:0:808:808",                     // IPv4-translated (SIIT)
            "64:ff9b:1::808:808",                   // local-use NAT64
            "2001:0:4136:e378:8000:63bf:3fff:fdd2", // Teredo
        ] {
            assert_eq!(c(internal), AddrClass::Internal, "{internal}");
        }
        for meta in [
            "169.254.169.254",
            "169.254.170.2",
            "fd00:ec2::254",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "2002:a9fe:a9fe::1",
            "100.100.100.200",
            "::a9fe:a9fe",
            "::ffff:0:a9fe:a9fe",
            "64:ff9b:1:a9fe:a9:fe00::",             // local-use NAT64, /48 layout
            "64:ff9b:1:a9:fe:a9fe::",               // /56
            "64:ff9b:1:0:a9:fea9:fe00:0",           // /64
            "64:ff9b:1::a9fe:a9fe",                 // /96
            "2001:0:4136:e378:8000:63bf:5601:5601", // Teredo client, bits inverted
            "2001:0:a9fe:a9fe:8000:63bf:3fff:fdd2", // Teredo server
        ] {
            assert_eq!(c(meta), AddrClass::Metadata, "{meta}");
        }
    }

    #[tokio::test]
    async fn localhost_is_loopback_whatever_a_pin_says() {
        let pinned = HashMap::from([("localhost".to_owned(), vec!["10.0.0.5".parse().unwrap()])]);
        let lookup = Lookup { pinned: Arc::new(pinned) };
        for name in ["localhost", "LocalHost"] {
            let ips = lookup.resolve(name).await.unwrap();
            assert!(!ips.is_empty() && ips.iter().all(|ip| ip.is_loopback()), "{name}: {ips:?}");
        }
    }

    #[test]
    fn metadata_is_refused_even_when_internal_is_allowed() {
        assert!(check("169.254.169.254".parse().unwrap(), true).is_err());
        assert!(check("10.0.0.1".parse().unwrap(), true).is_ok());
        assert!(check("10.0.0.1".parse().unwrap(), false).is_err());
    }
}
