//! Error types of the codec.

use thiserror::Error;

/// Why a byte sequence is not a valid message or frame.
///
/// Every decoder in this crate returns one of these instead of panicking.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The input ended before the structure did.
    #[error("truncated: needed {needed} more bytes")]
    Truncated {
        /// Bytes still missing (at least).
        needed: usize,
    },
    /// The message or frame names a protocol version this build does not speak.
    #[error("unsupported version {0}")]
    Version(u8),
    /// A length or count is over its bound.
    #[error("{what} is {got}, over the limit of {limit}")]
    TooLarge {
        /// Which field.
        what: &'static str,
        /// The value read.
        got: usize,
        /// The bound in force.
        limit: usize,
    },
    /// A field holds a value the protocol does not define.
    #[error("invalid {field}: {value}")]
    Invalid {
        /// Which field.
        field: &'static str,
        /// The value read.
        value: u64,
    },
    /// A text field is not valid UTF-8.
    #[error("{0} is not valid UTF-8")]
    Utf8(&'static str),
    /// A compressed batch could not be decompressed within its bound.
    #[error("decompression failed: {0}")]
    Decompress(String),
    /// Bytes were left over after a structure that must fill its frame.
    #[error("{0} trailing bytes")]
    Trailing(usize),
}

impl DecodeError {
    /// The code a link is closed with when its peer sent these bytes, the
    /// same on both sides of a link.
    pub fn close_code(&self) -> crate::frame::CloseCode {
        use crate::frame::CloseCode;
        match self {
            DecodeError::TooLarge { .. } => CloseCode::Oversize,
            DecodeError::Version(_) => CloseCode::Version,
            _ => CloseCode::Malformed,
        }
    }
}

/// Why a key, a printable key or an address could not be used.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum KeyError {
    /// The printable form is not 52 base32 characters.
    #[error("a key is 52 base32 characters (a-z, 2-7); got {0:?}")]
    Format(String),
    /// The 32 bytes are not a valid ed25519 point.
    #[error("not a valid ed25519 public key")]
    NotOnCurve,
    /// An address is not `KEY@HOST:PORT`.
    #[error("an address is KEY@HOST:PORT; {0}")]
    Address(String),
}

/// Why a message's authenticator was refused.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum VerifyError {
    /// The message carries no signature to check.
    #[error("message carries no signature")]
    Unsigned,
    /// The message is sealed end to end; only the receiving cell can check it.
    #[error("message is sealed; only its receiver can check it")]
    Sealed,
    /// The source key is not a valid ed25519 key.
    #[error("source key is not a valid ed25519 key")]
    BadKey,
    /// The signature does not match the signed bytes.
    #[error("bad signature")]
    BadSignature,
}
