//! The one binary encoding of the node: bincode 2 (standard configuration)
//! for RPC frames, Raft log entries, stored records and snapshot headers.
//!
//! Decoding is bounded. bincode allocates a `String` or `Vec` of whatever
//! length prefix it reads, so without a limit a frame of twenty bytes that
//! claims a 2^62-byte key makes the allocation fail and the process abort.
//! With the limit, a length beyond it is a decode error: the caller drops
//! that connection (or fails that read), and the node goes on. Only strings
//! and byte vectors claim against the limit, and they claim exactly the bytes
//! they hold, so nothing valid claims more than its input is long; the limit
//! grows with the input in steps of 16, so a claimed length can make bincode
//! allocate at most 16 times what arrived (64 KiB for a small frame), and
//! never more than the largest RPC frame.

use serde::de::DeserializeOwned;
use serde::Serialize;

/// The most bytes one decode may claim: the RPC transport's largest frame.
pub const DECODE_LIMIT: usize = 256 << 20;

fn decode_within<T: DeserializeOwned, const LIMIT: usize>(b: &[u8]) -> Result<T, CodecError> {
    Ok(bincode::serde::decode_from_slice(b, bincode::config::standard().with_limit::<LIMIT>())?.0)
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

/// Encodes `v` into a vector of exactly its size: measured first, so that a
/// frame of megabytes (a backfill chunk, a snapshot chunk) is written once
/// into memory allocated once, not copied at every doubling of its buffer.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, CodecError> {
    let config = bincode::config::standard();
    let mut size = bincode::enc::write::SizeWriter::default();
    bincode::serde::encode_into_writer(v, &mut size, config)?;
    let mut out = Vec::with_capacity(size.bytes_written);
    bincode::serde::encode_into_std_write(v, &mut out, config)?;
    Ok(out)
}

pub fn decode<T: DeserializeOwned>(b: &[u8]) -> Result<T, CodecError> {
    match b.len() {
        n if n <= 4 << 10 => decode_within::<T, { 64 << 10 }>(b),
        n if n <= 64 << 10 => decode_within::<T, { 1 << 20 }>(b),
        n if n <= 1 << 20 => decode_within::<T, { 16 << 20 }>(b),
        _ => decode_within::<T, DECODE_LIMIT>(b),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_sized_first_gives_the_same_bytes() {
        // A small value and one of megabytes (a backfill chunk's shape).
        let small = ("key".to_string(), 42u64, Some(7u32));
        let big = (9u64, serde_bytes::ByteBuf::from(vec![0xabu8; (4 << 20) + 17]), None::<u64>);
        let config = bincode::config::standard();
        let small_bytes = encode(&small).unwrap();
        assert_eq!(small_bytes, bincode::serde::encode_to_vec(&small, config).unwrap());
        let big_bytes = encode(&big).unwrap();
        assert_eq!(big_bytes, bincode::serde::encode_to_vec(&big, config).unwrap());
        assert_eq!(big_bytes.capacity(), big_bytes.len(), "allocated once, at its size");
        let back: (u64, serde_bytes::ByteBuf, Option<u64>) = decode(&big_bytes).unwrap();
        assert_eq!(back, big);
    }

    #[test]
    fn a_huge_length_prefix_is_an_error_not_an_abort() {
        // A string whose varint length prefix claims 2^62 bytes (marker 253,
        // then the u64 little-endian), followed by nothing.
        let mut b = vec![253u8];
        b.extend_from_slice(&(1u64 << 62).to_le_bytes());
        assert!(decode::<String>(&b).is_err());
        assert!(decode::<Vec<u8>>(&b).is_err());
        assert!(decode::<(u64, String)>(&[&[1u8][..], &b].concat()).is_err());
        // A claim that fits the hard limit but not the input's tier.
        let mut c = vec![253u8];
        c.extend_from_slice(&(200u64 << 20).to_le_bytes());
        assert!(matches!(decode::<String>(&c), Err(CodecError::Decode(bincode::error::DecodeError::LimitExceeded))));
    }

    #[test]
    fn large_valid_values_still_decode() {
        let big = "x".repeat(3 << 20);
        assert_eq!(decode::<String>(&encode(&big).unwrap()).unwrap(), big);
        let many: Vec<(String, Vec<u8>)> = (0..5000).map(|i| (format!("k{i}"), vec![1u8; 9])).collect();
        assert_eq!(decode::<Vec<(String, Vec<u8>)>>(&encode(&many).unwrap()).unwrap(), many);
    }

    #[test]
    fn values_round_trip() {
        let v = (7u64, "key".to_string(), vec![1u8, 2, 3], Some(-4i64));
        assert_eq!(decode::<(u64, String, Vec<u8>, Option<i64>)>(&encode(&v).unwrap()).unwrap(), v);
    }
}
