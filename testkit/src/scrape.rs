//! Reading Prometheus metrics as Prometheus does: an HTTP GET of a
//! `/metrics` page, and one sample's value out of its text.

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `method path` on `addr` over HTTP/1.1 (the connection closed after):
/// the status line, and the headers and body after it; None while nothing
/// answers.
pub async fn http(addr: &str, method: &str, path: &str) -> Option<(String, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).await.ok()?;
    let (status, rest) = text.split_once("\r\n")?;
    Some((status.to_string(), rest.to_string()))
}

/// The `/metrics` page at `addr` (headers and body), once it answers 200.
pub async fn metrics(addr: &str) -> Option<String> {
    let (status, page) = http(addr, "GET", "/metrics").await?;
    status.ends_with(" 200 OK").then_some(page)
}

/// The value of the sample whose name and labels are `series`, exactly as
/// the page writes them (`name{label="value"}`).
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}
