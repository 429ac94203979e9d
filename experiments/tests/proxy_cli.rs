//! `blocklab proxy` as a process: it prints its address, forwards both ways with its delay,
//! stops on SIGINT saying what it forwarded, and refuses bad values with a clear message.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use blocklab::testing::{output_text, pattern, spawn_announcing};

const BLOCKLAB: &str = env!("CARGO_BIN_EXE_blocklab");
const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn bad_values_are_refused_with_a_clear_message() {
    let cases: [(&[&str], &str); 6] = [
        (&["--delay", "500"], "a duration needs a unit"),
        (
            &["--delay", "1ms", "--jitter", "100%"],
            "outside [0%, 100%)",
        ),
        (
            &["--delay", "1ms", "--jitter", "150%"],
            "outside [0%, 100%)",
        ),
        (&["--delay", "1ms", "--jitter", "-5%"], "outside [0%, 100%)"),
        (
            &["--delay", "1ms", "--jitter", "0.1"],
            "needs a percent sign",
        ),
        (&["--delay", "1ms", "--jitter", "ten%"], "not a percentage"),
    ];
    for (args, expect) in cases {
        let o = Command::new(BLOCKLAB)
            .args(["proxy", "--to", "127.0.0.1:1"])
            .args(args)
            .output()
            .unwrap();
        let text = output_text(&o);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {text}");
        assert!(
            text.contains(expect),
            "{args:?}: expected {expect:?} in {text}"
        );
    }
}

#[test]
fn the_process_prints_its_address_and_forwards_with_its_delay() {
    let target = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = target.local_addr().unwrap().to_string();
    let (mut proxy, line) = spawn_announcing(
        Command::new(BLOCKLAB)
            .args(["proxy", "--listen", "127.0.0.1:0", "--to", &to])
            .args(["--delay", "5ms", "--jitter", "20%", "--seed", "9"])
            .stderr(Stdio::piped()),
    );
    let addr: SocketAddr = line
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("first line: {line:?}"))
        .parse()
        .unwrap();
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(TIMEOUT)).unwrap();
    let (mut t, _) = target.accept().unwrap();
    t.set_read_timeout(Some(TIMEOUT)).unwrap();
    let data = pattern(1 << 20, 5);
    let sent = Instant::now();
    c.write_all(&data[..1000]).unwrap();
    let mut got = vec![0u8; 1000];
    t.read_exact(&mut got).unwrap();
    // 5 ms − 20%: no byte arrives earlier.
    let one_way = sent.elapsed();
    assert!(one_way >= Duration::from_millis(4), "{one_way:?}");
    assert_eq!(got, data[..1000]);
    c.write_all(&data[1000..]).unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut rest = Vec::new();
    t.read_to_end(&mut rest).unwrap();
    assert!(rest == data[1000..], "the stream differs");
    t.write_all(b"reply").unwrap();
    drop(t);
    let mut reply = Vec::new();
    c.read_to_end(&mut reply).unwrap();
    assert_eq!(reply, b"reply");
    let status = proxy.interrupt();
    let mut err = String::new();
    proxy
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    assert!(status.success(), "{status}: {err}");
    assert!(
        err.contains(&format!(
            "connections 1 failed_connects 0 to_target_bytes {} ",
            data.len()
        )) && err.contains("to_client_bytes 5 "),
        "{err}"
    );
}
