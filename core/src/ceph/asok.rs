//! A daemon's admin socket: the Unix socket on which a Ceph daemon answers commands
//! (`ceph daemon NAME CMD` speaks the same protocol: the command's JSON ended by a NUL
//! byte; the answer is a 4-byte big-endian length and that many bytes).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;

use super::error::{CephError, Result};

/// Sends `cmd` (e.g. `{"prefix": "status"}`) to the daemon behind `socket` and returns its
/// answer as JSON.
pub fn command(socket: &Path, cmd: &Value, timeout: Duration) -> Result<Value> {
    let io = |cause| CephError::Io {
        what: "admin socket",
        path: socket.to_path_buf(),
        cause,
    };
    let mut s = UnixStream::connect(socket).map_err(io)?;
    s.set_read_timeout(Some(timeout)).map_err(io)?;
    s.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut req = serde_json::to_vec(cmd).expect("a JSON value serialises");
    req.push(0);
    s.write_all(&req).map_err(io)?;
    let mut len = [0u8; 4];
    s.read_exact(&mut len).map_err(io)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body).map_err(io)?;
    serde_json::from_slice(&body).map_err(|_| CephError::Parse {
        what: format!("admin socket {}", socket.display()),
        text: String::from_utf8_lossy(&body).into_owned(),
    })
}
