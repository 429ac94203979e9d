//! The management client. [`Client::call`] sends a request to the VIP and waits for the
//! result by operation id; on a broken connection or after `resend_after` without an answer
//! it sends the *same* operation id again (the journal makes that safe), until `give_up`.
//! [`Client::call_retry`] is the `client_retry` baseline: every attempt gets a *new*
//! operation id and goes to the next node, so an interrupted operation runs again.

use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::wire::{Conn, Msg, Op, OpResult, WireError};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no result for operation {op_id} after {attempts} attempts in {waited:?} (last error: {last})")]
    GaveUp {
        op_id: String,
        attempts: u32,
        waited: Duration,
        last: String,
    },
    #[error("no target address given")]
    NoTarget,
}

/// What a call cost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallInfo {
    pub op_id: String,
    pub attempts: u32,
}

/// Client settings.
#[derive(Debug, Clone)]
pub struct Client {
    /// The VIP (one address) or, for the baseline, the nodes' own addresses.
    pub targets: Vec<SocketAddr>,
    pub resend_after: Duration,
    pub give_up: Duration,
    pub connect_timeout: Duration,
    pub pause: Duration,
}

impl Client {
    pub fn new(targets: Vec<SocketAddr>) -> Client {
        Client {
            targets,
            resend_after: Duration::from_secs(5),
            give_up: Duration::from_secs(60),
            connect_timeout: Duration::from_millis(300),
            pause: Duration::from_millis(5),
        }
    }

    fn attempt(
        &self,
        target: SocketAddr,
        op_id: &str,
        op: &Op,
        tag: &Option<String>,
    ) -> Result<OpResult, WireError> {
        let s = TcpStream::connect_timeout(&target, self.connect_timeout)?;
        s.set_read_timeout(Some(self.resend_after))?;
        let mut c = Conn::new(s)?;
        c.send(&Msg::Request {
            op_id: op_id.to_string(),
            op: op.clone(),
            tag: tag.clone(),
        })?;
        loop {
            match c.recv()? {
                Msg::Reply { op_id: id, result } if id == op_id || id.is_empty() => {
                    return Ok(result)
                }
                _ => continue,
            }
        }
    }

    /// Runs `op` under `op_id`, re-sending the same id until a result arrives.
    pub fn call(
        &self,
        op_id: &str,
        op: &Op,
        tag: Option<String>,
    ) -> Result<(OpResult, CallInfo), ClientError> {
        let target = *self.targets.first().ok_or(ClientError::NoTarget)?;
        let start = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let last = match self.attempt(target, op_id, op, &tag) {
                Ok(r) => {
                    return Ok((
                        r,
                        CallInfo {
                            op_id: op_id.to_string(),
                            attempts,
                        },
                    ))
                }
                Err(e) => e.to_string(),
            };
            if start.elapsed() > self.give_up {
                return Err(ClientError::GaveUp {
                    op_id: op_id.to_string(),
                    attempts,
                    waited: start.elapsed(),
                    last,
                });
            }
            thread::sleep(self.pause);
        }
    }

    /// The baseline: a new operation id (`{base}-a{n}`) per attempt, rotating over the
    /// targets starting at `*next`, which is left at the target that answered.
    pub fn call_retry(
        &self,
        base: &str,
        op: &Op,
        next: &mut usize,
    ) -> Result<(OpResult, CallInfo), ClientError> {
        if self.targets.is_empty() {
            return Err(ClientError::NoTarget);
        }
        let start = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let op_id = format!("{base}-a{attempts}");
            let target = self.targets[*next % self.targets.len()];
            let last = match self.attempt(target, &op_id, op, &Some(base.to_string())) {
                Ok(r) => return Ok((r, CallInfo { op_id, attempts })),
                Err(e) => e.to_string(),
            };
            *next = (*next + 1) % self.targets.len();
            if start.elapsed() > self.give_up {
                return Err(ClientError::GaveUp {
                    op_id,
                    attempts,
                    waited: start.elapsed(),
                    last,
                });
            }
            thread::sleep(self.pause);
        }
    }
}
