//! A small blocking NBD client (fixed newstyle, NBD_OPT_GO, simple replies)
//! for tests that need what qemu-io cannot give them: one connection held
//! across a fault, a refused handshake's reply, raw pipelined requests.
//! Run it on a blocking thread (`spawn_blocking`) next to an in-process
//! server.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

/// An attached export.
pub struct Nbd {
    socket: TcpStream,
    cookie: u64,
    /// The export's size.
    pub size: u64,
}

/// Why a handshake did not attach: the server's error reply (its type and
/// message), or the connection's end.
#[derive(Debug)]
pub enum Refused {
    Reply { kind: u32, message: String },
    Io(std::io::Error),
}

impl From<std::io::Error> for Refused {
    fn from(e: std::io::Error) -> Self {
        Refused::Io(e)
    }
}

fn u16_of(s: &mut TcpStream) -> std::io::Result<u16> {
    let mut b = [0u8; 2];
    s.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn u32_of(s: &mut TcpStream) -> std::io::Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn u64_of(s: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    s.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

impl Nbd {
    /// Connects to `addr` and attaches `export` with NBD_OPT_GO.
    pub fn go(addr: &str, export: &str) -> Result<Nbd, Refused> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        if u64_of(&mut s)? != NBDMAGIC || u64_of(&mut s)? != IHAVEOPT {
            return Err(Refused::Io(std::io::Error::other("not newstyle NBD")));
        }
        let _flags = u16_of(&mut s)?;
        // Fixed newstyle, no zeroes.
        s.write_all(&3u32.to_be_bytes())?;
        let mut data = (export.len() as u32).to_be_bytes().to_vec();
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = IHAVEOPT.to_be_bytes().to_vec();
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let mut size = 0;
        loop {
            if u64_of(&mut s)? != REPLY_MAGIC {
                return Err(Refused::Io(std::io::Error::other("bad option reply magic")));
            }
            let _option = u32_of(&mut s)?;
            let kind = u32_of(&mut s)?;
            let len = u32_of(&mut s)? as usize;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body)?;
            if kind == REP_ACK {
                return Ok(Nbd {
                    socket: s,
                    cookie: 0,
                    size,
                });
            }
            if kind & (1 << 31) != 0 {
                return Err(Refused::Reply {
                    kind,
                    message: String::from_utf8_lossy(&body).into_owned(),
                });
            }
            // NBD_REP_INFO: NBD_INFO_EXPORT carries the size.
            if body.len() >= 10 && body[0..2] == [0, 0] {
                size = u64::from_be_bytes(body[2..10].try_into().unwrap());
            }
        }
    }

    /// Sends one request (with `payload` for a write) without waiting for
    /// its reply; returns its cookie.
    pub fn send(
        &mut self,
        kind: u16,
        offset: u64,
        length: u32,
        payload: &[u8],
    ) -> std::io::Result<u64> {
        self.cookie += 1;
        let mut r = Vec::with_capacity(28);
        r.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r.extend_from_slice(&0u16.to_be_bytes());
        r.extend_from_slice(&kind.to_be_bytes());
        r.extend_from_slice(&self.cookie.to_be_bytes());
        r.extend_from_slice(&offset.to_be_bytes());
        r.extend_from_slice(&length.to_be_bytes());
        self.socket.write_all(&r)?;
        self.socket.write_all(payload)?;
        Ok(self.cookie)
    }

    /// Reads one simple reply: (cookie, errno), and `read_len` bytes of data
    /// when it answers a read without error.
    pub fn reply(&mut self, read_len: usize) -> std::io::Result<(u64, u32, Vec<u8>)> {
        if u32_of(&mut self.socket)? != SIMPLE_REPLY_MAGIC {
            return Err(std::io::Error::other("bad reply magic"));
        }
        let errno = u32_of(&mut self.socket)?;
        let cookie = u64_of(&mut self.socket)?;
        let mut data = Vec::new();
        if errno == 0 && read_len > 0 {
            data.resize(read_len, 0);
            self.socket.read_exact(&mut data)?;
        }
        Ok((cookie, errno, data))
    }

    /// Writes `data` at `offset`; the NBD errno (0 on success).
    pub fn write(&mut self, offset: u64, data: &[u8]) -> std::io::Result<u32> {
        self.send(CMD_WRITE, offset, data.len() as u32, data)?;
        Ok(self.reply(0)?.1)
    }

    /// Zeroes `length` bytes at `offset`; the NBD errno.
    pub fn write_zeroes(&mut self, offset: u64, length: u32) -> std::io::Result<u32> {
        self.send(CMD_WRITE_ZEROES, offset, length, &[])?;
        Ok(self.reply(0)?.1)
    }

    /// Reads `length` bytes at `offset`.
    pub fn read(&mut self, offset: u64, length: u32) -> std::io::Result<Vec<u8>> {
        self.send(CMD_READ, offset, length, &[])?;
        let (_, errno, data) = self.reply(length as usize)?;
        if errno != 0 {
            return Err(std::io::Error::other(format!("NBD read: errno {errno}")));
        }
        Ok(data)
    }

    /// The socket, for tests that push bytes at their own pace.
    pub fn socket(&mut self) -> &mut TcpStream {
        &mut self.socket
    }
}
