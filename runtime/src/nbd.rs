//! An NBD server (fixed newstyle handshake, simple replies) over named
//! [`Exports`]: ferry-agent exports each protected disk by its id, so that
//! a VM's writes (qemu, qemu-io, qemu-img, nbd-client) reach the agent the
//! way a real VM's would; failover-svc exports a recovery point's disks,
//! read-only, to the VMs an instant failover starts.
//!
//! The protocol is NetworkBlockDevice/nbd `doc/proto.md`. Options Ferry does
//! not support (structured replies, meta contexts, extended headers) are
//! answered NBD_REP_ERR_UNSUP; the client then uses simple replies.
//!
//! A listener may require TLS ([`NbdTls`], as `qemu-nbd --tls-creds`): the
//! client must send NBD_OPT_STARTTLS before any other option (others get
//! NBD_REP_ERR_TLS_REQD, NBD_OPT_EXPORT_NAME a hang-up), the connection is
//! upgraded, and the option haggling goes on inside TLS.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Mutex, Semaphore};
use tokio_util::sync::CancellationToken;

/// Why a request failed, as NBD tells the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdError {
    /// Out of space, or outside the export (ENOSPC).
    NoSpace,
    /// A request the export cannot take (EINVAL).
    Invalid,
    /// The export is read-only (EPERM).
    ReadOnly,
    /// The data could not be read or written (EIO).
    Io,
    /// The server is shutting down (ESHUTDOWN).
    ShuttingDown,
}

impl NbdError {
    fn errno(self) -> u32 {
        match self {
            NbdError::NoSpace => ENOSPC,
            NbdError::Invalid => EINVAL,
            NbdError::ReadOnly => EPERM,
            NbdError::Io => EIO,
            NbdError::ShuttingDown => ESHUTDOWN,
        }
    }
}

/// One export as a client sees it at its handshake.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    /// Writes, TRIM and WRITE_ZEROES are refused (EPERM), and the client
    /// is told so (NBD_FLAG_READ_ONLY).
    pub read_only: bool,
}

/// What a server exports: disks by name. Requests arrive concurrently.
pub trait Exports: Send + Sync + 'static {
    /// The names NBD_OPT_LIST shows. Empty keeps the names secret: a
    /// client must know one to attach.
    fn list(&self) -> Vec<String>;
    /// The export called `name`; None when there is none.
    fn export(&self, name: &str) -> Option<Export>;
    /// `length` bytes at `offset`.
    fn read(
        &self,
        name: &str,
        offset: u64,
        length: u32,
    ) -> impl std::future::Future<Output = Result<Vec<u8>, NbdError>> + Send;
    /// Writes `data` at `offset`.
    fn write(
        &self,
        name: &str,
        offset: u64,
        data: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<(), NbdError>> + Send;
    /// Zeroes `length` bytes at `offset` (`trim`: the client does not need
    /// them to read as zeros, NBD_CMD_TRIM).
    fn zero(
        &self,
        name: &str,
        offset: u64,
        length: u64,
        trim: bool,
    ) -> impl std::future::Future<Output = Result<(), NbdError>> + Send;
    /// Makes what was written durable.
    fn flush(&self, name: &str) -> impl std::future::Future<Output = Result<(), NbdError>> + Send;
}

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const CLIENT_NO_ZEROES: u32 = 2;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_STARTTLS: u32 = 5;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_POLICY: u32 = (1 << 31) + 2;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TFLAG_HAS_FLAGS: u16 = 1;
const TFLAG_READ_ONLY: u16 = 1 << 1;
const TFLAG_SEND_FLUSH: u16 = 1 << 2;
const TFLAG_SEND_FUA: u16 = 1 << 3;
const TFLAG_SEND_TRIM: u16 = 1 << 5;
const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const CMD_FLAG_FUA: u16 = 1;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;
/// The server is shutting down (NBD_ESHUTDOWN).
const ESHUTDOWN: u32 = 108;

/// Largest READ or WRITE accepted (also advertised as the maximum block size).
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;
/// Requests of one connection handled at once.
const IN_FLIGHT: usize = 64;

/// What one NBD client may hold of the server: memory stays bounded whatever
/// a client sends.
#[derive(Debug, Clone, Copy)]
pub struct NbdLimits {
    /// Connections attached to one export at once; one more is refused at
    /// its handshake (NBD_REP_ERR_POLICY).
    pub connections_per_export: usize,
    /// Payload bytes (write data read, read data to send) one connection may
    /// have in flight; the next request's payload is not read until there
    /// is room. At least MAX_REQUEST.
    pub in_flight_bytes: usize,
    /// How long a client may take over its handshake; one that stalls is
    /// dropped, so stalled clients cannot keep a VM from attaching.
    pub handshake_timeout: std::time::Duration,
    /// How long one request may take; one that takes longer (a hung disk
    /// under the export) closes its connection, so that the client fails
    /// its requests instead of waiting on them: a QEMU mirroring into the
    /// export ends the mirror and the guest writes on. None: no limit.
    pub request_timeout: Option<std::time::Duration>,
}

impl Default for NbdLimits {
    fn default() -> Self {
        NbdLimits {
            connections_per_export: 16,
            in_flight_bytes: 64 * 1024 * 1024,
            handshake_timeout: std::time::Duration::from_secs(30),
            request_timeout: None,
        }
    }
}

/// A client's byte stream: TCP, a Unix socket, or either under TLS.
trait Conn: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Conn for T {}
type BoxConn = Box<dyn Conn>;

/// Where NBD clients connect.
pub enum NbdListener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket (see [`UnixSocket`]).
    Unix(UnixListener),
}

impl NbdListener {
    async fn accept(&self) -> std::io::Result<(BoxConn, String)> {
        match self {
            NbdListener::Tcp(l) => {
                let (socket, peer) = l.accept().await?;
                let _ = socket.set_nodelay(true);
                Ok((Box::new(socket), peer.to_string()))
            }
            NbdListener::Unix(l) => {
                let (socket, _) = l.accept().await?;
                Ok((Box::new(socket), "unix".to_string()))
            }
        }
    }
}

/// Where NBD is served: over TCP, a Unix socket, or both.
pub struct NbdListeners {
    /// TCP (bound by the caller); None for none.
    pub tcp: Option<TcpListener>,
    /// TLS required on the TCP listener; None for plaintext.
    pub tls: Option<NbdTls>,
    /// A Unix socket (see [`UnixSocket::bind`]); None for none. Always
    /// plaintext: its file mode guards it.
    pub unix: Option<UnixSocket>,
}

impl From<TcpListener> for NbdListeners {
    fn from(tcp: TcpListener) -> Self {
        NbdListeners {
            tcp: Some(tcp),
            tls: None,
            unix: None,
        }
    }
}

/// Why the NBD TLS settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{flag} {path}: {why}")]
    Pem {
        flag: &'static str,
        path: String,
        why: String,
    },
    #[error("{flag} {path}: no certificate in it")]
    Empty { flag: &'static str, path: String },
    #[error("NBD TLS: {0} (--nbd-tls-cert, --nbd-tls-key, --nbd-tls-ca)")]
    Config(String),
}

/// TLS for an NBD listener: the server's certificate and key, and, if
/// given, the CA whose certificates clients must present.
#[derive(Clone)]
pub struct NbdTls {
    acceptor: tokio_rustls::TlsAcceptor,
    /// Whether clients must present a certificate.
    pub client_certificates: bool,
}

/// The certificates in the PEM file `path` (at least one).
fn pem_certificates(
    flag: &'static str,
    path: &Path,
) -> Result<Vec<tokio_rustls::rustls::pki_types::CertificateDer<'static>>, TlsError> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::CertificateDer;
    let pem = |why: String| TlsError::Pem {
        flag,
        path: path.display().to_string(),
        why,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::Empty {
            flag,
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

impl NbdTls {
    /// From PEM files: `cert` (the server's chain, leaf first), `key` (its
    /// private key), `ca` (clients' CA; None to accept any client that
    /// speaks TLS).
    pub fn from_pem_files(cert: &Path, key: &Path, ca: Option<&Path>) -> Result<NbdTls, TlsError> {
        use tokio_rustls::rustls;
        use tokio_rustls::rustls::pki_types::pem::PemObject;
        use tokio_rustls::rustls::pki_types::PrivateKeyDer;
        let chain = pem_certificates("--nbd-tls-cert", cert)?;
        let private = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Pem {
            flag: "--nbd-tls-key",
            path: key.display().to_string(),
            why: e.to_string(),
        })?;
        let config = |e: rustls::Error| TlsError::Config(e.to_string());
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(config)?;
        let builder = match ca {
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in pem_certificates("--nbd-tls-ca", ca)? {
                    roots.add(c).map_err(config)?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| TlsError::Config(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let server = builder.with_single_cert(chain, private).map_err(config)?;
        Ok(NbdTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            client_certificates: ca.is_some(),
        })
    }
}

/// Why the NBD Unix socket cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    #[error("--nbd-socket {path}: another process serves on it (a running agent?); stop it or choose another path")]
    InUse { path: String },
    #[error("--nbd-socket {path}: exists and is not a socket; it is not replaced")]
    NotASocket { path: String },
    #[error("--nbd-socket {path}: {what}: {source}")]
    Io {
        path: String,
        what: &'static str,
        source: std::io::Error,
    },
}

/// The NBD export's Unix socket: created fresh with mode 0600 (only the
/// agent's user connects), replacing a stale socket a previous run left;
/// its file is removed when the [`SocketFile`] is dropped.
pub struct UnixSocket {
    pub listener: UnixListener,
    pub file: SocketFile,
}

/// A socket file the agent made; removed on drop, unless another agent has
/// replaced it since.
pub struct SocketFile {
    path: PathBuf,
    id: Option<(u64, u64)>,
}

impl SocketFile {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        if file_id(&self.path).is_some() && file_id(&self.path) == self.id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn file_id(path: &Path) -> Option<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(path)
        .ok()
        .map(|m| (m.dev(), m.ino()))
}

impl UnixSocket {
    /// Binds the socket at `path`. It is made with mode 0600 inside a
    /// private directory (0700) beside `path`, then renamed into place, so
    /// no one connects before its mode is set, and a stale socket is
    /// replaced in one step. A socket someone still serves on is not
    /// replaced, nor is a file that is not a socket. Needs a Tokio runtime.
    pub fn bind(path: &Path) -> Result<UnixSocket, SocketError> {
        use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
        let shown = path.display().to_string();
        let io = |what: &'static str| {
            let path = shown.clone();
            move |source| SocketError::Io { path, what, source }
        };
        match std::fs::symlink_metadata(path) {
            Ok(m) if m.file_type().is_socket() => {
                if std::os::unix::net::UnixStream::connect(path).is_ok() {
                    return Err(SocketError::InUse { path: shown });
                }
                // Stale: nobody listens. Replaced by the rename below.
            }
            Ok(_) => return Err(SocketError::NotASocket { path: shown }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io("cannot inspect it")(e)),
        }
        let Some(name) = path.file_name() else {
            return Err(io("no file name")(std::io::ErrorKind::InvalidInput.into()));
        };
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let private = parent.join(format!(
            ".{}.{}.tmp",
            name.to_string_lossy(),
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&private);
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&private)
            .map_err(io("cannot create a private directory beside it"))?;
        let made = (|| {
            let inner = private.join("s");
            let listener = UnixListener::bind(&inner).map_err(io("cannot bind"))?;
            std::fs::set_permissions(&inner, std::fs::Permissions::from_mode(0o600))
                .map_err(io("cannot set its mode to 0600"))?;
            std::fs::rename(&inner, path).map_err(io("cannot move it into place"))?;
            Ok(listener)
        })();
        let _ = std::fs::remove_dir_all(&private);
        let listener = made?;
        Ok(UnixSocket {
            listener,
            file: SocketFile {
                path: path.to_path_buf(),
                id: file_id(path),
            },
        })
    }
}

/// What every listener of one export shares: the places on each export and
/// in the handshake, so that limits hold across listeners.
struct Server<E> {
    exports: Arc<E>,
    /// Places on each export attached to so far.
    places: std::sync::Mutex<HashMap<String, Arc<Semaphore>>>,
    handshakes: Arc<Semaphore>,
    limits: NbdLimits,
}

/// Serves NBD on `listener` until `shutdown`, with the default limits.
pub async fn serve<E: Exports>(
    listener: TcpListener,
    exports: Arc<E>,
    shutdown: CancellationToken,
) {
    serve_with(listener, exports, NbdLimits::default(), shutdown).await
}

/// Serves NBD on `listener` until `shutdown`.
pub async fn serve_with<E: Exports>(
    listener: TcpListener,
    exports: Arc<E>,
    limits: NbdLimits,
    shutdown: CancellationToken,
) {
    serve_all(
        vec![(NbdListener::Tcp(listener), None)],
        exports,
        limits,
        shutdown,
    )
    .await
}

/// Serves NBD on every listener (each with its TLS, if any) until
/// `shutdown`; the limits hold across them all.
pub async fn serve_all<E: Exports>(
    listeners: Vec<(NbdListener, Option<NbdTls>)>,
    exports: Arc<E>,
    limits: NbdLimits,
    shutdown: CancellationToken,
) {
    let server = Arc::new(Server {
        exports,
        places: std::sync::Mutex::new(HashMap::new()),
        // Connections still in their handshake, so that a flood of them is
        // bounded too.
        handshakes: Arc::new(Semaphore::new(limits.connections_per_export.max(1) * 2)),
        limits: NbdLimits {
            in_flight_bytes: limits.in_flight_bytes.max(MAX_REQUEST as usize),
            ..limits
        },
    });
    let loops: Vec<_> = listeners
        .into_iter()
        .map(|(listener, tls)| accept_loop(server.clone(), listener, tls, shutdown.clone()))
        .collect();
    futures::future::join_all(loops).await;
}

async fn accept_loop<E: Exports>(
    server: Arc<Server<E>>,
    listener: NbdListener,
    tls: Option<NbdTls>,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        match accepted {
            Ok((socket, peer)) => {
                let Ok(handshake) = server.handshakes.clone().try_acquire_owned() else {
                    tracing::warn!(%peer, "too many NBD connections in their handshake; refused");
                    continue;
                };
                let server = server.clone();
                let shutdown = shutdown.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    if let Err(e) =
                        connection(socket, &server, tls.as_ref(), handshake, shutdown).await
                    {
                        tracing::debug!(%peer, error = %e, "NBD connection ended");
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "NBD accept failed"),
        }
    }
}

/// A place on an export, held while a client is attached.
type Attached = tokio::sync::OwnedSemaphorePermit;

impl<E: Exports> Server<E> {
    /// A place on the export `name` (which exists), if one is free.
    fn attach(&self, name: &str) -> Option<Attached> {
        let mut places = self.places.lock().unwrap_or_else(|e| e.into_inner());
        let limit = self.limits.connections_per_export;
        // Exports come and go (failover-svc's): the places of those gone
        // with nobody attached go too, so the map stays as large as what
        // is served.
        places.retain(|n, s| s.available_permits() < limit || self.exports.export(n).is_some());
        let place = places
            .entry(name.to_string())
            .or_insert_with(|| Arc::new(Semaphore::new(limit)))
            .clone();
        place.try_acquire_owned().ok()
    }
}

async fn reply_option(
    w: &mut (impl AsyncWriteExt + Unpin),
    option: u32,
    kind: u32,
    data: &[u8],
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(20 + data.len());
    buf.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    buf.extend_from_slice(&option.to_be_bytes());
    buf.extend_from_slice(&kind.to_be_bytes());
    buf.extend_from_slice(&(data.len() as u32).to_be_bytes());
    buf.extend_from_slice(data);
    w.write_all(&buf).await
}

fn transmission_flags(export: Export) -> u16 {
    if export.read_only {
        TFLAG_HAS_FLAGS | TFLAG_READ_ONLY | TFLAG_SEND_FLUSH
    } else {
        TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
    }
}

/// The handshake; returns the chosen export (with its place), or None when
/// the client left.
async fn handshake<E: Exports>(
    mut socket: BufReader<BoxConn>,
    server: &Server<E>,
    tls: Option<&NbdTls>,
) -> std::io::Result<(BufReader<BoxConn>, Option<(String, Attached)>)> {
    let (exports, limits) = (&server.exports, server.limits);
    // With TLS required, nothing but STARTTLS (or ABORT) until it is on.
    let mut plaintext = tls.is_some();
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    socket.get_mut().write_all(&hello).await?;
    let client_flags = socket.read_u32().await?;
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;

    loop {
        if socket.read_u64().await? != IHAVEOPT {
            return Err(std::io::Error::other("bad option magic"));
        }
        let option = socket.read_u32().await?;
        let len = socket.read_u32().await?;
        if len > 64 * 1024 {
            return Err(std::io::Error::other("option data too long"));
        }
        let mut data = vec![0u8; len as usize];
        socket.read_exact(&mut data).await?;
        if plaintext {
            match option {
                OPT_STARTTLS if !data.is_empty() => {
                    let w = socket.get_mut();
                    reply_option(w, option, REP_ERR_INVALID, b"STARTTLS takes no data").await?;
                    continue;
                }
                OPT_STARTTLS => {
                    reply_option(socket.get_mut(), option, REP_ACK, &[]).await?;
                    // The client waits for the ACK before its TLS hello:
                    // anything already buffered breaks the protocol.
                    if !socket.buffer().is_empty() {
                        return Err(std::io::Error::other("data sent before the TLS handshake"));
                    }
                    let Some(tls) = tls else {
                        return Err(std::io::Error::other("TLS is not configured"));
                    };
                    let secured = tls.acceptor.accept(socket.into_inner()).await?;
                    socket = BufReader::new(Box::new(secured));
                    plaintext = false;
                    continue;
                }
                OPT_EXPORT_NAME => {
                    // No way to report an error for this option: hang up.
                    tracing::warn!("an NBD client chose an export without TLS; refused");
                    return Ok((socket, None));
                }
                OPT_ABORT => {}
                _ => {
                    let w = socket.get_mut();
                    reply_option(
                        w,
                        option,
                        REP_ERR_TLS_REQD,
                        b"this export requires TLS: send NBD_OPT_STARTTLS first",
                    )
                    .await?;
                    continue;
                }
            }
        }
        let w = socket.get_mut();
        match option {
            OPT_EXPORT_NAME => {
                let name = String::from_utf8_lossy(&data).into_owned();
                let Some(disk) = exports.export(&name) else {
                    // No way to report an error for this option: hang up.
                    return Ok((socket, None));
                };
                let Some(place) = server.attach(&name) else {
                    tracing::warn!(export = %name, limit = limits.connections_per_export, "too many NBD connections to the export; refused");
                    return Ok((socket, None));
                };
                let mut reply = Vec::with_capacity(134);
                reply.extend_from_slice(&disk.size.to_be_bytes());
                reply.extend_from_slice(&transmission_flags(disk).to_be_bytes());
                if !no_zeroes {
                    reply.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&reply).await?;
                return Ok((socket, Some((name, place))));
            }
            OPT_ABORT => {
                reply_option(w, option, REP_ACK, &[]).await?;
                return Ok((socket, None));
            }
            OPT_LIST => {
                for id in exports.list() {
                    let mut d = (id.len() as u32).to_be_bytes().to_vec();
                    d.extend_from_slice(id.as_bytes());
                    reply_option(w, option, REP_SERVER, &d).await?;
                }
                reply_option(w, option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                if data.len() < 6 {
                    reply_option(w, option, REP_ERR_INVALID, b"short request").await?;
                    continue;
                }
                let name_len = u32::from_be_bytes([data[0], data[1], data[2], data[3]]) as usize;
                if data.len() < 4 + name_len + 2 {
                    reply_option(w, option, REP_ERR_INVALID, b"short request").await?;
                    continue;
                }
                let name = String::from_utf8_lossy(&data[4..4 + name_len]).into_owned();
                let Some(disk) = exports.export(&name) else {
                    let msg = format!("no export {name:?}");
                    reply_option(w, option, REP_ERR_UNKNOWN, msg.as_bytes()).await?;
                    continue;
                };
                let place = if option == OPT_GO {
                    match server.attach(&name) {
                        Some(place) => Some(place),
                        None => {
                            let msg = format!(
                                "export {name:?} has {} clients attached, the most it takes",
                                limits.connections_per_export
                            );
                            tracing::warn!(export = %name, "{msg}; refused");
                            reply_option(w, option, REP_ERR_POLICY, msg.as_bytes()).await?;
                            continue;
                        }
                    }
                } else {
                    None
                };
                let mut export = INFO_EXPORT.to_be_bytes().to_vec();
                export.extend_from_slice(&disk.size.to_be_bytes());
                export.extend_from_slice(&transmission_flags(disk).to_be_bytes());
                reply_option(w, option, REP_INFO, &export).await?;
                let mut block = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                block.extend_from_slice(&512u32.to_be_bytes());
                block.extend_from_slice(&4096u32.to_be_bytes());
                block.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                reply_option(w, option, REP_INFO, &block).await?;
                reply_option(w, option, REP_ACK, &[]).await?;
                if let Some(place) = place {
                    return Ok((socket, Some((name, place))));
                }
            }
            OPT_STARTTLS if tls.is_some() => {
                reply_option(w, option, REP_ERR_INVALID, b"TLS is already on").await?
            }
            _ => reply_option(w, option, REP_ERR_UNSUP, b"not supported by this server").await?,
        }
    }
}

async fn connection<E: Exports>(
    socket: BoxConn,
    server: &Server<E>,
    tls: Option<&NbdTls>,
    handshaking: tokio::sync::OwnedSemaphorePermit,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let (exports, limits) = (server.exports.clone(), server.limits);
    let socket = BufReader::new(socket);
    let (socket, shaken) = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        h = tokio::time::timeout(limits.handshake_timeout, handshake(socket, server, tls)) => match h {
            Ok(h) => h?,
            Err(_) => return Err(std::io::Error::other("the client did not finish its handshake in time")),
        },
    };
    drop(handshaking);
    let Some((export, _attached)) = shaken else {
        return Ok(());
    };
    tracing::info!(disk = %export, "NBD client attached");
    let read_only = exports.export(&export).is_none_or(|e| e.read_only);
    // Requests a client sent right behind its last option may already sit
    // in the handshake's buffer: they are read first, not dropped.
    let early = std::io::Cursor::new(socket.buffer().to_vec());
    let (read_half, write_half) = tokio::io::split(socket.into_inner());
    let mut reader = BufReader::with_capacity(256 * 1024, early.chain(read_half));
    let writer = Arc::new(Mutex::new(write_half));
    // Cancelled when a request outlives `request_timeout`.
    let stalled = CancellationToken::new();
    let serve = serve_requests(
        &mut reader,
        &exports,
        &export,
        read_only,
        limits,
        &writer,
        &stalled,
        &shutdown,
    );
    tokio::select! {
        served = serve => served,
        _ = stalled.cancelled() => {
            // The client sees the connection end and fails what it sent.
            // A reply being written to a client that does not read holds
            // the writer: then the socket goes when that task ends.
            if let Ok(mut w) = tokio::time::timeout(Duration::from_secs(1), writer.lock()).await {
                let _ = w.shutdown().await;
            }
            Err(std::io::Error::other("a request outlived the request timeout; connection closed"))
        }
    }
}

/// Reads requests and hands each to a task of its own until the client
/// disconnects or `shutdown`.
#[allow(clippy::too_many_arguments)]
async fn serve_requests<E: Exports, R: AsyncRead + Unpin>(
    reader: &mut R,
    exports: &Arc<E>,
    export: &str,
    read_only: bool,
    limits: NbdLimits,
    writer: &Arc<Mutex<tokio::io::WriteHalf<BoxConn>>>,
    stalled: &CancellationToken,
    shutdown: &CancellationToken,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let bytes = Arc::new(Semaphore::new(limits.in_flight_bytes));
    loop {
        let magic = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = reader.read_u32() => m?,
        };
        if magic != REQUEST_MAGIC {
            return Err(std::io::Error::other("bad request magic"));
        }
        let flags = reader.read_u16().await?;
        let kind = reader.read_u16().await?;
        let cookie = reader.read_u64().await?;
        let offset = reader.read_u64().await?;
        let length = reader.read_u32().await?;
        if kind == CMD_DISC {
            // Finish what is in flight, then close.
            let _all = slots.acquire_many(IN_FLIGHT as u32).await;
            return Ok(());
        }
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| std::io::Error::other("closed"))?;
        // Room for the payload before it is read (a write's data) or made
        // (a read's reply): a client cannot make the server hold more.
        let carries = matches!(kind, CMD_WRITE | CMD_READ) && length <= MAX_REQUEST;
        let room = bytes
            .clone()
            .acquire_many_owned(if carries { length } else { 0 })
            .await
            .map_err(|_| std::io::Error::other("closed"))?;
        let mut payload = Vec::new();
        if kind == CMD_WRITE {
            if length > MAX_REQUEST {
                return Err(std::io::Error::other("write larger than the maximum"));
            }
            payload.resize(length as usize, 0);
            reader.read_exact(&mut payload).await?;
        }
        let exports = exports.clone();
        let writer = writer.clone();
        let export = export.to_string();
        let stalled = stalled.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let _room = room;
            let handled = async {
                if read_only && matches!(kind, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES) {
                    (EPERM, Vec::new())
                } else {
                    handle(
                        exports.as_ref(),
                        &export,
                        kind,
                        flags,
                        offset,
                        length,
                        payload,
                    )
                    .await
                }
            };
            let (error, data) = match limits.request_timeout {
                None => handled.await,
                Some(limit) => match tokio::time::timeout(limit, handled).await {
                    Ok(done) => done,
                    Err(_) => {
                        tracing::error!(
                            disk = %export, kind, offset, length, ?limit,
                            "an NBD request outlived the request timeout (a hung disk?); \
                             its connection is closed so the client fails it instead of waiting"
                        );
                        stalled.cancel();
                        return;
                    }
                },
            };
            let mut reply = Vec::with_capacity(16 + data.len());
            reply.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
            reply.extend_from_slice(&error.to_be_bytes());
            reply.extend_from_slice(&cookie.to_be_bytes());
            reply.extend_from_slice(&data);
            let mut w = writer.lock().await;
            if let Err(e) = w.write_all(&reply).await {
                tracing::debug!(error = %e, "NBD reply failed");
            }
        });
    }
}

/// Handles one request; returns (NBD error, read data).
async fn handle<E: Exports>(
    exports: &E,
    disk: &str,
    kind: u16,
    flags: u16,
    offset: u64,
    length: u32,
    payload: Vec<u8>,
) -> (u32, Vec<u8>) {
    let fua = flags & CMD_FLAG_FUA != 0;
    let result = match kind {
        CMD_READ => {
            if length > MAX_REQUEST {
                return (EINVAL, Vec::new());
            }
            return match exports.read(disk, offset, length).await {
                Ok(data) => (0, data),
                Err(e) => (e.errno(), Vec::new()),
            };
        }
        CMD_WRITE => exports.write(disk, offset, payload).await,
        CMD_TRIM => exports.zero(disk, offset, length as u64, true).await,
        CMD_WRITE_ZEROES => exports.zero(disk, offset, length as u64, false).await,
        CMD_FLUSH => exports.flush(disk).await,
        _ => return (ENOTSUP, Vec::new()),
    };
    let result = match (result, fua) {
        (Ok(()), true) => exports.flush(disk).await,
        (r, _) => r,
    };
    match result {
        Ok(()) => (0, Vec::new()),
        Err(e) => {
            tracing::debug!(disk, offset, length, error = ?e, "NBD request failed");
            (e.errno(), Vec::new())
        }
    }
}
