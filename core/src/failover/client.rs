//! The management client. [`Client::call`] sends a request to the VIP and waits for the
//! result by operation id; on a broken connection or after `resend_after` of silence it
//! sends the *same* operation id again (the journal makes that safe). While an operation
//! runs the holder forwards the block service's `Accepted` keepalives, so a long copy is
//! not silence; `give_up` bounds the silence (no keepalive, no answer), not the total time.
//! A refusal (a reply with an empty operation id: malformed request) is final.
//! [`Client::call_retry`] is the `client_retry` baseline: every attempt gets a *new*
//! operation id and goes to the next node, so an interrupted operation runs again.

use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use super::wire::{Conn, Msg, Op, OpResult, VolumeInfo, WireError};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no answer for {op_id} after {attempts} attempts, silent for {silent:?} (last error: {last})")]
    GaveUp {
        op_id: String,
        attempts: u32,
        silent: Duration,
        last: String,
    },
    #[error("no target address given")]
    NoTarget,
    #[error("{0}")]
    Refused(String),
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
    /// Re-send after this long without any message (result or keepalive).
    pub resend_after: Duration,
    /// Give up after this long without any message.
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

    /// Sends `req` to `target` and returns the final answer: a `Reply` for `op_id` (or a
    /// refusal), or `Listed`. Every message received moves `heard` forward.
    fn attempt(
        &self,
        target: SocketAddr,
        req: &Msg,
        op_id: &str,
        heard: &mut Instant,
    ) -> Result<Msg, WireError> {
        let s = TcpStream::connect_timeout(&target, self.connect_timeout)?;
        s.set_read_timeout(Some(self.resend_after))?;
        let mut c = Conn::new(s)?;
        c.send(req)?;
        loop {
            let m = c.recv()?;
            *heard = Instant::now();
            let last = match &m {
                Msg::Reply { op_id: id, .. } => id == op_id || id.is_empty(),
                Msg::Listed { .. } => true,
                _ => false,
            };
            if last {
                return Ok(m);
            }
        }
    }

    /// Runs attempts (`next(n)` gives the n-th attempt's target, request and operation id;
    /// `failed()` is told of each failure) until one answers or `give_up` of silence.
    fn until_answer(
        &self,
        mut next: impl FnMut(u32) -> (SocketAddr, Msg, String),
        mut failed: impl FnMut(),
    ) -> Result<(Msg, CallInfo), ClientError> {
        let mut heard = Instant::now();
        let mut attempts = 0u32;
        loop {
            attempts += 1;
            let (target, req, op_id) = next(attempts);
            let last = match self.attempt(target, &req, &op_id, &mut heard) {
                Ok(m) => return Ok((m, CallInfo { op_id, attempts })),
                Err(e) => e.to_string(),
            };
            failed();
            if heard.elapsed() > self.give_up {
                return Err(ClientError::GaveUp {
                    op_id,
                    attempts,
                    silent: heard.elapsed(),
                    last,
                });
            }
            thread::sleep(self.pause);
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
        let req = Msg::Request {
            op_id: op_id.to_string(),
            op: op.clone(),
            tag,
        };
        let (m, info) = self.until_answer(|_| (target, req.clone(), op_id.to_string()), || {})?;
        Ok((reply_result(m)?, info))
    }

    /// Lists the volumes (no operation id; re-sent until answered).
    pub fn list(&self) -> Result<Vec<VolumeInfo>, ClientError> {
        let target = *self.targets.first().ok_or(ClientError::NoTarget)?;
        match self.until_answer(|_| (target, Msg::List, "list".into()), || {})? {
            (Msg::Listed { volumes }, _) => Ok(volumes),
            (m, _) => match reply_result(m)? {
                OpResult::Error { message } => Err(ClientError::Refused(message)),
                other => Err(ClientError::Refused(format!("unexpected answer {other:?}"))),
            },
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
        let n = self.targets.len();
        let cur = std::cell::Cell::new(*next);
        let res = self.until_answer(
            |k| {
                let op_id = format!("{base}-a{k}");
                let req = Msg::Request {
                    op_id: op_id.clone(),
                    op: op.clone(),
                    tag: Some(base.to_string()),
                };
                (self.targets[cur.get() % n], req, op_id)
            },
            || cur.set((cur.get() + 1) % n),
        );
        *next = cur.get();
        let (m, info) = res?;
        Ok((reply_result(m)?, info))
    }
}

fn reply_result(m: Msg) -> Result<OpResult, ClientError> {
    match m {
        Msg::Reply { result, .. } => Ok(result),
        other => Err(ClientError::Refused(format!("unexpected answer {other:?}"))),
    }
}
