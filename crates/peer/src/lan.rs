//! Finding the org's members on a LAN, with no relay and no typed addresses: mDNS.
//!
//! Every node that listens beyond loopback announces its node id and addresses on the local
//! network (service `caisey`) and listens for others' announcements, so members find each other
//! again when a DHCP lease or a move between networks changes their addresses. Finding a node
//! this way proves nothing: an address is only used to reach a node the fleet already names as
//! a member, and every connection is still authenticated by its key and checked for
//! membership. Strangers found on the LAN are refused like any other.
//!
//! Nodes listening on loopback only (tests, several homes on one machine) do not announce: their
//! addresses mean nothing to another machine.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use caisey_doc::id::NodeId;
use futures_util::StreamExt;
use iroh::PublicKey;
use iroh_mdns_address_lookup::{DiscoveryEvent, MdnsAddressLookup};
use tracing::{debug, warn};

/// The mDNS service name: Caisey nodes only, not every iroh application on the LAN.
const SERVICE: &str = "caisey";
/// Nodes remembered at most: announcements are unsigned, and anyone on the LAN could make up
/// endless node ids. Past this, new ids are ignored until some expire.
const MAX_SEEN: usize = 4096;

/// What mDNS has told us: the addresses each node announced last.
#[derive(Debug, Clone, Default)]
pub struct Lan {
    lookup: Option<MdnsAddressLookup>,
    seen: Arc<RwLock<BTreeMap<NodeId, Vec<SocketAddr>>>>,
}

impl Lan {
    /// Starts announcing and listening for `me`, unless `listen` is a loopback address. Without
    /// multicast (no interface for it) this says so in the log and the node works on without.
    pub fn start(me: PublicKey, listen: SocketAddr) -> Lan {
        if listen.ip().is_loopback() {
            return Lan::default();
        }
        match MdnsAddressLookup::builder().service_name(SERVICE).build(me) {
            Ok(lookup) => {
                let lan = Lan { lookup: Some(lookup), seen: Default::default() };
                lan.listen();
                lan
            }
            Err(e) => {
                warn!(
                    "no LAN discovery (mDNS could not start: {e}); members are found through their recorded addresses and relays"
                );
                Lan::default()
            }
        }
    }

    /// The address lookup for the endpoint (so iroh also resolves node ids through it).
    pub fn lookup(&self) -> Option<MdnsAddressLookup> {
        self.lookup.clone()
    }

    /// The addresses `node` last announced on the LAN.
    pub fn addrs_of(&self, node: &NodeId) -> Vec<SocketAddr> {
        self.seen.read().ok().and_then(|s| s.get(node).cloned()).unwrap_or_default()
    }

    fn listen(&self) {
        let (Some(lookup), seen) = (self.lookup.clone(), self.seen.clone()) else { return };
        tokio::spawn(async move {
            let mut events = lookup.subscribe().await;
            while let Some(event) = events.next().await {
                let Ok(mut seen) = seen.write() else { return };
                match event {
                    DiscoveryEvent::Discovered { endpoint_info, .. } => {
                        let node = NodeId(*endpoint_info.endpoint_id.as_bytes());
                        let addrs: Vec<SocketAddr> = endpoint_info.data.ip_addrs().copied().collect();
                        if seen.len() < MAX_SEEN || seen.contains_key(&node) {
                            debug!(node = %node.short(), ?addrs, "found on the LAN");
                            seen.insert(node, addrs);
                        }
                    }
                    DiscoveryEvent::Expired { endpoint_id } => {
                        seen.remove(&NodeId(*endpoint_id.as_bytes()));
                    }
                    _ => {}
                }
            }
        });
    }
}
