//! How local clients reach their home's running node: the `caisey` CLI and viewer reach the
//! technician's node, `caisey-agent pending | approve` and the consent window reach the agent's
//! daemon. One long-running process per home owns the store; everything else is its client.
//!
//! The transport is a socket inside the home ([`socket`], the one platform-specific piece), so
//! only the home's owner can reach it — never the network. On it, JSON lines:
//! 1. The client opens with a [`Hello`] naming the API and its version; the server answers with
//!    its own, or with one line saying why it will not talk (another API, another version). A
//!    client and a node from different releases get that line, not garbage.
//! 2. Then each request line gets one reply line — or, for a request the service answers with
//!    a stream ([`Answer::Stream`], e.g. "tell me when documents change"), reply lines until
//!    either side closes. A stream has its connection to itself.
//!
//! Each reply line is `{"ok": REPLY}`, or `{"error": "..."}` when the request could not even be
//! read. Lines are bounded before they are buffered: a request line by [`MAX_REQUEST`], a reply
//! line by [`MAX_REPLY`].

pub mod socket;

use std::marker::PhantomData;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tracing::{debug, warn};

/// The longest request line a node reads.
pub const MAX_REQUEST: u64 = 4 * 1024 * 1024;
/// The longest reply line a client reads (a reply can carry output chunks).
pub const MAX_REPLY: u64 = 256 * 1024 * 1024;

/// Which API a socket speaks, and which version of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Hello {
    pub api: &'static str,
    pub version: u32,
}

/// The hello as read from the other side (owned strings: it may name any API).
#[derive(Debug, Deserialize)]
struct HelloIn {
    api: String,
    version: u32,
}

/// What a service answers a request with.
#[derive(Debug)]
pub enum Answer<R> {
    One(R),
    /// Replies as they come, until the sender is dropped or the client goes away.
    Stream(mpsc::Receiver<R>),
}

/// A local API: what its requests and replies are, its name and version.
pub trait Api: Send + 'static {
    type Request: Serialize + DeserializeOwned + Send + Sync + 'static;
    type Reply: Serialize + DeserializeOwned + Send + Sync + 'static;
    const HELLO: Hello;
}

/// The node side of a local API.
pub trait Service: Clone + Send + Sync + 'static {
    type Api: Api;
    fn handle(
        &self,
        request: <Self::Api as Api>::Request,
    ) -> impl std::future::Future<Output = Answer<<Self::Api as Api>::Reply>> + Send;
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line<T> {
    Ok(T),
    Error(String),
}

/// How many clients are connected, and since when none is: a node started on demand exits
/// after it has been idle for a while.
#[derive(Debug, Clone)]
pub struct Clients {
    inner: Arc<ClientsInner>,
}

#[derive(Debug)]
struct ClientsInner {
    connected: AtomicUsize,
    last_left: std::sync::Mutex<Instant>,
}

impl Default for Clients {
    fn default() -> Self {
        Self { inner: Arc::new(ClientsInner { connected: AtomicUsize::new(0), last_left: Instant::now().into() }) }
    }
}

impl Clients {
    pub fn connected(&self) -> usize {
        self.inner.connected.load(Ordering::SeqCst)
    }

    /// How long no client has been connected (`None` while one is).
    pub fn idle_for(&self) -> Option<Duration> {
        if self.connected() > 0 {
            return None;
        }
        self.inner.last_left.lock().ok().map(|t| t.elapsed())
    }

    fn arrive(&self) -> ClientGuard {
        self.inner.connected.fetch_add(1, Ordering::SeqCst);
        ClientGuard(self.clone())
    }
}

struct ClientGuard(Clients);

impl Drop for ClientGuard {
    fn drop(&mut self) {
        if let Ok(mut t) = self.0.inner.last_left.lock() {
            *t = Instant::now();
        }
        self.0.inner.connected.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Serves `service` on `listener` until the task is dropped.
pub async fn serve<S: Service>(listener: socket::Listener, service: S, clients: Clients) -> Result<()> {
    loop {
        // A failed accept (out of file descriptors, a client gone before it was accepted) is
        // that client's problem, not the end of the socket.
        let stream = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!("local socket: {e:#}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (service, guard) = (service.clone(), clients.arrive());
        tokio::spawn(async move {
            let _guard = guard;
            if let Err(e) = serve_client(stream, service).await {
                debug!("local client: {e:#}");
            }
        });
    }
}

async fn serve_client<S: Service>(stream: socket::Stream, service: S) -> Result<()> {
    let ours = <S::Api as Api>::HELLO;
    let (read, mut write) = tokio::io::split(stream);
    let mut read = BufReader::new(read);
    // A client that never says hello does not hold its place (and keep the node from idling).
    let Ok(hello) = tokio::time::timeout(Duration::from_secs(10), read_line(&mut read, 4096)).await else {
        return Ok(());
    };
    let Some(theirs) = hello? else { return Ok(()) };
    match serde_json::from_slice::<HelloIn>(&theirs) {
        Ok(h) if h.api == ours.api && h.version == ours.version => write_line(&mut write, &ours).await?,
        Ok(h) => {
            let why = mismatch((ours.api, ours.version), (&h.api, h.version));
            write_line(&mut write, &Line::<()>::Error(why)).await?;
            return Ok(());
        }
        Err(_) => {
            let why = format!(
                "this is a {} v{} socket and the client did not say which API it speaks (an older client?)",
                ours.api, ours.version
            );
            write_line(&mut write, &Line::<()>::Error(why)).await?;
            return Ok(());
        }
    }
    while let Some(line) = read_line(&mut read, MAX_REQUEST).await? {
        let request = match serde_json::from_slice::<<S::Api as Api>::Request>(&line) {
            Ok(r) => r,
            Err(e) => {
                write_line(&mut write, &Line::<()>::Error(format!("malformed request: {e}"))).await?;
                continue;
            }
        };
        match service.handle(request).await {
            Answer::One(reply) => write_line(&mut write, &Line::Ok(reply)).await?,
            Answer::Stream(mut replies) => {
                // The client sends nothing more on a stream; its closing ends the stream.
                let mut probe = [0u8; 1];
                loop {
                    tokio::select! {
                        next = replies.recv() => match next {
                            Some(reply) => write_line(&mut write, &Line::Ok(reply)).await?,
                            None => return Ok(()),
                        },
                        _ = read.read(&mut probe) => return Ok(()),
                    }
                }
            }
        }
    }
    Ok(())
}

/// Why a node speaking `node` and a client speaking `client` will not talk, in one line.
fn mismatch(node: (&str, u32), client: (&str, u32)) -> String {
    if node.0 != client.0 {
        return format!("the socket speaks {} and the client {}; is it the right --home?", node.0, client.0);
    }
    format!(
        "the running node speaks {} v{} and this client v{}: use one version of Caisey for both \
         (stop the old node with `caisey down`)",
        node.0, node.1, client.1
    )
}

/// A client's connection to its home's node.
pub struct Connection<A: Api> {
    read: BufReader<tokio::io::ReadHalf<socket::Stream>>,
    write: tokio::io::WriteHalf<socket::Stream>,
    _api: PhantomData<A>,
}

/// Why a client could not talk to a node.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnectError {
    /// Nothing listens on the socket: the node is not running.
    #[error("no node is running for this home (no socket at {0})")]
    NotRunning(String),
    /// A node answered but will not talk to this client (another API or version).
    #[error("{0}")]
    Refused(String),
    /// The socket is there but this user may not use it.
    #[error(
        "this user may not use {0} (permission denied); its owner, or a member of the group it is shared with, may"
    )]
    Denied(String),
    #[error("talking to the node: {0:#}")]
    Io(anyhow::Error),
}

impl<A: Api> Connection<A> {
    /// Connects to the node whose socket is at `path` and checks it speaks this API version.
    pub async fn open(path: &Path) -> Result<Self, ConnectError> {
        let stream = socket::connect(path).await.map_err(|e| match e.kind() {
            std::io::ErrorKind::PermissionDenied => ConnectError::Denied(path.display().to_string()),
            _ => ConnectError::NotRunning(path.display().to_string()),
        })?;
        let (read, mut write) = tokio::io::split(stream);
        let mut read = BufReader::new(read);
        let hello = async {
            write_line(&mut write, &A::HELLO).await?;
            read_line(&mut read, 64 * 1024).await?.ok_or_else(|| anyhow!("the node closed the connection at once"))
        };
        let line = tokio::time::timeout(Duration::from_secs(10), hello)
            .await
            .map_err(|_| ConnectError::Io(anyhow!("the node did not answer within 10 s")))?
            .map_err(ConnectError::Io)?;
        if let Ok(Line::<()>::Error(why)) = serde_json::from_slice(&line) {
            return Err(ConnectError::Refused(why));
        }
        match serde_json::from_slice::<HelloIn>(&line) {
            Ok(h) if h.api == A::HELLO.api && h.version == A::HELLO.version => {}
            Ok(h) => {
                return Err(ConnectError::Refused(mismatch((&h.api, h.version), (A::HELLO.api, A::HELLO.version))));
            }
            Err(_) => {
                return Err(ConnectError::Refused(format!("{} is not a {} socket", path.display(), A::HELLO.api)));
            }
        }
        Ok(Self { read, write, _api: PhantomData })
    }

    /// Sends one request and reads its one reply.
    pub async fn call(&mut self, request: &A::Request) -> Result<A::Reply> {
        write_line(&mut self.write, request).await?;
        read_reply(&mut self.read).await?.ok_or_else(|| anyhow!("the node closed the connection without answering"))
    }

    /// Sends a request the node answers with a stream; replies arrive on the receiver until
    /// the node ends the stream or goes away.
    pub async fn stream(mut self, request: &A::Request) -> Result<mpsc::Receiver<A::Reply>> {
        write_line(&mut self.write, request).await?;
        let (tx, rx) = mpsc::channel(256);
        let (mut read, write) = (self.read, self.write);
        tokio::spawn(async move {
            // Kept open while the stream runs: closing it tells the node we are gone.
            let _write = write;
            while let Ok(Some(reply)) = read_reply::<A::Reply>(&mut read).await {
                if tx.send(reply).await.is_err() {
                    break;
                }
            }
        });
        Ok(rx)
    }
}

async fn read_reply<R: DeserializeOwned>(read: &mut (impl AsyncBufReadExt + Unpin + Send)) -> Result<Option<R>> {
    let Some(line) = read_line(read, MAX_REPLY).await? else { return Ok(None) };
    match serde_json::from_slice::<Line<R>>(&line).context("the node's reply is malformed")? {
        Line::Ok(r) => Ok(Some(r)),
        Line::Error(e) => bail!("{e}"),
    }
}

/// Reads one line of at most `max` bytes (without its newline); `None` at a clean end.
async fn read_line(read: &mut (impl AsyncBufReadExt + Unpin + Send), max: u64) -> Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let n = read.take(max + 1).read_until(b'\n', &mut line).await?;
    if n == 0 {
        return Ok(None);
    }
    if line.last() != Some(&b'\n') {
        if line.len() as u64 > max {
            bail!("a line of more than {max} bytes");
        }
        bail!("the connection ended in the middle of a line");
    }
    line.pop();
    Ok(Some(line))
}

async fn write_line<T: Serialize>(write: &mut (impl AsyncWrite + Unpin), value: &T) -> Result<()> {
    let mut line = serde_json::to_vec(value)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    write.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone)]
    struct Echo;

    impl Api for Echo {
        type Request = String;
        type Reply = String;
        const HELLO: Hello = Hello { api: "echo", version: 2 };
    }

    impl Service for Echo {
        type Api = Echo;
        async fn handle(&self, request: String) -> Answer<String> {
            if request == "count" {
                let (tx, rx) = mpsc::channel(4);
                tokio::spawn(async move {
                    for i in 0..3 {
                        let _ = tx.send(i.to_string()).await;
                    }
                });
                return Answer::Stream(rx);
            }
            Answer::One(format!("echo {request}"))
        }
    }

    struct OldEcho;

    impl Api for OldEcho {
        type Request = String;
        type Reply = String;
        const HELLO: Hello = Hello { api: "echo", version: 1 };
    }

    #[tokio::test]
    async fn requests_replies_and_streams_over_one_socket_and_versions_must_match() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.sock");
        let clients = Clients::default();
        let server = tokio::spawn(serve(socket::bind(&path).unwrap(), Echo, clients.clone()));

        let mut c = Connection::<Echo>::open(&path).await.unwrap();
        assert_eq!(c.call(&"hi".into()).await.unwrap(), "echo hi");
        assert_eq!(c.call(&"again".into()).await.unwrap(), "echo again");
        assert_eq!(clients.connected(), 1);
        assert!(clients.idle_for().is_none());
        let mut stream = c.stream(&"count".into()).await.unwrap();
        let mut got = vec![];
        while let Some(r) = stream.recv().await {
            got.push(r);
        }
        assert_eq!(got, ["0", "1", "2"]);

        // A client of another version gets one clear line, and nothing else happens.
        let err = Connection::<OldEcho>::open(&path).await.err().unwrap();
        let msg = err.to_string();
        assert!(msg.contains("v2") && msg.contains("v1") && !msg.contains('\n'), "{msg}");

        // A client that sends no hello at all is told what this socket is.
        let raw = socket::connect(&path).await.unwrap();
        let (r, mut w) = tokio::io::split(raw);
        w.write_all(b"{\"op\":\"pending\"}\n").await.unwrap();
        let mut line = String::new();
        BufReader::new(r).read_line(&mut line).await.unwrap();
        assert!(line.contains("did not say which API"), "{line}");

        // A request line over the bound is refused without being buffered whole.
        let mut c = Connection::<Echo>::open(&path).await.unwrap();
        let huge = "x".repeat(MAX_REQUEST as usize + 10);
        assert!(c.call(&huge).await.is_err());

        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(clients.idle_for().is_some());
        server.abort();
        assert!(matches!(
            Connection::<Echo>::open(&dir.path().join("none.sock")).await,
            Err(ConnectError::NotRunning(_))
        ));
    }
}
