//! Key encodings: every key starts with its group id, big-endian, so one
//! group's keys sort together and a prefix scan visits exactly that group.

/// The 8-byte prefix of every key of `group`.
pub fn group_prefix(group: u64) -> [u8; 8] {
    group.to_be_bytes()
}

/// The first key after all of `group`'s keys (exclusive upper bound).
pub fn group_range_end(group: u64) -> Vec<u8> {
    match group.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 9],
    }
}

/// `raft_log` key: group · index.
pub fn log_key(group: u64, index: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&index.to_be_bytes());
    k
}

/// `raft_state` / `group_meta` key: group · tag.
pub fn state_key(group: u64, tag: u8) -> [u8; 9] {
    let mut k = [0u8; 9];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8] = tag;
    k
}

/// `data` key: group · user key bytes.
pub fn data_key(group: u64, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + key.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.extend_from_slice(key);
    k
}

/// The user key part of a `data` key.
pub fn user_key_of(data_key: &[u8]) -> &[u8] {
    &data_key[8..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_keys_sort_together_and_by_index() {
        assert!(log_key(1, u64::MAX) < log_key(2, 0));
        assert!(log_key(1, 9) < log_key(1, 10));
        assert!(data_key(1, b"\xff\xff") < group_range_end(1));
        assert!(data_key(2, b"") >= group_range_end(1));
        assert_eq!(user_key_of(&data_key(7, b"abc")), b"abc");
    }
}
