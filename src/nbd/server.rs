//! The NBD server: TCP and unix-socket listeners, one task per connection, clean shutdown.
//!
//! What is exported comes from an [`ExportSource`] (the daemon implements it over the catalog,
//! see [`super::exports`]); the data comes from the [`Store`]. The protocol of one connection
//! lives in [`super::conn`].

use std::{
    io,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio::{
    net::{TcpListener, UnixListener},
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{debug, info, warn};
use uuid::Uuid;

use super::fence::Fence;
use crate::store::{ObjectId, Store};

/// One export as the server sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The export name (the volume UUID, lower case).
    pub name: String,
    pub description: String,
    /// The store object holding the data.
    pub object: ObjectId,
    /// Writes refused with EPERM (every attachment is read-only).
    pub read_only: bool,
}

/// Which exports exist right now. Asked at every INFO/GO/EXPORT_NAME and LIST, so an export
/// appears and disappears with its attachment.
#[async_trait::async_trait]
pub trait ExportSource: Send + Sync + 'static {
    /// The export called `name`, if it is offered now.
    async fn lookup(&self, name: &str) -> Result<Option<Export>, String>;
    /// Every export offered now.
    async fn list(&self) -> Result<Vec<Export>, String>;
    /// Where ending an export is announced: its connections then stop taking requests, and
    /// whoever ended it waits until they no longer reach the store (see [`Fence`]).
    /// `None`: exports never go away under a connection.
    fn fence(&self) -> Option<Arc<Fence>> {
        None
    }
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    pub tcp: SocketAddr,
    pub socket: PathBuf,
    /// The whole handshake must finish within this time.
    pub handshake_timeout: Duration,
    /// Requests in flight per connection.
    pub max_requests: usize,
    /// Bytes of request and reply data in flight per connection (back-pressure).
    pub max_inflight_bytes: usize,
}

impl NbdConfig {
    pub fn new(tcp: SocketAddr, socket: PathBuf) -> Self {
        NbdConfig {
            tcp,
            socket,
            handshake_timeout: Duration::from_secs(30),
            max_requests: 512,
            max_inflight_bytes: 128 << 20,
        }
    }
}

/// Shared by every connection.
pub(crate) struct Shared {
    pub store: Store,
    pub source: Arc<dyn ExportSource>,
    pub cfg: NbdConfig,
    /// Turns `true` when the server stops.
    pub shutdown: watch::Receiver<bool>,
}

/// A running server; call [`NbdServer::shutdown`] to stop it.
pub struct NbdServer {
    tcp_addr: SocketAddr,
    socket: PathBuf,
    stop: watch::Sender<bool>,
    /// Every connection and accept loop holds a clone; `recv` returns `None` once all are gone.
    done_rx: mpsc::Receiver<()>,
    done_tx: Option<mpsc::Sender<()>>,
    accept: Vec<JoinHandle<()>>,
}

/// Bound listeners, not accepting yet (so the bound address is known before the exports are).
pub struct NbdListeners {
    cfg: NbdConfig,
    tcp: TcpListener,
    tcp_addr: SocketAddr,
    unix: UnixListener,
}

impl NbdListeners {
    /// Binds both listeners, removing a stale socket file first.
    pub async fn bind(cfg: NbdConfig) -> io::Result<NbdListeners> {
        let tcp = TcpListener::bind(cfg.tcp).await.map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("binding the NBD address {}: {e}", cfg.tcp),
            )
        })?;
        let tcp_addr = tcp.local_addr()?;
        remove_stale_socket(&cfg.socket)?;
        let unix = UnixListener::bind(&cfg.socket).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("binding the NBD socket {}: {e}", cfg.socket.display()),
            )
        })?;
        Ok(NbdListeners {
            cfg,
            tcp,
            tcp_addr,
            unix,
        })
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Starts accepting.
    pub fn serve(self, store: Store, source: Arc<dyn ExportSource>) -> NbdServer {
        let NbdListeners {
            cfg,
            tcp,
            tcp_addr,
            unix,
        } = self;
        let socket = cfg.socket.clone();
        let (stop, shutdown) = watch::channel(false);
        let (done_tx, done_rx) = mpsc::channel(1);
        let shared = Arc::new(Shared {
            store,
            source,
            cfg,
            shutdown,
        });
        let accept = vec![
            tokio::spawn(accept_tcp(tcp, shared.clone(), done_tx.clone())),
            tokio::spawn(accept_unix(unix, shared, done_tx.clone())),
        ];
        info!(tcp = %tcp_addr, socket = %socket.display(), "NBD server listening");
        NbdServer {
            tcp_addr,
            socket,
            stop,
            done_rx,
            done_tx: Some(done_tx),
            accept,
        }
    }
}

impl NbdServer {
    /// Binds and starts accepting.
    pub async fn start(
        cfg: NbdConfig,
        store: Store,
        source: Arc<dyn ExportSource>,
    ) -> io::Result<NbdServer> {
        Ok(NbdListeners::bind(cfg).await?.serve(store, source))
    }

    pub fn tcp_addr(&self) -> SocketAddr {
        self.tcp_addr
    }

    /// Stops accepting, lets connections finish the requests they have read (they read no
    /// more), and removes the socket file. Connections still open after `grace` are aborted
    /// with the runtime.
    pub async fn shutdown(mut self, grace: Duration) {
        let _ = self.stop.send(true);
        self.done_tx = None;
        if tokio::time::timeout(grace, async {
            while self.done_rx.recv().await.is_some() {}
        })
        .await
        .is_err()
        {
            warn!("NBD connections did not finish within {grace:?}; closing anyway");
            for a in &self.accept {
                a.abort();
            }
        }
        if let Err(e) = std::fs::remove_file(&self.socket)
            && e.kind() != io::ErrorKind::NotFound
        {
            warn!(socket = %self.socket.display(), "removing the NBD socket: {e}");
        }
        info!("NBD stopped");
    }
}

/// A socket file left by a daemon that died is removed; anything else at that path is an error.
fn remove_stale_socket(path: &Path) -> io::Result<()> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            debug!(socket = %path.display(), "removing a stale NBD socket");
            std::fs::remove_file(path)
        }
        Ok(_) => Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("{} exists and is not a socket", path.display()),
        )),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Resolves once the server stops (the guard of `wait_for` is not `Send`: drop it here).
pub(crate) async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

async fn accept_tcp(l: TcpListener, shared: Arc<Shared>, done: mpsc::Sender<()>) {
    let mut stop = shared.shutdown.clone();
    loop {
        let (stream, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(c) => c,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!("NBD accept (tcp): {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let (r, w) = stream.into_split();
        let conn_id = Uuid::new_v4();
        debug!(%peer, %conn_id, "NBD connection (tcp)");
        let (shared, done) = (shared.clone(), done.clone());
        tokio::spawn(async move {
            super::conn::serve(shared, r, w, peer.to_string()).await;
            drop(done);
        });
    }
}

/// Requested send buffer of a unix-socket connection (the kernel caps it at `wmem_max`).
const UNIX_SNDBUF: usize = 4 << 20;

async fn accept_unix(l: UnixListener, shared: Arc<Shared>, done: mpsc::Sender<()>) {
    let mut stop = shared.shutdown.clone();
    loop {
        let stream = tokio::select! {
            r = l.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("NBD accept (unix): {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stopped(&mut stop) => break,
        };
        // Room for a queue of 1 MiB read replies: with the default (~200 KiB) a large reply
        // goes out in pieces, each waiting for the client to drain the last. Over TCP the
        // kernel tunes this itself, and setting it would turn that off.
        if let Err(e) = socket2::SockRef::from(&stream).set_send_buffer_size(UNIX_SNDBUF) {
            debug!("NBD unix socket send buffer: {e}");
        }
        let (r, w) = stream.into_split();
        debug!("NBD connection (unix)");
        let (shared, done) = (shared.clone(), done.clone());
        tokio::spawn(async move {
            super::conn::serve(shared, r, w, "unix".to_owned()).await;
            drop(done);
        });
    }
}
