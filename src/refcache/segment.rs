//! The on-disk form of reference-cache entries: immutable segment files, each written
//! atomically and sealed with a sha256, so a torn or edited file is detected, never used.
//!
//! Layout: `DPORC001` magic, the 32-byte fingerprint digest, a little-endian u64 entry count,
//! then per entry a 32-byte key, chosen and rejected log-probs (f32 bits), chosen and rejected
//! token counts (u32), and finally the sha256 of everything before it.
//!
//! ```
//! use dpo::refcache::segment::{encode, decode};
//! use dpo::refcache::Entry;
//! let e = Entry { chosen: -1.5, rejected: -2.25, chosen_tokens: 3, rejected_tokens: 4 };
//! let bytes = encode(&[7; 32], &[([1; 32], e)]);
//! assert_eq!(decode(&bytes, &[7; 32]).unwrap(), vec![([1; 32], e)]);
//! ```
use super::{Entry, Key};
use anyhow::{Result, bail, ensure};
use sha2::{Digest, Sha256};

const MAGIC: &[u8; 8] = b"DPORC001";
const RECORD: usize = 32 + 4 * 4;
const HEADER: usize = 8 + 32 + 8;

/// Serialises entries under `fingerprint` into one sealed segment.
pub fn encode(fingerprint: &[u8; 32], entries: &[(Key, Entry)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER + entries.len() * RECORD + 32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(fingerprint);
    out.extend_from_slice(&(entries.len() as u64).to_le_bytes());
    for (key, e) in entries {
        out.extend_from_slice(key);
        out.extend_from_slice(&e.chosen.to_bits().to_le_bytes());
        out.extend_from_slice(&e.rejected.to_bits().to_le_bytes());
        out.extend_from_slice(&e.chosen_tokens.to_le_bytes());
        out.extend_from_slice(&e.rejected_tokens.to_le_bytes());
    }
    let seal = Sha256::digest(&out);
    out.extend_from_slice(&seal);
    out
}

/// Reads a segment back, refusing a wrong magic, fingerprint, length or seal.
pub fn decode(bytes: &[u8], fingerprint: &[u8; 32]) -> Result<Vec<(Key, Entry)>> {
    ensure!(bytes.len() >= HEADER + 32, "too short ({} bytes)", bytes.len());
    ensure!(&bytes[..8] == MAGIC, "not a dpo reference-cache segment (bad magic)");
    let (body, seal) = bytes.split_at(bytes.len() - 32);
    if Sha256::digest(body).as_slice() != seal {
        bail!("checksum mismatch (the file was truncated or modified)");
    }
    ensure!(&body[8..40] == fingerprint, "written for other settings (fingerprint mismatch)");
    let count = u64::from_le_bytes(body[40..48].try_into()?) as usize;
    ensure!(body.len() == HEADER + count * RECORD, "length does not match its entry count {count}");
    let u32_at = |b: &[u8], at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
    Ok(body[HEADER..]
        .chunks_exact(RECORD)
        .map(|r| {
            let key: Key = r[..32].try_into().unwrap();
            let e = Entry {
                chosen: f32::from_bits(u32_at(r, 32)),
                rejected: f32::from_bits(u32_at(r, 36)),
                chosen_tokens: u32_at(r, 40),
                rejected_tokens: u32_at(r, 44),
            };
            (key, e)
        })
        .collect())
}
