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
use iroh::{Endpoint, RelayMap, RelayUrl};
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
    /// What the endpoint is built with: an empty relay map (filled in by [`RelayServers::update`]
    /// as the fleet names servers) and TLS that trusts only the pinned certificates.
    pub fn tls_config(&self) -> CaTlsConfig {
        let pins = self.pins.clone();
        CaTlsConfig::custom_server_cert_verifier(Arc::new(move |provider| {
            Ok(Arc::new(PinnedVerifier { pins: pins.clone(), provider }) as Arc<dyn ServerCertVerifier>)
        }))
    }

    pub fn relay_map(&self) -> RelayMap {
        RelayMap::empty()
    }

    /// Uses every server in `servers` not used yet (their certificates pinned first).
    pub async fn update(&self, endpoint: &Endpoint, servers: Vec<RelayServer>) {
        for server in servers {
            let Ok(url) = server.url.parse::<RelayUrl>() else {
                warn!(url = %server.url, "a relay names a relay server whose URL does not parse; ignoring it");
                continue;
            };
            if self.known.read().is_ok_and(|k| k.get(&url) == Some(&server)) {
                continue;
            }
            let Ok(cert) = BASE64.decode(server.cert.as_bytes()) else {
                warn!(%url, "a relay server's certificate is not base64; ignoring it");
                continue;
            };
            self.pins.add(cert);
            let config = RelayConfig::new(url.clone(), server.quic_port.map(RelayQuicConfig::new));
            endpoint.insert_relay(url.clone(), Arc::new(config)).await;
            info!(%url, "using the org's relay server");
            if let Ok(mut known) = self.known.write() {
                known.insert(url, server);
            }
        }
    }

    /// The URLs of the relay servers in use: a peer is also dialled through them.
    pub fn urls(&self) -> Vec<RelayUrl> {
        self.known.read().map(|k| k.keys().cloned().collect()).unwrap_or_default()
    }
}

/// Certificates (DER) accepted from relay servers, whatever names they carry.
#[derive(Debug, Clone, Default)]
pub struct PinnedCerts(Arc<RwLock<Vec<Vec<u8>>>>);

impl PinnedCerts {
    fn add(&self, der: Vec<u8>) {
        if let Ok(mut pins) = self.0.write()
            && !pins.contains(&der)
        {
            pins.push(der);
        }
    }

    fn contains(&self, der: &[u8]) -> bool {
        self.0.read().is_ok_and(|pins| pins.iter().any(|p| p == der))
    }
}

/// Accepts a server whose certificate is exactly one of the pinned ones, and checks that the
/// server holds its key (the handshake signature), as any TLS verifier does.
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
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if self.pins.contains(end_entity.as_ref()) {
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
