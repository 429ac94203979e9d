//! The delay proxy on real sockets: bytes intact and in order both ways under jitter, the
//! lower bound of the delay, a target that is down, a stop with connections open.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use blocklab::delayproxy::{DelayProxy, DelaySpec, DirectionStats, ProxyError};
use blocklab::testing::{pattern, wait_for};
use rand::{Rng, SeedableRng};

const TIMEOUT: Duration = Duration::from_secs(60);

/// An echo server for one connection: writes back every byte it reads, then half-closes.
fn echo_once() -> (SocketAddr, JoinHandle<u64>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    let t = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        let mut r = s.try_clone().unwrap();
        let n = std::io::copy(&mut r, &mut s).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        n
    });
    (addr, t)
}

fn proxy(target: SocketAddr, spec: DelaySpec) -> DelayProxy {
    DelayProxy::bind("127.0.0.1:0".parse().unwrap(), target, spec).unwrap()
}

fn connect(p: &DelayProxy) -> TcpStream {
    let s = TcpStream::connect(p.addr()).unwrap();
    s.set_read_timeout(Some(TIMEOUT)).unwrap();
    s
}

#[test]
fn a_large_random_stream_arrives_intact_and_in_order_both_ways_with_jitter() {
    let (target, echo) = echo_once();
    let spec = DelaySpec::new(Duration::from_micros(300), 0.5, 7).unwrap();
    let p = proxy(target, spec);
    let mut data = vec![0u8; 8 << 20];
    rand::rngs::StdRng::seed_from_u64(42).fill(&mut data[..]);
    let c = connect(&p);
    // Writes in pieces of random sizes (many chunks, each with its own delay) while the
    // echo comes back.
    let mut w = c.try_clone().unwrap();
    let sent = data.clone();
    let writer = std::thread::spawn(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut at = 0;
        while at < sent.len() {
            let n = rng.random_range(1..=20_000).min(sent.len() - at);
            w.write_all(&sent[at..at + n]).unwrap();
            at += n;
        }
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut back = Vec::with_capacity(data.len());
    (&c).read_to_end(&mut back).unwrap();
    writer.join().unwrap();
    assert_eq!(back.len(), data.len());
    assert!(back == data, "the echo differs from what was sent");
    assert_eq!(echo.join().unwrap(), data.len() as u64);
    let n = data.len() as u64;
    wait_for("the proxy to count every byte", TIMEOUT, || {
        let s = p.stats();
        s.to_target.bytes == n && s.to_client.bytes == n
    });
    let s = p.stats();
    assert!(s.to_target.chunks > 1 && s.to_client.chunks > 1, "{s:?}");
    assert_eq!((s.connections, s.failed_connects), (1, 0));
    // Both ends half-closed: the connection is gone.
    wait_for("the connection to close", TIMEOUT, || {
        p.open_connections() == 0
    });
    p.stop();
}

#[test]
fn a_chunk_is_not_delivered_before_its_delay() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let spec = DelaySpec::new(Duration::from_millis(20), 0.5, 3).unwrap();
    let (lo, hi) = spec.bounds();
    assert_eq!(
        (lo, hi),
        (Duration::from_millis(10), Duration::from_millis(30))
    );
    let p = proxy(l.local_addr().unwrap(), spec);
    let mut c = connect(&p);
    let (mut t, _) = l.accept().unwrap();
    t.set_read_timeout(Some(TIMEOUT)).unwrap();
    for i in 0..10u8 {
        // One way: from the write to the read at the target.
        let sent = Instant::now();
        c.write_all(&[i; 100]).unwrap();
        let mut b = [0u8; 100];
        t.read_exact(&mut b).unwrap();
        let one_way = sent.elapsed();
        assert_eq!(b, [i; 100]);
        assert!(
            one_way >= lo,
            "chunk {i} arrived after {one_way:?} < {lo:?}"
        );
        // And back: two delays.
        let sent = Instant::now();
        t.write_all(&b).unwrap();
        c.read_exact(&mut b).unwrap();
        let rtt = sent.elapsed();
        assert!(rtt >= lo, "reply {i} arrived after {rtt:?} < {lo:?}");
    }
    assert_eq!(
        p.stats().to_target,
        DirectionStats {
            bytes: 1000,
            chunks: 10
        }
    );
}

#[test]
fn no_delay_forwards_and_a_stop_closes_open_connections() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let p = proxy(l.local_addr().unwrap(), DelaySpec::none());
    let mut c = connect(&p);
    let (mut t, _) = l.accept().unwrap();
    t.set_read_timeout(Some(TIMEOUT)).unwrap();
    let msg = pattern(4096, 3);
    c.write_all(&msg).unwrap();
    let mut b = vec![0u8; msg.len()];
    t.read_exact(&mut b).unwrap();
    assert_eq!(b, msg);
    t.write_all(b"pong").unwrap();
    let mut b = [0u8; 4];
    c.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"pong");
    assert_eq!(p.open_connections(), 1);
    // Neither side closes: the stop closes both.
    p.stop();
    assert_eq!(c.read(&mut b).unwrap_or(0), 0);
    assert_eq!(t.read(&mut b).unwrap_or(0), 0);
}

#[test]
fn a_target_that_is_down_closes_the_clients_connection() {
    let port = blocklab::testing::free_port();
    let p = proxy(
        SocketAddr::from(([127, 0, 0, 1], port)),
        DelaySpec::fixed(Duration::from_millis(1)).unwrap(),
    );
    let mut c = connect(&p);
    let mut b = [0u8; 1];
    assert_eq!(c.read(&mut b).unwrap_or(0), 0);
    wait_for("the failed connect to count", TIMEOUT, || {
        p.stats().failed_connects == 1
    });
}

#[test]
fn jitter_outside_zero_to_one_is_refused() {
    for j in [-0.1, 1.0, 1.5, f64::NAN] {
        let e = DelaySpec::new(Duration::from_millis(1), j, 0).unwrap_err();
        assert!(matches!(e, ProxyError::Jitter(_)), "{e}");
        assert!(e.to_string().contains("outside [0, 1)"), "{e}");
    }
    assert!(DelaySpec::new(Duration::from_millis(1), 0.0, 0).is_ok());
    assert!(DelaySpec::new(Duration::from_millis(1), 0.99, 0).is_ok());
    assert!(matches!(
        DelaySpec::fixed(Duration::from_secs(7200)),
        Err(ProxyError::Delay(_))
    ));
}
