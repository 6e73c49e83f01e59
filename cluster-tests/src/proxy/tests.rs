//! The proxy's modes on a loopback echo server: what arrives, when, and how
//! a connection ends. This test process is "node 7" to the proxy.

use std::io::ErrorKind;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::{timeout, Instant};

use super::{Mode, Proxy};
use crate::owner::Owners;

const ME: u64 = 7;

/// An echo server and a proxy in front of it that knows this process as node 7.
async fn echo_proxy() -> Proxy {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n @ 1..) = s.read(&mut buf).await {
                    if s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let owners = Owners::default();
    owners.write().unwrap().insert(std::process::id(), ME);
    Proxy::start(target, owners)
}

/// Sends `msg` and reads its echo, within `within`.
async fn round_trip(s: &mut TcpStream, msg: &[u8], within: Duration) -> std::io::Result<Vec<u8>> {
    s.write_all(msg).await?;
    let mut got = vec![0u8; msg.len()];
    match timeout(within, s.read_exact(&mut got)).await {
        Ok(r) => r.map(|_| got),
        Err(_) => Err(ErrorKind::TimedOut.into()),
    }
}

#[tokio::test]
async fn pass_forwards_and_drop_holds_bytes_until_healed() {
    let proxy = echo_proxy().await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    assert_eq!(round_trip(&mut s, b"ping", Duration::from_secs(5)).await.unwrap(), b"ping");

    // Another source's mode does not apply to this one.
    proxy.set(None, Mode::Drop);
    assert_eq!(round_trip(&mut s, b"mine", Duration::from_secs(5)).await.unwrap(), b"mine");

    proxy.set(Some(ME), Mode::Drop);
    let err = round_trip(&mut s, b"lost?", Duration::from_millis(300)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::TimedOut, "a blackhole answers nothing");
    // A new connection is accepted but blackholed too.
    let mut fresh = TcpStream::connect(proxy.addr).await.unwrap();
    assert!(round_trip(&mut fresh, b"x", Duration::from_millis(300)).await.is_err());

    proxy.heal();
    let mut late = [0u8; 5];
    timeout(Duration::from_secs(5), s.read_exact(&mut late)).await.unwrap().unwrap();
    assert_eq!(&late, b"lost?", "held bytes flow again once healed");
    assert_eq!(proxy.resets(), 0);
}

#[tokio::test]
async fn delay_adds_latency_each_way() {
    let proxy = echo_proxy().await;
    proxy.set(Some(ME), Mode::Delay(Duration::from_millis(150)));
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    let start = Instant::now();
    assert_eq!(round_trip(&mut s, b"slow", Duration::from_secs(5)).await.unwrap(), b"slow");
    let rtt = start.elapsed();
    assert!(rtt >= Duration::from_millis(300), "two delayed hops, got {rtt:?}");
    assert!(rtt < Duration::from_secs(2), "a delay, not a stall: {rtt:?}");
}

#[tokio::test]
async fn reset_closes_connections_with_a_rst() {
    let proxy = echo_proxy().await;
    let mut s = TcpStream::connect(proxy.addr).await.unwrap();
    round_trip(&mut s, b"up", Duration::from_secs(5)).await.unwrap();
    proxy.set(Some(ME), Mode::Reset);
    let mut buf = [0u8; 8];
    let read = timeout(Duration::from_secs(5), s.read(&mut buf)).await.expect("ends at once");
    assert_eq!(read.unwrap_err().kind(), ErrorKind::ConnectionReset);
    // New connections are reset as soon as they are accepted (so fast,
    // on a loaded machine, that `connect` itself may report it).
    match TcpStream::connect(proxy.addr).await {
        Ok(mut fresh) => {
            let read = timeout(Duration::from_secs(5), fresh.read(&mut buf)).await.expect("ends at once");
            assert_eq!(read.unwrap_err().kind(), ErrorKind::ConnectionReset);
        }
        Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset, "{e}"),
    }
    assert_eq!(proxy.resets(), 2);
}
