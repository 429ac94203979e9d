//! Every error names its cause once: in its message or as its `source()`, never both, so
//! a binary that prints the whole chain (`{:#}`) prints each cause once.

use std::error::Error;
use std::time::Duration;

/// The chain as `anyhow`'s `{:#}` prints it: each error's message, joined by ": ".
fn chain(e: &dyn Error) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(c) = cur {
        parts.push(c.to_string());
        cur = c.source();
    }
    parts.join(": ")
}

/// Fails when `needle` (the OS cause) appears other than once in the printed chain.
fn assert_once(e: &dyn Error, needle: &str) {
    let printed = chain(e);
    assert_eq!(
        printed.matches(needle).count(),
        1,
        "{needle:?} should appear once in {printed:?}"
    );
}

#[test]
fn a_refused_connection_is_printed_once() {
    // Nothing listens on a port the OS just gave out and took back.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let addr = format!("127.0.0.1:{port}");
    let refused = std::io::Error::from_raw_os_error(libc::ECONNREFUSED).to_string();
    let Err(e) = blocklab::monitor::MonitorClient::connect(&addr, Duration::from_millis(50)) else {
        panic!("nothing listens there")
    };
    assert_once(&e, &refused);
    let Err(e) = blocklab::jsonl::tcp::connect_with_retry(&addr, Duration::from_millis(50)) else {
        panic!("nothing listens there")
    };
    assert_once(&e, &refused);
    let to = Duration::from_millis(200);
    let Err(e) = blocklab::repl::client::Client::connect(addr.parse().unwrap(), to) else {
        panic!("nothing listens there")
    };
    assert_once(&e, &refused);
}

#[test]
fn a_file_error_is_printed_once() {
    let dir = tempfile::tempdir().unwrap();
    // A directory where a file is expected.
    let is_dir = std::io::Error::from_raw_os_error(libc::EISDIR).to_string();
    let Err(e) = blocklab::failover::journal::FileJournal::open(dir.path()) else {
        panic!("a directory is not a journal")
    };
    assert_once(&e, &is_dir);
    let Err(e) = blocklab::coord::embedded::EmbeddedStore::open(dir.path()) else {
        panic!("a directory is not a store")
    };
    if let Some(cause) = e.source() {
        assert!(!e.to_string().contains(&cause.to_string()), "{}", chain(&e));
    }
}
