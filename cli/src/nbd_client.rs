//! A minimal NBD client (fixed newstyle, NBD_OPT_EXPORT_NAME, WRITE, FLUSH,
//! DISC): how `ferry demo` writes to the agent's export like a VM would,
//! with nothing to install.

use anyhow::{bail, Context, Result};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_EXPORT_NAME: u32 = 1;
const FLAG_FIXED_NEWSTYLE: u16 = 1;
const FLAG_NO_ZEROES: u16 = 2;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const REPLY_MAGIC: u32 = 0x6744_6698;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

/// One export, opened.
pub struct NbdClient {
    socket: TcpStream,
    handle: u64,
    /// The export's size in bytes.
    pub size: u64,
}

impl NbdClient {
    /// Connects to `addr` and opens `export`.
    pub async fn connect(addr: &str, export: &str) -> Result<NbdClient> {
        let mut socket = TcpStream::connect(addr)
            .await
            .with_context(|| format!("connect to the NBD export at {addr}"))?;
        if socket.read_u64().await? != NBDMAGIC || socket.read_u64().await? != IHAVEOPT {
            bail!("{addr} is not a newstyle NBD server");
        }
        let flags = socket.read_u16().await?;
        if flags & FLAG_FIXED_NEWSTYLE == 0 {
            bail!("{addr} does not speak fixed newstyle NBD");
        }
        let no_zeroes = flags & FLAG_NO_ZEROES != 0;
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE) | if no_zeroes { 2 } else { 0 };
        socket.write_u32(client_flags).await?;
        socket.write_u64(IHAVEOPT).await?;
        socket.write_u32(OPT_EXPORT_NAME).await?;
        socket.write_u32(export.len() as u32).await?;
        socket.write_all(export.as_bytes()).await?;
        let size = socket
            .read_u64()
            .await
            .with_context(|| format!("export {export:?} refused by {addr}"))?;
        let _transmission_flags = socket.read_u16().await?;
        if !no_zeroes {
            let mut zeroes = [0u8; 124];
            socket.read_exact(&mut zeroes).await?;
        }
        Ok(NbdClient {
            socket,
            handle: 0,
            size,
        })
    }

    async fn request(&mut self, kind: u16, offset: u64, length: u32, data: &[u8]) -> Result<()> {
        self.handle += 1;
        let mut head = Vec::with_capacity(28 + data.len());
        head.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        head.extend_from_slice(&0u16.to_be_bytes());
        head.extend_from_slice(&kind.to_be_bytes());
        head.extend_from_slice(&self.handle.to_be_bytes());
        head.extend_from_slice(&offset.to_be_bytes());
        head.extend_from_slice(&length.to_be_bytes());
        head.extend_from_slice(data);
        self.socket.write_all(&head).await?;
        if kind == CMD_DISC {
            return Ok(());
        }
        if self.socket.read_u32().await? != REPLY_MAGIC {
            bail!("bad NBD reply");
        }
        let error = self.socket.read_u32().await?;
        let handle = self.socket.read_u64().await?;
        if handle != self.handle {
            bail!("NBD reply for another request");
        }
        if error != 0 {
            bail!("NBD request failed with error {error}");
        }
        Ok(())
    }

    /// Writes `data` at `offset`.
    pub async fn write(&mut self, offset: u64, data: &[u8]) -> Result<()> {
        self.request(CMD_WRITE, offset, data.len() as u32, data)
            .await
    }

    /// Flushes what was written.
    pub async fn flush(&mut self) -> Result<()> {
        self.request(CMD_FLUSH, 0, 0, &[]).await
    }

    /// Says goodbye.
    pub async fn disconnect(mut self) -> Result<()> {
        self.request(CMD_DISC, 0, 0, &[]).await
    }
}
