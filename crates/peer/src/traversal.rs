//! Reaching members behind NAT: the org's iroh relay servers.
//!
//! Each Caisey relay runs an iroh relay server and names it, with its certificate, in its signed
//! presence in the fleet document. Every node uses the org's relay servers: as its home relay
//! (so peers can reach it through one when no direct path exists) and to learn its public address
//! (QUIC address discovery), which is what lets two nodes behind NAT hole-punch a direct path.
//!
//! A self-hosted relay has no domain name, so no CA would sign its certificate. Nodes trust
//! exactly the certificates the fleet names ([`PinnedCerts`]): a certificate is believed because
//! the relay that signed the presence record carrying it is a member — the same chain back to the
//! org key as everything else — not because of its subject name or any CA.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use caisey_doc::fleet::RelayServer;
use data_encoding::BASE64;
use iroh::tls::CaTlsConfig;
use iroh::{Endpoint, RelayUrl};
use iroh_relay::{RelayConfig, RelayQuicConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tracing::{info, warn};

/// The relay servers a node knows, and the certificates it accepts from them.
#[derive(Debug, Clone, Default)]
pub struct RelayServers {
    pins: PinnedCerts,
    known: Arc<RwLock<BTreeMap<RelayUrl, RelayServer>>>,
}

impl RelayServers {
    /// The TLS the endpoint is built with: it trusts only the pinned certificates. (The relay
    /// map starts empty and is filled in by [`RelayServers::update`] as the fleet names servers.)
    pub fn tls_config(&self) -> CaTlsConfig {
        let pins = self.pins.clone();
        CaTlsConfig::custom_server_cert_verifier(Arc::new(move |provider| {
            Ok(Arc::new(PinnedVerifier { pins: pins.clone(), provider }) as Arc<dyn ServerCertVerifier>)
        }))
    }

    /// Uses exactly the servers in `servers` (what the fleet names now): their certificates are
    /// the ones pinned, each for its own host; a server the fleet no longer names is dropped.
    pub async fn update(&self, endpoint: &Endpoint, servers: Vec<RelayServer>) {
        let mut wanted: BTreeMap<RelayUrl, RelayServer> = BTreeMap::new();
        let mut pins: BTreeMap<String, Vec<Vec<u8>>> = BTreeMap::new();
        for server in servers {
            let (Ok(url), Some(host)) = (server.url.parse::<RelayUrl>(), host_of(&server.url)) else {
                warn!(url = %server.url, "a relay names a relay server whose URL does not parse; ignoring it");
                continue;
            };
            let Ok(cert) = BASE64.decode(server.cert.as_bytes()) else {
                warn!(%url, "a relay server's certificate is not base64; ignoring it");
                continue;
            };
            pins.entry(host).or_default().push(cert);
            wanted.insert(url, server);
        }
        self.pins.set(pins);
        let known = self.known.read().map(|k| k.clone()).unwrap_or_default();
        for url in known.keys().filter(|u| !wanted.contains_key(*u)) {
            endpoint.remove_relay(url).await;
            info!(%url, "no longer using a relay server the fleet does not name");
        }
        for (url, server) in &wanted {
            if known.get(url) == Some(server) {
                continue;
            }
            let config = RelayConfig::new(url.clone(), server.quic_port.map(RelayQuicConfig::new));
            endpoint.insert_relay(url.clone(), Arc::new(config)).await;
            info!(%url, "using the org's relay server");
        }
        if let Ok(mut known) = self.known.write() {
            *known = wanted;
        }
    }

    /// The URLs of the relay servers in use: a peer is also dialled through them.
    pub fn urls(&self) -> Vec<RelayUrl> {
        self.known.read().map(|k| k.keys().cloned().collect()).unwrap_or_default()
    }
}

/// The certificates (DER) accepted from relay servers, by the host (IP or name) each serves at;
/// whatever names the certificates themselves carry.
#[derive(Debug, Clone, Default)]
pub struct PinnedCerts(Arc<RwLock<BTreeMap<String, Vec<Vec<u8>>>>>);

impl PinnedCerts {
    fn set(&self, pins: BTreeMap<String, Vec<Vec<u8>>>) {
        if let Ok(mut p) = self.0.write() {
            *p = pins;
        }
    }

    fn accepts(&self, host: &str, der: &[u8]) -> bool {
        self.0.read().is_ok_and(|pins| pins.get(host).is_some_and(|certs| certs.iter().any(|c| c == der)))
    }
}

/// The host of an `https://HOST:PORT` URL, as a server name would give it (an IP without
/// brackets).
fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split('/').next()?;
    if let Ok(addr) = authority.parse::<std::net::SocketAddr>() {
        return Some(addr.ip().to_string());
    }
    Some(authority.rsplit_once(':').map(|(h, _)| h).unwrap_or(authority).to_string())
}

fn host_of_name(name: &ServerName<'_>) -> String {
    match name {
        ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
        other => other.to_str().into_owned(),
    }
}

/// Accepts a server whose certificate is exactly the one pinned for the host it was reached
/// at, and checks that the server holds its key (the handshake signature), as any TLS verifier
/// does.
#[derive(Debug)]
struct PinnedVerifier {
    pins: PinnedCerts,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pins.accepts(&host_of_name(server_name), end_entity.as_ref()) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::General("not the certificate the org's fleet names for this relay".into()))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_is_accepted_only_for_the_host_it_is_pinned_for() {
        assert_eq!(host_of("https://10.0.0.1:4433").as_deref(), Some("10.0.0.1"));
        assert_eq!(host_of("https://[::1]:4433/").as_deref(), Some("::1"));
        assert_eq!(host_of("https://relay.example:443").as_deref(), Some("relay.example"));
        let pins = PinnedCerts::default();
        pins.set(BTreeMap::from([("10.0.0.1".to_string(), vec![b"cert-a".to_vec()])]));
        assert!(pins.accepts("10.0.0.1", b"cert-a"));
        assert!(!pins.accepts("10.0.0.2", b"cert-a"), "pinned for another host");
        assert!(!pins.accepts("10.0.0.1", b"cert-b"), "not the pinned certificate");
        pins.set(BTreeMap::new());
        assert!(!pins.accepts("10.0.0.1", b"cert-a"), "a relay the fleet no longer names");
        let name = ServerName::IpAddress(std::net::IpAddr::from([10, 0, 0, 1]).into());
        assert_eq!(host_of_name(&name), "10.0.0.1");
    }
}
