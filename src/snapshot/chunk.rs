//! Chunk objects: one fixed-size piece of a volume, compressed, named by its hash.
//!
//! Format, version 1 (never changes; a new format gets a new version):
//!
//! ```text
//! 0   4  magic "STCK"
//! 4   1  version (1)
//! 5   1  codec (0 none, 1 zstd)
//! 6   1  crypto (0 none, 1 AES-256-GCM: payload = nonce, ciphertext, tag; see `crypto`)
//! 7   1  reserved (0)
//! 8   4  raw length, little endian
//! 12  4  CRC32 of the payload, little endian
//! 16  .. payload
//! ```
//!
//! The object key is `chunks/<aa>/<bb>/<hex>` where `<hex>` is the BLAKE3 of the raw bytes (keyed,
//! in an encrypted lineage); a read checks the CRC (transport damage), opens the seal when
//! encrypted, and then checks the name of the decoded bytes (the right chunk). Callers go through
//! [`super::crypto::ChunkCodec`], which picks plaintext or sealed per snapshot.

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

/// `crypto` byte of a plaintext chunk.
pub const CRYPTO_NONE: u8 = 0;
/// `crypto` byte of a chunk sealed with AES-256-GCM (see [`super::crypto`]).
pub const CRYPTO_AES_256_GCM: u8 = 1;
/// Length of the header part that sealed chunks authenticate (everything but the CRC).
pub const AAD_HEADER: usize = 12;

/// The parsed header of a chunk object.
pub struct Header {
    /// Its first [`AAD_HEADER`] bytes as stored.
    pub bytes: [u8; AAD_HEADER],
    /// 0 none, 1 zstd.
    pub codec: u8,
    /// [`CRYPTO_NONE`] or [`CRYPTO_AES_256_GCM`].
    pub crypto: u8,
    /// Length of the raw chunk.
    pub raw_len: usize,
}

/// Compresses raw bytes when it helps: (codec, payload).
pub fn compress(raw: &[u8], level: i32) -> (u8, std::borrow::Cow<'_, [u8]>) {
    let compressed = if worth_compressing(raw, level) {
        zstd::bulk::compress(raw, level)
            .ok()
            .filter(|c| c.len() < raw.len())
    } else {
        None
    };
    match compressed {
        Some(c) => (1, std::borrow::Cow::Owned(c)),
        None => (0, std::borrow::Cow::Borrowed(raw)),
    }
}

/// The authenticated part of a header.
pub fn header(codec: u8, crypto: u8, raw_len: usize) -> [u8; AAD_HEADER] {
    let mut h = [0u8; AAD_HEADER];
    h[..4].copy_from_slice(MAGIC);
    h[4] = VERSION;
    h[5] = codec;
    h[6] = crypto;
    h[8..12].copy_from_slice(&(raw_len as u32).to_le_bytes());
    h
}

/// A chunk object: header, CRC of the payload, payload.
pub fn assemble(header: [u8; AAD_HEADER], payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(&header);
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    Bytes::from(out)
}

/// Encodes raw bytes as a plaintext chunk object (zstd when it helps).
pub fn encode(raw: &[u8], level: i32) -> Bytes {
    let (codec, payload) = compress(raw, level);
    assemble(header(codec, CRYPTO_NONE, raw.len()), &payload)
}

/// Checks the frame of the object stored as `expected` (magic, version, CRC): its header and payload.
pub fn split<'a>(expected: &Hash, data: &'a [u8]) -> Result<(Header, &'a [u8]), ChunkError> {
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
    let crc = u32::from_le_bytes(data[12..16].try_into().expect("4 bytes"));
    let payload = &data[HEADER..];
    if crc32fast::hash(payload) != crc {
        return Err(corrupt("payload checksum mismatch"));
    }
    let header = Header {
        bytes: data[..AAD_HEADER].try_into().expect("12 bytes"),
        codec: data[5],
        crypto: data[6],
        raw_len: u32::from_le_bytes(data[8..12].try_into().expect("4 bytes")) as usize,
    };
    Ok((header, payload))
}

/// Undoes [`compress`].
pub fn decompress(
    expected: &Hash,
    codec: u8,
    raw_len: usize,
    payload: Vec<u8>,
) -> Result<Vec<u8>, ChunkError> {
    let corrupt = |reason: &str| ChunkError::Corrupt {
        hash: hex(expected),
        reason: reason.to_owned(),
    };
    let raw = match codec {
        0 => payload,
        1 => zstd::bulk::decompress(&payload, raw_len).map_err(|e| corrupt(&format!("zstd: {e}")))?,
        c => return Err(corrupt(&format!("unknown codec {c}"))),
    };
    if raw.len() != raw_len {
        return Err(corrupt("decoded length differs from header"));
    }
    Ok(raw)
}

/// Decodes a plaintext chunk object and checks that it is the chunk `expected`.
pub fn decode(expected: &Hash, data: &[u8]) -> Result<Vec<u8>, ChunkError> {
    let (header, payload) = split(expected, data)?;
    if header.crypto != CRYPTO_NONE {
        return Err(ChunkError::Corrupt {
            hash: hex(expected),
            reason: "encrypted chunk, no key given".into(),
        });
    }
    let raw = decompress(expected, header.codec, header.raw_len, payload.to_vec())?;
    if &hash(&raw) != expected {
        return Err(ChunkError::Corrupt {
            hash: hex(expected),
            reason: "content does not match its hash".into(),
        });
    }
    Ok(raw)
}

/// The object with its CRC recomputed (tests of what the CRC alone would not catch).
#[cfg(test)]
pub(crate) fn with_fresh_crc(obj: &[u8]) -> Vec<u8> {
    let mut v = obj.to_vec();
    let crc = crc32fast::hash(&v[HEADER..]);
    v[12..16].copy_from_slice(&crc.to_le_bytes());
    v
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
