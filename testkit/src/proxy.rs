//! A TCP proxy that injects network faults between two parts of Ferry: put
//! it in front of a service, hand its URL to the client, and cut, stall or
//! slow the link from the test while both sides run on.
//!
//! - [`FaultProxy::cut`]: every live connection is reset (RST, as a dead
//!   link or a restarted peer looks to both ends) and new ones are reset at
//!   once, until [`FaultProxy::restore`].
//! - [`FaultProxy::blackhole`]: connections stay open but nothing moves in
//!   either direction (a stalled network: the senders' socket buffers fill
//!   and they block); new connections are accepted and held. On restore
//!   the held bytes flow on, as after a partition that healed before TCP
//!   gave up.
//! - [`FaultProxy::delay`]: each chunk read is held that long before it is
//!   forwarded (one chunk at a time per direction, so it also bounds
//!   throughput to a buffer per delay).
//!
//! Each direction of a connection holds at most one buffer of
//! [`BUFFER`] bytes; an I/O error ends that connection only.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Bytes one direction of a connection reads at a time (and holds).
pub const BUFFER: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Forward,
    Blackhole,
    Cut,
}

#[derive(Default)]
struct Counters {
    up: AtomicU64,
    down: AtomicU64,
    delay_nanos: AtomicU64,
    live: AtomicU64,
    accepted: AtomicU64,
}

/// A fault-injecting TCP proxy on `127.0.0.1`, forwarding to one target.
/// Dropping it ends every connection.
pub struct FaultProxy {
    addr: SocketAddr,
    target: SocketAddr,
    mode: watch::Sender<Mode>,
    counters: Arc<Counters>,
    accept: JoinHandle<()>,
}

impl FaultProxy {
    /// Listens on `127.0.0.1:0` and forwards every connection to `target`.
    pub async fn start(target: SocketAddr) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fault proxy");
        let addr = listener.local_addr().expect("the fault proxy's address");
        let (mode, _) = watch::channel(Mode::Forward);
        let counters = Arc::new(Counters::default());
        let accept = tokio::spawn(accept_loop(
            listener,
            target,
            mode.clone(),
            counters.clone(),
        ));
        FaultProxy {
            addr,
            target,
            mode,
            counters,
            accept,
        }
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`, for a gRPC client.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Where it forwards to.
    pub fn target(&self) -> SocketAddr {
        self.target
    }

    /// Resets every live connection and every new one until restored.
    pub fn cut(&self) {
        self.mode.send_replace(Mode::Cut);
    }

    /// Holds every connection open and forwards nothing until restored.
    pub fn blackhole(&self) {
        self.mode.send_replace(Mode::Blackhole);
    }

    /// Forwards normally again (the delay, if any, stays).
    pub fn restore(&self) {
        self.mode.send_replace(Mode::Forward);
    }

    /// Holds each forwarded chunk `delay` (zero: none).
    pub fn delay(&self, delay: Duration) {
        let nanos = u64::try_from(delay.as_nanos()).unwrap_or(u64::MAX);
        self.counters.delay_nanos.store(nanos, Ordering::Relaxed);
    }

    /// Bytes forwarded from clients to the target so far.
    pub fn bytes_up(&self) -> u64 {
        self.counters.up.load(Ordering::Relaxed)
    }

    /// Bytes forwarded from the target to clients so far.
    pub fn bytes_down(&self) -> u64 {
        self.counters.down.load(Ordering::Relaxed)
    }

    /// Connections open through the proxy now.
    pub fn connections(&self) -> u64 {
        self.counters.live.load(Ordering::Relaxed)
    }

    /// Connections accepted so far (including those reset by a cut).
    pub fn accepted(&self) -> u64 {
        self.counters.accepted.load(Ordering::Relaxed)
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        // Every connection's task ends at a cut.
        self.mode.send_replace(Mode::Cut);
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: SocketAddr,
    mode: watch::Sender<Mode>,
    counters: Arc<Counters>,
) {
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(_) => {
                // Out of descriptors, say: try again shortly rather than spin.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        counters.accepted.fetch_add(1, Ordering::Relaxed);
        if *mode.borrow() == Mode::Cut {
            reset(&client);
            continue;
        }
        let (mode, counters) = (mode.subscribe(), counters.clone());
        tokio::spawn(async move {
            counters.live.fetch_add(1, Ordering::Relaxed);
            connection(client, target, mode, &counters).await;
            counters.live.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// Drops `socket` with an RST rather than a FIN.
fn reset(socket: &TcpStream) {
    let _ = socket.set_zero_linger();
}

/// Why forwarding in one direction ended early.
enum Ended {
    /// A cut, or the proxy dropped.
    Cut,
    /// An I/O error on either socket.
    Io,
}

impl From<std::io::Error> for Ended {
    fn from(_: std::io::Error) -> Self {
        Ended::Io
    }
}

async fn connection(
    mut client: TcpStream,
    target: SocketAddr,
    mut mode: watch::Receiver<Mode>,
    counters: &Counters,
) {
    // A stalled network does not reach the target either.
    if forwarding(&mut mode).await.is_err() {
        reset(&client);
        return;
    }
    let mut server = tokio::select! {
        connected = TcpStream::connect(target) => match connected {
            Ok(server) => server,
            Err(_) => {
                reset(&client);
                return;
            }
        },
        _ = until_cut(mode.clone()) => {
            reset(&client);
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let ended = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let up = pump(
            &mut client_read,
            &mut server_write,
            mode.clone(),
            counters,
            &counters.up,
        );
        let down = pump(
            &mut server_read,
            &mut client_write,
            mode,
            counters,
            &counters.down,
        );
        tokio::pin!(up, down);
        // A half-close travels on and the other direction goes on; a cut
        // or an error ends both.
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let result = tokio::select! {
                r = &mut up, if !up_done => { up_done = true; r }
                r = &mut down, if !down_done => { down_done = true; r }
            };
            if let Err(why) = result {
                break Some(why);
            }
            if up_done && down_done {
                break None;
            }
        }
    };
    if ended.is_some() {
        reset(&client);
        reset(&server);
    }
}

/// Waits while the link is blackholed; Err once it is cut (or the proxy
/// is gone).
async fn forwarding(mode: &mut watch::Receiver<Mode>) -> Result<(), Ended> {
    match mode.wait_for(|m| *m != Mode::Blackhole).await {
        Ok(m) if *m == Mode::Forward => Ok(()),
        _ => Err(Ended::Cut),
    }
}

/// Returns once the link is cut (or the proxy is gone).
async fn until_cut(mut mode: watch::Receiver<Mode>) {
    let _ = mode.wait_for(|m| *m == Mode::Cut).await;
}

/// Forwards one direction until EOF (passed on as a half-close), a cut or
/// an error. Reads and writes stop while blackholed; `read` and `write`
/// are cancel-safe, so a change of mode never loses bytes.
async fn pump(
    from: &mut tokio::net::tcp::ReadHalf<'_>,
    to: &mut tokio::net::tcp::WriteHalf<'_>,
    mut mode: watch::Receiver<Mode>,
    counters: &Counters,
    forwarded: &AtomicU64,
) -> Result<(), Ended> {
    let mut buf = vec![0u8; BUFFER];
    loop {
        let n = loop {
            forwarding(&mut mode).await?;
            tokio::select! {
                read = from.read(&mut buf) => break read?,
                changed = mode.changed() => changed.map_err(|_| Ended::Cut)?,
            }
        };
        if n == 0 {
            to.shutdown().await?;
            return Ok(());
        }
        let delay = Duration::from_nanos(counters.delay_nanos.load(Ordering::Relaxed));
        if !delay.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = until_cut(mode.clone()) => return Err(Ended::Cut),
            }
        }
        let mut at = 0;
        while at < n {
            forwarding(&mut mode).await?;
            tokio::select! {
                written = to.write(&buf[at..n]) => {
                    let written = written?;
                    if written == 0 {
                        return Err(Ended::Io);
                    }
                    at += written;
                    forwarded.fetch_add(written as u64, Ordering::Relaxed);
                }
                changed = mode.changed() => changed.map_err(|_| Ended::Cut)?,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Echoes every connection back until EOF.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut r, mut w) = socket.split();
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                });
            }
        });
        addr
    }

    async fn round_trip(socket: &mut TcpStream, message: &[u8]) -> Vec<u8> {
        socket.write_all(message).await.unwrap();
        let mut back = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(10), socket.read_exact(&mut back))
            .await
            .expect("the echo within 10 s")
            .unwrap();
        back
    }

    /// Whether a read on `socket` ends (EOF or reset) within `within`.
    async fn ends_within(socket: &mut TcpStream, within: Duration) -> bool {
        let mut b = [0u8; 1];
        matches!(
            tokio::time::timeout(within, socket.read(&mut b)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn forwards_both_ways_and_counts_the_bytes() {
        let proxy = FaultProxy::start(echo_server().await).await;
        assert_eq!(proxy.url(), format!("http://{}", proxy.addr()));
        let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
        // More than one buffer, so it takes several chunks each way.
        let message: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(round_trip(&mut socket, &message).await, message);
        assert_eq!(proxy.bytes_up(), message.len() as u64);
        assert_eq!(proxy.bytes_down(), message.len() as u64);
        assert_eq!(proxy.connections(), 1);
        // A half-close reaches the server, whose close comes back.
        socket.shutdown().await.unwrap();
        assert!(ends_within(&mut socket, Duration::from_secs(10)).await);
        crate::wait_for("the connection to end", Duration::from_secs(10), || async {
            (proxy.connections() == 0).then_some(())
        })
        .await;
    }

    #[tokio::test]
    async fn a_cut_resets_live_connections_and_refuses_new_ones_until_restored() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut live, b"before").await, b"before");
        proxy.cut();
        let mut b = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(10), live.read(&mut b))
            .await
            .expect("the cut ends the connection within 10 s");
        assert!(
            matches!(&read, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "reset, not closed: {read:?}"
        );
        // A new connection is accepted by the kernel, then reset at once;
        // nothing reaches the target.
        let mut refused = TcpStream::connect(proxy.addr()).await.unwrap();
        let _ = refused.write_all(b"lost").await;
        assert!(ends_within(&mut refused, Duration::from_secs(10)).await);
        let up = proxy.bytes_up();
        assert_eq!(up, b"before".len() as u64);

        proxy.restore();
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut again, b"after").await, b"after");
        assert_eq!(proxy.bytes_up(), up + b"after".len() as u64);
    }

    #[tokio::test]
    async fn a_blackhole_holds_connections_and_forwards_nothing_until_restored() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut live, b"before").await, b"before");
        proxy.blackhole();
        live.write_all(b"held").await.unwrap();
        // A new connection is held too, its bytes with it.
        let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
        held.write_all(b"held too").await.unwrap();
        // Nothing comes back and the connections stay open: a stall has no
        // event to wait for, so this one waits a fixed time.
        let mut b = [0u8; 1];
        assert!(
            tokio::time::timeout(Duration::from_millis(300), live.read(&mut b))
                .await
                .is_err(),
            "nothing comes back through a blackhole"
        );
        assert_eq!(proxy.bytes_up(), b"before".len() as u64);
        assert_eq!(proxy.bytes_down(), b"before".len() as u64);

        // Healed, the held bytes flow on, in order, on both connections.
        proxy.restore();
        let mut back = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(10), live.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&back, b"held");
        let mut back = [0u8; 8];
        tokio::time::timeout(Duration::from_secs(10), held.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&back, b"held too");
        assert_eq!(round_trip(&mut live, b"after").await, b"after");
        assert_eq!(proxy.bytes_up(), (6 + 4 + 8 + 5) as u64);
        assert_eq!(proxy.bytes_down(), proxy.bytes_up());
    }

    #[tokio::test]
    async fn a_delay_holds_each_chunk() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut socket = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.delay(Duration::from_millis(200));
        let start = std::time::Instant::now();
        assert_eq!(round_trip(&mut socket, b"slow").await, b"slow");
        assert!(
            start.elapsed() >= Duration::from_millis(400),
            "held each way: {:?}",
            start.elapsed()
        );
        proxy.delay(Duration::ZERO);
        assert_eq!(round_trip(&mut socket, b"fast").await, b"fast");
    }

    #[tokio::test]
    async fn a_cut_during_a_blackhole_resets_the_held_connections() {
        let proxy = FaultProxy::start(echo_server().await).await;
        let mut live = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(round_trip(&mut live, b"x").await, b"x");
        proxy.blackhole();
        let mut held = TcpStream::connect(proxy.addr()).await.unwrap();
        proxy.cut();
        assert!(ends_within(&mut live, Duration::from_secs(10)).await);
        assert!(ends_within(&mut held, Duration::from_secs(10)).await);
        crate::wait_for("no live connection", Duration::from_secs(10), || async {
            (proxy.connections() == 0).then_some(())
        })
        .await;
    }
}
