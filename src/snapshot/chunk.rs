//! Chunk objects: one fixed-size piece of a volume, compressed, named by its hash.
//!
//! Format, version 1 (never changes; a new format gets a new version):
//!
//! ```text
//! 0   4  magic "STCK"
//! 4   1  version (1)
//! 5   1  codec (0 none, 1 zstd)
//! 6   1  crypto (0 none)
//! 7   1  reserved (0)
//! 8   4  raw length, little endian
//! 12  4  CRC32 of the payload, little endian
//! 16  .. payload
//! ```
//!
//! The object key is `chunks/<aa>/<bb>/<hex>` where `<hex>` is the BLAKE3 of the raw bytes; a read
//! checks the CRC (transport damage) and then the BLAKE3 of the decoded bytes (the right chunk).

use bytes::Bytes;

const MAGIC: &[u8; 4] = b"STCK";
const VERSION: u8 = 1;
const HEADER: usize = 16;

/// A 32-byte chunk hash.
pub type Hash = [u8; 32];

/// Errors decoding a chunk object.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    /// The object is damaged or not a chunk.
    #[error("chunk {hash} is corrupt: {reason}")]
    Corrupt {
        /// Hex hash the object was stored under.
        hash: String,
        /// What is wrong.
        reason: String,
    },
}

/// Hex form of a hash.
pub fn hex(h: &Hash) -> String {
    blake3::Hash::from_bytes(*h).to_hex().to_string()
}

/// The store key of a chunk.
pub fn key(h: &Hash) -> String {
    let x = hex(h);
    format!("chunks/{}/{}/{}", &x[..2], &x[2..4], x)
}

/// Parses the hash back out of a chunk key.
pub fn hash_of_key(key: &str) -> Option<Hash> {
    let name = key.rsplit('/').next()?;
    blake3::Hash::from_hex(name).ok().map(|h| *h.as_bytes())
}

/// The hash of raw chunk bytes.
pub fn hash(raw: &[u8]) -> Hash {
    *blake3::hash(raw).as_bytes()
}

/// True when every byte is zero (such chunks are recorded by absence, never stored).
pub fn is_zero(raw: &[u8]) -> bool {
    // Word-wise: this runs over every byte of every snapshot, and the optimizer vectorizes it.
    let mut words = raw.chunks_exact(8);
    words
        .by_ref()
        .all(|w| u64::from_ne_bytes(w.try_into().expect("8 bytes")) == 0)
        && words.remainder().iter().all(|&b| b == 0)
}

/// Random-looking data (media, encrypted or already compressed files) does not shrink: a sample
/// from the start and the middle decides, so such chunks cost no full compression attempt.
fn worth_compressing(raw: &[u8], level: i32) -> bool {
    const SAMPLE: usize = 64 << 10;
    if raw.len() <= 2 * SAMPLE {
        return true;
    }
    let mid = raw.len() / 2;
    [&raw[..SAMPLE], &raw[mid..mid + SAMPLE]].iter().any(|s| {
        zstd::bulk::compress(s, level)
            .map(|c| c.len() < SAMPLE * 9 / 10)
            .unwrap_or(false)
    })
}

/// Encodes raw bytes as a chunk object (zstd when it helps).
pub fn encode(raw: &[u8], level: i32) -> Bytes {
    let compressed = if worth_compressing(raw, level) {
        zstd::bulk::compress(raw, level)
            .ok()
            .filter(|c| c.len() < raw.len())
    } else {
        None
    };
    let (codec, payload): (u8, &[u8]) = match &compressed {
        Some(c) => (1, c),
        None => (0, raw),
    };
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[VERSION, codec, 0, 0]);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// Decodes a chunk object and checks that it is the chunk `expected`.
pub fn decode(expected: &Hash, data: &[u8]) -> Result<Vec<u8>, ChunkError> {
    let corrupt = |reason: &str| ChunkError::Corrupt {
        hash: hex(expected),
        reason: reason.to_owned(),
    };
    if data.len() < HEADER || &data[..4] != MAGIC {
        return Err(corrupt("not a chunk object"));
    }
    if data[4] != VERSION {
        return Err(corrupt(&format!("unsupported chunk version {}", data[4])));
    }
    if data[6] != 0 {
        return Err(corrupt("encrypted chunk, no key given"));
    }
    let raw_len = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(data[12..16].try_into().expect("4 bytes"));
    let payload = &data[HEADER..];
    if crc32fast::hash(payload) != crc {
        return Err(corrupt("payload checksum mismatch"));
    }
    let raw = match data[5] {
        0 => payload.to_vec(),
        1 => zstd::bulk::decompress(payload, raw_len).map_err(|e| corrupt(&format!("zstd: {e}")))?,
        c => return Err(corrupt(&format!("unknown codec {c}"))),
    };
    if raw.len() != raw_len {
        return Err(corrupt("decoded length differs from header"));
    }
    if &hash(&raw) != expected {
        return Err(corrupt("content does not match its hash"));
    }
    Ok(raw)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage_detected() {
        let raw: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let h = hash(&raw);
        let obj = encode(&raw, 1);
        assert!(obj.len() < raw.len(), "compressible data was not compressed");
        assert_eq!(decode(&h, &obj).unwrap(), raw);
        let mut bad = obj.to_vec();
        let n = bad.len();
        bad[n - 1] ^= 0x40;
        assert!(decode(&h, &bad).is_err());
        let other = hash(b"other");
        assert!(
            decode(&other, &obj).is_err(),
            "a chunk under the wrong name was accepted"
        );
        assert_eq!(hash_of_key(&key(&h)), Some(h));
        // Incompressible data is stored raw.
        let noise = crate::demo::pattern(65536, 1);
        let obj = encode(&noise, 1);
        assert_eq!(obj[5], 0);
        assert_eq!(decode(&hash(&noise), &obj).unwrap(), noise);
    }

    #[test]
    fn compressibility_is_sampled() {
        let noise = crate::demo::pattern(4 << 20, 3);
        assert_eq!(encode(&noise, 1)[5], 0, "random data is stored raw");
        let mut half = noise.clone();
        half[2 << 20..].fill(0);
        let obj = encode(&half, 1);
        assert_eq!(obj[5], 1, "half-zero data is compressed");
        assert!(obj.len() < 3 << 20);
        assert_eq!(decode(&hash(&half), &obj).unwrap(), half);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&[0u8; 4096]));
        let mut v = vec![0u8; 4096];
        v[4095] = 1;
        assert!(!is_zero(&v));
        v[4095] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
    }
}
