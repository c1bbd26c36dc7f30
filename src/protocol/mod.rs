//! The PostgreSQL v3 wire protocol, with no I/O policy in it.
//!
//! `codec` frames messages out of a byte stream with hard length limits; `frontend` and `backend`
//! read the fields of the messages pgwarp has to look inside; `build` encodes the messages pgwarp
//! writes itself; `startup` handles the untagged packets a connection opens with; `scram`,
//! `scram_client` and `md5` are the password exchanges. Nothing here knows about pools, sessions
//! or caches.

pub mod backend;
pub mod build;
pub mod codec;
pub mod error;
pub mod frontend;
pub mod md5;
pub mod scram;
pub mod scram_client;
pub mod spare;
pub mod startup;

pub use codec::{poll_duplex, Duplex, Message, MessageReader, Run};
pub use error::SqlState;

/// Errors decoding the body of a message whose frame was already accepted.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("message {tag:?} is truncated")]
    Truncated { tag: char },
    #[error("message {tag:?} has a string that is not terminated")]
    Unterminated { tag: char },
    #[error("message {tag:?} has a string that is not valid UTF-8")]
    NotUtf8 { tag: char },
    #[error("message {tag:?} has an invalid field: {what}")]
    Invalid { tag: char, what: &'static str },
}

/// A cursor over a message body that reads the protocol's primitive types.
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
    tag: char,
}

impl<'a> Fields<'a> {
    pub(crate) fn new(tag: u8, buf: &'a [u8]) -> Self {
        Fields { buf, pos: 0, tag: tag as char }
    }

    pub(crate) fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.pos >= self.buf.len()
    }

    pub(crate) fn cstr(&mut self) -> Result<&'a str, DecodeError> {
        let rest = &self.buf[self.pos..];
        // CStr's search for the NUL is core's word-at-a-time memchr, not a byte loop.
        let text = std::ffi::CStr::from_bytes_until_nul(rest)
            .map_err(|_| DecodeError::Unterminated { tag: self.tag })?
            .to_bytes();
        let s = std::str::from_utf8(text).map_err(|_| DecodeError::NotUtf8 { tag: self.tag })?;
        self.pos += text.len() + 1;
        Ok(s)
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.buf.len() - self.pos < n {
            return Err(DecodeError::Truncated { tag: self.tag });
        }
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.bytes(1)?[0])
    }

    pub(crate) fn i16(&mut self) -> Result<i16, DecodeError> {
        let b = self.bytes(2)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn i32(&mut self) -> Result<i32, DecodeError> {
        let b = self.bytes(4)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        Ok(self.i32()? as u32)
    }

    /// A count field (i16) that must not be negative.
    pub(crate) fn count(&mut self) -> Result<usize, DecodeError> {
        let n = self.i16()?;
        usize::try_from(n).map_err(|_| DecodeError::Invalid { tag: self.tag, what: "negative count" })
    }

    pub(crate) fn invalid(&self, what: &'static str) -> DecodeError {
        DecodeError::Invalid { tag: self.tag, what }
    }
}
