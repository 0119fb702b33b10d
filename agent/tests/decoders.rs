//! Property tests of what the agent decodes from the network and the disk:
//! the NBD server's handshake and requests (garbled clients against a real
//! export on loopback, and well-formed requests with any offset, length,
//! flags and command), and the state file. None may panic; the export
//! answers or closes, and goes on serving; a damaged state file is refused,
//! never read as another map. Bounded for CI; `PROPTEST_CASES=100000` runs
//! longer (docs/reliability.md).
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)] // tests may

use std::cell::Cell;
use std::sync::Arc;
use std::time::Duration;

use ferry_agent::capture::{Capture, SourceDisk};
use ferry_agent::nbd::{NbdLimits, MAX_REQUEST};
use ferry_agent::state::{Saved, StateError, StateFile};
use ferry_agent::stream::{Dirty, ResyncSet, Stream, StreamLimits};
use ferry_runtime::CancellationToken;
use ferry_testkit::props;
use proptest::collection::{btree_map, vec};
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------
// The state file.

fn dirty() -> impl Strategy<Value = Dirty> {
    btree_map(".{0,64}", vec(any::<u64>(), 0..20), 0..4).prop_map(|disks| Dirty { disks })
}

fn resync_set() -> impl Strategy<Value = ResyncSet> {
    // `close` never reaches the file (a restart closes every disk anyway).
    (dirty(), dirty()).prop_map(|(data, verify)| ResyncSet {
        data,
        verify,
        close: Default::default(),
    })
}

/// A state file saved clean with `set`, or marked running; its bytes.
fn saved(dir: &std::path::Path, set: Option<&ResyncSet>) -> (StateFile, Vec<u8>) {
    let state = StateFile::open(dir, "vm").unwrap();
    match set {
        Some(set) => state.save_clean(set).unwrap(),
        None => state.mark_running().unwrap(),
    }
    let bytes = std::fs::read(state.path()).unwrap();
    (state, bytes)
}

/// A body as the state file lays it out, from parts that may lie about
/// their lengths.
#[derive(Debug, Clone)]
enum BodyPart {
    U32(u32),
    U16(u16),
    Bytes(Vec<u8>),
}

fn body() -> impl Strategy<Value = Vec<u8>> {
    vec(
        prop_oneof![
            (0u32..4).prop_map(BodyPart::U32),
            any::<u32>().prop_map(BodyPart::U32),
            (0u16..8).prop_map(BodyPart::U16),
            any::<u16>().prop_map(BodyPart::U16),
            vec(any::<u8>(), 0..24).prop_map(BodyPart::Bytes),
        ],
        0..12,
    )
    .prop_map(|parts| {
        let mut out = Vec::new();
        for p in parts {
            match p {
                BodyPart::U32(v) => out.extend_from_slice(&v.to_le_bytes()),
                BodyPart::U16(v) => out.extend_from_slice(&v.to_le_bytes()),
                BodyPart::Bytes(b) => out.extend_from_slice(&b),
            }
        }
        out
    })
}

// Each case writes and fsyncs a file: 256 cases keep them fast.
proptest! {
    #![proptest_config(props::config(256))]

    #[test]
    fn a_state_file_of_arbitrary_bytes_is_refused(
        magic in any::<bool>(),
        bytes in vec(any::<u8>(), 0..300),
    ) {
        let dir = props::tempdir();
        let state = StateFile::open(dir.path(), "vm").unwrap();
        let mut file = if magic { b"FERRYDM3".to_vec() } else { Vec::new() };
        file.extend_from_slice(&bytes);
        std::fs::write(state.path(), &file).unwrap();
        let loaded = state.load();
        prop_assert!(matches!(loaded, Err(StateError::Damaged { .. })), "{:?}", loaded);
    }

    /// A body that passes the checksum but lies about counts and lengths
    /// (as a bug, not damage, could write): decoded or refused, no panic.
    #[test]
    fn a_checksummed_body_of_arbitrary_parts_never_panics(body in body(), clean in any::<bool>()) {
        let dir = props::tempdir();
        let (state, mut file) = saved(dir.path(), None);
        let flags = u32::from(clean);
        let crc = crc32c::crc32c_append(crc32c::crc32c(&flags.to_le_bytes()), &body);
        file.truncate(8);
        file.extend_from_slice(&flags.to_le_bytes());
        file.extend_from_slice(&crc.to_le_bytes());
        file.extend_from_slice(&(body.len() as u64).to_le_bytes());
        file.extend_from_slice(&body);
        std::fs::write(state.path(), &file).unwrap();
        match state.load() {
            Ok(Some(Saved::Unclean)) => prop_assert!(!clean),
            Ok(Some(Saved::Clean(_))) | Err(StateError::Damaged { .. }) => prop_assert!(clean),
            other => prop_assert!(false, "{:?}", other),
        }
    }

    #[test]
    fn a_saved_map_round_trips(set in resync_set()) {
        let dir = props::tempdir();
        let (state, _) = saved(dir.path(), Some(&set));
        prop_assert_eq!(state.load().unwrap(), Some(Saved::Clean(set)));
    }

    /// One flipped byte anywhere (flags included), a cut, or bytes added:
    /// refused, so the agent falls back to a full checksum resync; never
    /// another map, and never a crashed run's file read as a clean one.
    #[test]
    fn a_damaged_state_file_is_refused_never_read_as_another_map(
        set in resync_set(),
        running in any::<bool>(),
        at in any::<usize>(),
        mask in 1u8..,
        cut in any::<usize>(),
        extra in vec(any::<u8>(), 1..16),
    ) {
        let dir = props::tempdir();
        let (state, bytes) = saved(dir.path(), (!running).then_some(&set));

        let mut flipped = bytes.clone();
        let at = props::flip(&mut flipped, at, mask);
        std::fs::write(state.path(), &flipped).unwrap();
        let loaded = state.load();
        prop_assert!(matches!(loaded, Err(StateError::Damaged { .. })), "byte {} flipped: {:?}", at, loaded);

        std::fs::write(state.path(), &bytes[..cut % bytes.len()]).unwrap();
        let loaded = state.load();
        prop_assert!(matches!(loaded, Err(StateError::Damaged { .. })), "cut: {:?}", loaded);

        let mut longer = bytes.clone();
        longer.extend_from_slice(&extra);
        std::fs::write(state.path(), &longer).unwrap();
        let loaded = state.load();
        prop_assert!(matches!(loaded, Err(StateError::Damaged { .. })), "longer: {:?}", loaded);
    }
}

/// Regression: the flags were outside the checksum, so one flipped bit
/// turned a crashed run's file ("running": its buffered writes are gone)
/// into a clean, empty map, and the agent resynced nothing.
#[test]
fn a_running_file_with_its_clean_bit_flipped_is_refused() {
    let dir = props::tempdir();
    let (state, mut bytes) = saved(dir.path(), None);
    bytes[8] ^= 1;
    std::fs::write(state.path(), &bytes).unwrap();
    assert!(matches!(state.load(), Err(StateError::Damaged { .. })));
}

// ---------------------------------------------------------------------------
// The NBD export.

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;
const ENOTSUP: u32 = 95;

/// The export's size: not a whole number of 64 KiB chunks.
const SIZE: u64 = (1 << 20) + 1536;
/// How long a garbled client may wait for the export to answer and close.
const PATIENCE: Duration = Duration::from_secs(10);

/// One disk "os" exported on loopback, its stream going nowhere (records
/// overflow into tracking, so memory stays bounded).
struct Export {
    _dir: tempfile::TempDir,
    addr: String,
    stop: CancellationToken,
}

impl Export {
    async fn start() -> Export {
        let dir = props::tempdir();
        let stream = Stream::new(
            1,
            StreamLimits {
                buffer_bytes: 1 << 20,
                ..StreamLimits::default()
            },
        );
        let disk = SourceDisk::open("os", &dir.path().join("os.raw"), SIZE).unwrap();
        let capture = Arc::new(Capture::new(vec![disk], stream));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let stop = CancellationToken::new();
        let limits = NbdLimits {
            handshake_timeout: PATIENCE / 2,
            ..NbdLimits::default()
        };
        tokio::spawn(ferry_agent::nbd::serve_with(
            listener,
            capture,
            limits,
            stop.clone(),
        ));
        Export {
            _dir: dir,
            addr,
            stop,
        }
    }
}

impl Drop for Export {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A runner that persists failures beside this file, as `proptest!` does.
fn runner(cases: u32) -> TestRunner {
    let mut config = props::config(cases);
    config.source_file = Some(file!());
    TestRunner::new(config)
}

/// An attached, well-formed client.
struct Client {
    s: TcpStream,
    cookie: u64,
}

fn io(e: std::io::Error) -> TestCaseError {
    TestCaseError::fail(format!("I/O: {e}"))
}

impl Client {
    /// Connects and attaches "os" with NBD_OPT_GO (no zeroes, fixed newstyle).
    async fn go(addr: &str) -> std::io::Result<Client> {
        let mut s = TcpStream::connect(addr).await?;
        s.set_nodelay(true)?;
        if s.read_u64().await? != NBDMAGIC || s.read_u64().await? != IHAVEOPT {
            return Err(std::io::Error::other("not newstyle"));
        }
        s.read_u16().await?;
        s.write_all(&3u32.to_be_bytes()).await?;
        s.write_all(&option(OPT_GO, &go_data(b"os", &[]))).await?;
        loop {
            if s.read_u64().await? != REPLY_MAGIC {
                return Err(std::io::Error::other("bad option reply magic"));
            }
            let _option = s.read_u32().await?;
            let kind = s.read_u32().await?;
            let len = s.read_u32().await?;
            let mut body = vec![0u8; len as usize];
            s.read_exact(&mut body).await?;
            if kind == REP_ACK {
                return Ok(Client { s, cookie: 0 });
            }
            if kind & (1 << 31) != 0 {
                return Err(std::io::Error::other(format!("refused: {kind:#x}")));
            }
        }
    }

    /// One request and its simple reply: (errno, data of a read).
    async fn request(
        &mut self,
        flags: u16,
        kind: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> std::io::Result<(u32, Vec<u8>)> {
        self.cookie += 1;
        self.s
            .write_all(&request(flags, kind, self.cookie, offset, length, payload))
            .await?;
        if self.s.read_u32().await? != SIMPLE_REPLY_MAGIC {
            return Err(std::io::Error::other("bad reply magic"));
        }
        let errno = self.s.read_u32().await?;
        if self.s.read_u64().await? != self.cookie {
            return Err(std::io::Error::other("a reply to another request"));
        }
        let mut data = Vec::new();
        if errno == 0 && kind == CMD_READ {
            data.resize(length as usize, 0);
            self.s.read_exact(&mut data).await?;
        }
        Ok((errno, data))
    }

    /// The whole disk, read in pieces.
    async fn read_all(&mut self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        while (out.len() as u64) < SIZE {
            let n = (SIZE - out.len() as u64).min(256 * 1024) as u32;
            let (errno, data) = self.request(0, CMD_READ, out.len() as u64, n, &[]).await?;
            if errno != 0 {
                return Err(std::io::Error::other(format!("read: errno {errno}")));
            }
            out.extend_from_slice(&data);
        }
        Ok(out)
    }

    /// Disconnects and waits for the export to close.
    async fn disconnect(mut self) -> std::io::Result<()> {
        self.s
            .write_all(&request(0, CMD_DISC, 0, 0, 0, &[]))
            .await?;
        let mut rest = Vec::new();
        tokio::time::timeout(PATIENCE, self.s.read_to_end(&mut rest))
            .await
            .map_err(|_| std::io::Error::other("the export did not close after DISC"))??;
        Ok(())
    }
}

fn option(option: u32, data: &[u8]) -> Vec<u8> {
    let mut out = IHAVEOPT.to_be_bytes().to_vec();
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    out
}

fn go_data(name: &[u8], infos: &[u16]) -> Vec<u8> {
    let mut out = (name.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(name);
    out.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        out.extend_from_slice(&i.to_be_bytes());
    }
    out
}

fn request(
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut out = REQUEST_MAGIC.to_be_bytes().to_vec();
    out.extend_from_slice(&flags.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
    out.extend_from_slice(&offset.to_be_bytes());
    out.extend_from_slice(&length.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A well-formed client still attaches, writes, reads back and leaves.
async fn still_serves(addr: &str, pattern: u8) -> Result<(), TestCaseError> {
    let mut c = Client::go(addr).await.map_err(io)?;
    let data = vec![pattern; 4096];
    let (errno, _) = c
        .request(0, CMD_WRITE, 8192, 4096, &data)
        .await
        .map_err(io)?;
    prop_assert_eq!(errno, 0);
    let (errno, back) = c.request(0, CMD_READ, 8192, 4096, &[]).await.map_err(io)?;
    prop_assert_eq!(errno, 0);
    prop_assert!(back == data, "read back other bytes");
    c.disconnect().await.map_err(io)
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        (0..SIZE / 512).prop_map(|s| s * 512),
        0..SIZE,
        (SIZE - 1024)..(SIZE + 1024),
        Just(u64::MAX),
        (u64::MAX - 1024)..=u64::MAX,
        any::<u64>(),
    ]
}

fn length() -> impl Strategy<Value = u32> {
    prop_oneof![
        Just(0u32),
        Just(1),
        Just(511),
        Just(512),
        Just(65536),
        1u32..140_000,
        Just(SIZE as u32),
        Just(MAX_REQUEST),
        Just(MAX_REQUEST + 1),
        Just(u32::MAX),
        any::<u32>(),
    ]
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(b"os".to_vec()),
        Just(Vec::new()),
        Just(b"nope".to_vec()),
        vec(any::<u8>(), 0..12),
    ]
}

/// One thing a garbled client sends.
#[derive(Debug, Clone)]
enum Step {
    /// An option, its declared length right or a lie.
    Option {
        option: u32,
        data: Vec<u8>,
        declared: Option<u32>,
    },
    /// A request, its payload as long as declared for a write, or not.
    Request {
        flags: u16,
        kind: u16,
        offset: u64,
        length: u32,
        payload: Vec<u8>,
    },
    Junk(Vec<u8>),
}

fn option_step() -> impl Strategy<Value = Step> {
    let code = prop_oneof![
        1 => Just(OPT_EXPORT_NAME),
        1 => Just(2u32),
        2 => Just(3u32),
        2 => Just(6u32),
        2 => Just(OPT_GO),
        2 => 0u32..16,
        1 => any::<u32>(),
    ];
    let data = prop_oneof![
        (name(), vec(any::<u16>(), 0..4)).prop_map(|(n, i)| go_data(&n, &i)),
        // An INFO/GO whose name length is a lie.
        (any::<u32>(), name()).prop_map(|(len, n)| {
            let mut d = len.to_be_bytes().to_vec();
            d.extend_from_slice(&n);
            d
        }),
        name(),
        vec(any::<u8>(), 0..40),
    ];
    let declared = prop_oneof![
        8 => Just(None),
        1 => any::<u32>().prop_map(Some),
        1 => (0u32..48).prop_map(Some),
        1 => Just(Some(64 * 1024 + 1)),
    ];
    (code, data, declared).prop_map(|(option, data, declared)| Step::Option {
        option,
        data,
        declared,
    })
}

fn request_step() -> impl Strategy<Value = Step> {
    let kind = prop_oneof![0u16..8, any::<u16>()];
    (
        any::<u16>(),
        kind,
        offset(),
        length(),
        vec(any::<u8>(), 0..600),
    )
        .prop_map(|(flags, kind, offset, length, payload)| Step::Request {
            flags,
            kind,
            offset,
            length,
            payload,
        })
}

/// How the bytes are garbled after they are laid out.
#[derive(Debug, Clone)]
enum Garble {
    None,
    Flip(Vec<(usize, u8)>),
    Cut(usize),
}

fn garbled_client() -> impl Strategy<Value = (u32, Vec<Step>, Vec<Step>, Garble)> {
    let flags = prop_oneof![Just(3u32), Just(1u32), Just(0u32), any::<u32>()];
    // Weighted so that many clients get through the handshake with their
    // lies intact, and many garbled ones do not.
    let options = vec(
        prop_oneof![8 => option_step(), 1 => vec(any::<u8>(), 0..24).prop_map(Step::Junk)],
        0..3,
    );
    let requests = vec(
        prop_oneof![8 => request_step(), 1 => vec(any::<u8>(), 0..24).prop_map(Step::Junk)],
        0..8,
    );
    let garble = prop_oneof![
        3 => Just(Garble::None),
        2 => vec((any::<usize>(), 1u8..), 1..4).prop_map(Garble::Flip),
        1 => any::<usize>().prop_map(Garble::Cut),
    ];
    (flags, options, requests, garble)
}

fn lay_out(flags: u32, options: &[Step], requests: &[Step], garble: &Garble) -> Vec<u8> {
    let mut out = flags.to_be_bytes().to_vec();
    let mut cookie = 0;
    // Attach between options and requests, so that requests reach the
    // transmission phase (unless an option attached already).
    let attach = Step::Option {
        option: OPT_GO,
        data: go_data(b"os", &[]),
        declared: None,
    };
    let steps = options
        .iter()
        .chain(std::iter::once(&attach))
        .chain(requests);
    for step in steps {
        match step {
            Step::Option {
                option: code,
                data,
                declared,
            } => {
                let mut o = option(*code, data);
                if let Some(len) = declared {
                    o[12..16].copy_from_slice(&len.to_be_bytes());
                }
                out.extend_from_slice(&o);
            }
            Step::Request {
                flags,
                kind,
                offset,
                length,
                payload,
            } => {
                cookie += 1;
                out.extend_from_slice(&request(*flags, *kind, cookie, *offset, *length, payload));
            }
            Step::Junk(j) => out.extend_from_slice(j),
        }
    }
    match garble {
        Garble::None => {}
        Garble::Flip(flips) => {
            for (at, mask) in flips {
                props::flip(&mut out, *at, *mask);
            }
        }
        Garble::Cut(at) => out.truncate(at % (out.len() + 1)),
    }
    out
}

/// Sends `bytes` as a client would, then its end of stream, and reads
/// whatever the export says until it closes; Err if it does not within
/// PATIENCE.
async fn garble(addr: &str, bytes: &[u8]) -> std::io::Result<Vec<u8>> {
    let s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.into_split();
    let reader = tokio::spawn(async move {
        let mut answer = Vec::new();
        let read = tokio::time::timeout(PATIENCE, r.read_to_end(&mut answer)).await;
        match read {
            Ok(Ok(_)) => Ok(answer),
            // Reset by the export: closed too.
            Ok(Err(_)) => Ok(answer),
            Err(_) => Err(std::io::Error::other(
                "the export neither answered nor closed",
            )),
        }
    });
    // The export may close before it has read everything: not a failure.
    let _ = w.write_all(bytes).await;
    let _ = w.shutdown().await;
    reader.await.map_err(std::io::Error::other)?
}

/// Garbled clients (options and requests of any shape, their lengths
/// lying, bytes flipped, cut anywhere) never panic the export, which closes
/// each of them in time and serves a well-formed client after each.
#[test]
fn garbled_nbd_clients_never_panic_the_export_and_it_goes_on_serving() {
    let rt = runtime();
    let export = rt.block_on(Export::start());
    let panics = props::panics();
    let pattern = Cell::new(0u8);
    // How many clients got option replies, and request replies: the
    // generator must reach both phases.
    let (options_answered, requests_answered) = (Cell::new(0), Cell::new(0));
    let result = runner(256).run(&garbled_client(), |(flags, options, requests, g)| {
        let bytes = lay_out(flags, &options, &requests, &g);
        pattern.set(pattern.get().wrapping_add(1));
        rt.block_on(async {
            let answer = garble(&export.addr, &bytes).await.map_err(io)?;
            let has = |magic: &[u8]| answer.windows(magic.len()).any(|w| w == magic);
            if has(&REPLY_MAGIC.to_be_bytes()) {
                options_answered.set(options_answered.get() + 1);
            }
            if has(&SIMPLE_REPLY_MAGIC.to_be_bytes()) {
                requests_answered.set(requests_answered.get() + 1);
            }
            prop_assert_eq!(props::panics(), panics, "the export panicked");
            still_serves(&export.addr, pattern.get()).await
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    println!(
        "option replies in {} cases, request replies in {}",
        options_answered.get(),
        requests_answered.get()
    );
    assert!(options_answered.get() > 64 && requests_answered.get() > 64);
}

/// What one well-formed request should get.
fn expected_errno(kind: u16, offset: u64, length: u32) -> Option<u32> {
    let in_range = offset
        .checked_add(u64::from(length))
        .is_some_and(|end| end <= SIZE);
    match kind {
        CMD_FLUSH => Some(0),
        CMD_READ if length > MAX_REQUEST => None,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES if in_range => Some(0),
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => None,
        _ => Some(ENOTSUP),
    }
}

#[derive(Debug, Clone)]
struct Req {
    flags: u16,
    kind: u16,
    offset: u64,
    length: u32,
    seed: u8,
}

fn well_formed_request() -> impl Strategy<Value = Req> {
    let kind = prop_oneof![
        3 => Just(CMD_READ),
        3 => Just(CMD_WRITE),
        2 => Just(CMD_TRIM),
        2 => Just(CMD_WRITE_ZEROES),
        1 => Just(CMD_FLUSH),
        1 => prop_oneof![Just(5u16), 7u16..64, any::<u16>()]
            .prop_filter("not DISC", |k| *k != CMD_DISC),
    ];
    (any::<u16>(), kind, offset(), length(), any::<u8>()).prop_map(
        |(flags, kind, offset, length, seed)| Req {
            flags,
            kind,
            // A write's payload is sent whole: keep it small.
            length: if kind == CMD_WRITE {
                length % 140_000
            } else {
                length
            },
            offset,
            seed,
        },
    )
}

/// Well-formed requests with any flags, command, offset and length: each
/// is answered (an error exactly when it is out of range or unknown), and
/// the disk reads back as a shadow copy says it must.
#[test]
fn nbd_requests_out_of_range_are_refused_and_the_rest_served_exactly() {
    let rt = runtime();
    let export = rt.block_on(Export::start());
    let panics = props::panics();
    let result = runner(256).run(&vec(well_formed_request(), 1..12), |reqs| {
        rt.block_on(async {
            let mut c = Client::go(&export.addr).await.map_err(io)?;
            let mut shadow = c.read_all().await.map_err(io)?;
            for r in &reqs {
                let payload: Vec<u8> = if r.kind == CMD_WRITE {
                    (0..r.length)
                        .map(|i| (i as u8).wrapping_mul(31) ^ r.seed)
                        .collect()
                } else {
                    Vec::new()
                };
                let (errno, data) = c
                    .request(r.flags, r.kind, r.offset, r.length, &payload)
                    .await
                    .map_err(io)?;
                match expected_errno(r.kind, r.offset, r.length) {
                    Some(want) => prop_assert_eq!(errno, want, "{:?}", r),
                    None => prop_assert!(errno != 0, "{:?} succeeded", r),
                }
                if errno != 0 {
                    continue;
                }
                // Succeeded, so in range (FLUSH aside, which has none).
                let range = || r.offset as usize..r.offset as usize + r.length as usize;
                match r.kind {
                    CMD_READ => prop_assert!(data == shadow[range()], "{:?} read other bytes", r),
                    CMD_WRITE => shadow[range()].copy_from_slice(&payload),
                    CMD_TRIM | CMD_WRITE_ZEROES => shadow[range()].fill(0),
                    _ => {}
                }
            }
            let disk = c.read_all().await.map_err(io)?;
            prop_assert!(disk == shadow, "the disk is not what was written");
            c.disconnect().await.map_err(io)?;
            prop_assert_eq!(props::panics(), panics, "the export panicked");
            Ok(())
        })
    });
    if let Err(e) = result {
        panic!("{e}");
    }
}

/// Regression the garbled clients found: requests sent right behind
/// NBD_OPT_GO, before its reply, sat in the handshake's read buffer and
/// were dropped when transmission began; the client waited for replies
/// that never came.
#[test]
fn a_request_sent_right_behind_the_handshake_is_answered() {
    let rt = runtime();
    let export = rt.block_on(Export::start());
    let write = Step::Request {
        flags: 0,
        kind: CMD_WRITE,
        offset: 512,
        length: 512,
        payload: vec![7; 512],
    };
    let bytes = lay_out(3, &[], &[write], &Garble::None);
    let answer = rt.block_on(garble(&export.addr, &bytes)).unwrap();
    let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
    reply.extend_from_slice(&0u32.to_be_bytes());
    reply.extend_from_slice(&1u64.to_be_bytes());
    assert!(answer.ends_with(&reply), "{} bytes answered", answer.len());
    rt.block_on(async {
        let mut c = Client::go(&export.addr).await.unwrap();
        let (errno, data) = c.request(0, CMD_READ, 512, 512, &[]).await.unwrap();
        assert_eq!((errno, data), (0, vec![7; 512]));
    });
}
