//! Network helpers shared by the code that starts servers (ZooKeeper, the allocation
//! node's internal port) and by the tests.

use std::net::{Ipv4Addr, TcpListener};

/// A TCP port on 127.0.0.1 that was free a moment ago: bound to port 0, read back and
/// released. Another process can take it in between; callers that bind it themselves
/// report that as an error of their own.
pub fn free_port() -> std::io::Result<u16> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?
        .local_addr()
        .map(|a| a.port())
}
