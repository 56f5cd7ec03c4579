//! Messages between rank 0 and the worker ranks: a raw body (items,
//! results, a context) and a postcard header, so payload bytes never go
//! through serde element by element.
//!
//! Layout: the body, the header, the header's length (4 bytes,
//! little-endian). The header trails so that a receiver keeps the message's
//! own buffer as the body ([`decode_owned`]: a truncation, not a copy).

use serde::{Deserialize, Serialize};

use crate::codec;
use crate::error::{CodecError, CodecErrorKind, Error, Result};

/// The one MPI tag of the pool's messages (point-to-point messages of one
/// tag between two ranks arrive in order).
pub(crate) const TAG: i32 = 0x6d70;

/// Rank 0 to a worker rank.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ToRank {
    /// The handshake passed: run `workers` local workers. No body.
    Welcome { workers: u32 },
    /// The handshake failed: exit. No body.
    Refuse { reason: String },
    /// A job this rank will get chunks of: its task as offsets from the
    /// anchor; the body is its context if `ctx`.
    Job {
        job: u64,
        f: u64,
        tramp: u64,
        ctx: bool,
    },
    /// Items `base..base + count` of a job; the body holds them.
    Chunk {
        job: u64,
        base: u64,
        count: u32,
        kind: u8,
    },
    /// The job is over: drop it.
    End { job: u64 },
    /// Stop serving (after the work in hand if `!now`), finalize, exit 0.
    Close { now: bool },
}

/// A worker rank to rank 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum FromRank {
    /// The handshake: the checksum of this rank's executable, its host and
    /// CPUs (for the default number of workers).
    Hello {
        checksum: u64,
        host: String,
        cpus: u32,
    },
    /// The local pool runs with `workers` processes.
    Ready { workers: u32 },
    /// The local pool could not start.
    SetupFailed { message: String },
    /// Result entries of items `base..base + count`; the body holds them.
    Results {
        job: u64,
        base: u64,
        count: u32,
        kind: u8,
    },
    /// One item failed without a result entry.
    Failed {
        job: u64,
        index: u64,
        error: WireError,
    },
    /// The local pool cannot run the job.
    Abort { job: u64, error: WireError },
    /// The answer to `Close`: this rank sends nothing more.
    Bye,
}

/// An [`Error`] a worker rank reports, as it crosses to rank 0.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum WireError {
    Died {
        pid: u32,
        exitcode: i32,
    },
    Timeout,
    PoolClosed,
    Panicked {
        message: String,
        location: Option<String>,
    },
    Setup {
        step: String,
        message: String,
    },
    Mpi {
        reason: String,
    },
    Other {
        message: String,
    },
}

impl WireError {
    pub(crate) fn from_error(e: &Error) -> WireError {
        match e {
            Error::Died { pid, exitcode, .. } => WireError::Died {
                pid: *pid,
                exitcode: *exitcode,
            },
            Error::Timeout => WireError::Timeout,
            Error::PoolClosed => WireError::PoolClosed,
            Error::Panicked { message, location } => WireError::Panicked {
                message: message.clone(),
                location: location.clone(),
            },
            Error::Setup { step, source } => WireError::Setup {
                step: step.clone(),
                message: source.to_string(),
            },
            Error::Mpi { reason } => WireError::Mpi {
                reason: reason.clone(),
            },
            other => WireError::Other {
                message: other.to_string(),
            },
        }
    }

    /// The error on rank 0, naming the `rank` it happened on.
    pub(crate) fn into_error(self, rank: usize) -> Error {
        match self {
            WireError::Died { pid, exitcode } => Error::Died {
                pid,
                exitcode,
                rank: Some(rank),
            },
            WireError::Timeout => Error::Timeout,
            WireError::PoolClosed => Error::PoolClosed,
            WireError::Panicked { message, location } => Error::Panicked { message, location },
            WireError::Setup { step, message } => Error::Setup {
                step: format!("{step} on rank {rank}"),
                source: std::io::Error::other(message),
            },
            WireError::Mpi { reason } => Error::Mpi {
                reason: format!("rank {rank}: {reason}"),
            },
            WireError::Other { message } => {
                Error::Io(std::io::Error::other(format!("rank {rank}: {message}")))
            }
        }
    }
}

/// Encodes a message: `body`, then the header.
pub(crate) fn encode<H: Serialize>(header: &H, body: &[u8]) -> Result<Vec<u8>> {
    let mut msg = Vec::with_capacity(body.len() + 64);
    msg.extend_from_slice(body);
    encode_owned(header, msg)
}

/// [`encode`] of a body the caller gives away: the header goes after it in
/// the same buffer (the body is not copied).
pub(crate) fn encode_owned<H: Serialize>(header: &H, mut msg: Vec<u8>) -> Result<Vec<u8>> {
    let at = msg.len();
    codec::encode_value(header, &mut msg)?;
    let len = u32::try_from(msg.len() - at).map_err(|_| invalid("header too long"))?;
    msg.extend_from_slice(&len.to_le_bytes());
    Ok(msg)
}

/// Where the header starts, and the header's bytes.
fn split(msg: &[u8]) -> Result<(usize, &[u8])> {
    let (rest, len) = msg
        .split_last_chunk::<4>()
        .ok_or_else(|| invalid("message shorter than its header length"))?;
    let len = u32::from_le_bytes(*len) as usize;
    let at = rest
        .len()
        .checked_sub(len)
        .ok_or_else(|| invalid("message shorter than its header"))?;
    Ok((at, &rest[at..]))
}

/// Decodes a message: its header and its body.
///
/// # Errors
/// [`Error::Codec`] for a message too short for its header, or a header
/// that does not decode.
pub(crate) fn decode<H: serde::de::DeserializeOwned>(msg: &[u8]) -> Result<(H, &[u8])> {
    let (at, h) = split(msg)?;
    Ok((codec::decode(h)?, &msg[..at]))
}

/// As [`decode`], keeping `msg`'s buffer as the body.
///
/// # Errors
/// As [`decode`].
pub(crate) fn decode_owned<H: serde::de::DeserializeOwned>(
    mut msg: Vec<u8>,
) -> Result<(H, Vec<u8>)> {
    let (at, h) = split(&msg)?;
    let header = codec::decode(h)?;
    msg.truncate(at);
    Ok((header, msg))
}

fn invalid(what: &str) -> Error {
    CodecError::new(CodecErrorKind::Invalid(format!("mpi message: {what}"))).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let h = ToRank::Chunk {
            job: 3,
            base: 100,
            count: 2,
            kind: 0,
        };
        let m = encode(&h, b"items").unwrap();
        let (back, body) = decode::<ToRank>(&m).unwrap();
        assert_eq!(back, h);
        assert_eq!(body, b"items");
        let (back, body) = decode_owned::<ToRank>(m).unwrap();
        assert_eq!((back, &body[..]), (h, &b"items"[..]));
        let h = FromRank::Failed {
            job: 1,
            index: 7,
            error: WireError::Died {
                pid: 42,
                exitcode: -11,
            },
        };
        let m = encode(&h, &[]).unwrap();
        let (back, body) = decode::<FromRank>(&m).unwrap();
        assert_eq!(back, h);
        assert!(body.is_empty());
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(decode::<ToRank>(&[]).is_err());
        assert!(decode::<ToRank>(&[1, 9, 0, 0, 0]).is_err());
        assert!(decode::<ToRank>(&[200, 1, 0, 0, 0]).is_err());
        assert!(decode_owned::<FromRank>(vec![0; 3]).is_err());
    }

    #[test]
    fn errors_name_the_rank() {
        let e = WireError::from_error(&Error::Died {
            pid: 5,
            exitcode: -11,
            rank: None,
        })
        .into_error(2);
        assert_eq!(
            e.to_string(),
            "process 5 on rank 2 died with exit code -11 (SIGSEGV)"
        );
        assert!(e.is_died());
        assert!(WireError::Timeout.into_error(1).is_timeout());
    }
}
