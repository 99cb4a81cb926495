//! The iroh relay server a Caisey relay runs, so members behind NAT can reach each other.
//!
//! Members use it to learn their public address (QUIC address discovery) and to meet: two
//! nodes behind different NATs first talk through it, then hole-punch a direct path; when no
//! direct path can be made, their packets keep going through it (still end-to-end encrypted:
//! the server sees only ciphertext between node ids). Only members of the org may use it.
//!
//! It serves HTTPS with a self-signed certificate made on first start and kept in the home,
//! with its ports, so its URL and certificate stay the same across restarts: members pin that
//! certificate, which they learn from this relay's signed presence in the fleet document (see
//! `caisey_peer::traversal`). No domain name and no CA are needed.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use caisey_doc::fleet::RelayServer;
use caisey_peer::node::Node;
use data_encoding::BASE64;
use iroh_relay::server::{Access, AccessControl, CertConfig, ClientRequest, QuicConfig, RelayConfig, ServerConfig};
use iroh_relay::server::{Server, TlsConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use serde::{Deserialize, Serialize};

/// What stays the same across restarts: ports, certificate, key.
#[derive(Serialize, Deserialize)]
struct Saved {
    http_port: u16,
    https_port: u16,
    quic_port: u16,
    cert: String,
    key: String,
}

const FILE: &str = "relay-server.json";

/// Starts the relay server on `ip` (ports and certificate as saved in `home`, or new ones) and
/// returns it with how members reach it at `public_ip`.
pub async fn start(node: &Node, home: &Path, ip: IpAddr, public_ip: IpAddr) -> Result<(Server, RelayServer)> {
    let path = home.join(FILE);
    let saved: Option<Saved> = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let (cert, key, ports) = match &saved {
        Some(s) => (
            BASE64.decode(s.cert.as_bytes()).context("the saved relay certificate is damaged")?,
            BASE64.decode(s.key.as_bytes()).context("the saved relay key is damaged")?,
            (s.http_port, s.https_port, s.quic_port),
        ),
        None => {
            let made = rcgen::generate_simple_self_signed(vec!["caisey-relay".to_string()])
                .context("making the relay server's certificate")?;
            (made.cert.der().to_vec(), made.signing_key.serialize_der(), (0, 0, 0))
        }
    };
    let tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(cert.clone())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.clone())),
        )
        .context("the relay server's certificate or key is unusable")?;
    let mut relay = RelayConfig::new(SocketAddr::new(ip, ports.0));
    relay.tls = Some(TlsConfig::new(SocketAddr::new(ip, ports.1), CertConfig::Manual { server_config: tls }));
    relay.access = Arc::new(MembersOnly(node.clone()));
    let mut config = ServerConfig::default();
    config.relay = Some(relay);
    config.quic = Some(QuicConfig::new(SocketAddr::new(ip, ports.2)));
    config.metrics_addr = None;
    let server = Server::spawn(config).await.context("starting the relay server (its ports may be taken)")?;
    let (Some(http), Some(https), Some(quic)) = (server.http_addr(), server.https_addr(), server.quic_addr()) else {
        anyhow::bail!("the relay server did not bind all its ports");
    };
    if saved.is_none() {
        let s = Saved {
            http_port: http.port(),
            https_port: https.port(),
            quic_port: quic.port(),
            cert: BASE64.encode(&cert),
            key: BASE64.encode(&key),
        };
        std::fs::write(&path, serde_json::to_vec(&s)?).with_context(|| format!("writing {}", path.display()))?;
        restrict(&path)?;
    }
    let url = format!("https://{}", SocketAddr::new(public_ip, https.port()));
    Ok((server, RelayServer { url, quic_port: Some(quic.port()), cert: BASE64.encode(&cert) }))
}

#[cfg(unix)]
fn restrict(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?)
}

#[cfg(not(unix))]
fn restrict(_path: &Path) -> Result<()> {
    Ok(())
}

/// Serves the org's members; strangers are turned away.
#[derive(Debug)]
struct MembersOnly(Node);

impl AccessControl for MembersOnly {
    async fn on_connect(&self, request: &ClientRequest) -> Access {
        let id = caisey_doc::id::NodeId(*request.endpoint_id().as_bytes());
        match self.0.member_name(id).await {
            Ok(Some(_)) => Access::Allow,
            _ => Access::Deny { reason: Some("not a member of this org".into()) },
        }
    }
}
