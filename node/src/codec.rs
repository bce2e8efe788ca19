//! The one binary encoding of the node: bincode 2 (standard configuration)
//! for RPC frames, Raft log entries, stored records and snapshot headers.
//!
//! Decoding is bounded. bincode allocates a `String` or `Vec` of whatever
//! length prefix it reads, so without a limit a frame of twenty bytes that
//! claims a 2^62-byte key makes the allocation fail and the process abort.
//! With the limit, a length beyond it is a decode error: the caller drops
//! that connection (or fails that read), and the node goes on. The limit is
//! the largest RPC frame; nothing decoded here can be longer than its input.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The most bytes one decode may claim: the RPC transport's largest frame.
pub const DECODE_LIMIT: usize = 256 << 20;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<DECODE_LIMIT>()
}

/// Why bytes could not be encoded or decoded.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    #[error("encode: {0}")]
    Encode(#[from] bincode::error::EncodeError),
    #[error("decode: {0}")]
    Decode(#[from] bincode::error::DecodeError),
}

impl From<CodecError> for std::io::Error {
    fn from(e: CodecError) -> std::io::Error {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e)
    }
}

pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    Ok(bincode::serde::encode_to_vec(v, config())?)
}

pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, CodecError> {
    Ok(bincode::serde::decode_from_slice(b, config())?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_length_prefix_is_an_error_not_an_abort() {
        // A string whose varint length prefix claims 2^62 bytes (marker 253,
        // then the u64 little-endian), followed by nothing.
        let mut b = vec![253u8];
        b.extend_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(decode::<String>(&b).is_err());
        assert!(decode::<Vec<u8>>(&b).is_err());
        assert!(decode::<(u64, String)>(&[&[1u8][..], &b].concat()).is_err());
    }

    #[test]
    fn values_round_trip() {
        let v = (7u64, "key".to_string(), vec![1u8, 2, 3], Some(-4i64));
        assert_eq!(decode::<(u64, String, Vec<u8>, Option<i64>)>(&encode(&v).unwrap()).unwrap(), v);
    }
}
