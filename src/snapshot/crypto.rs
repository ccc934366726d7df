//! Snapshot encryption: key-encryption keys, per-lineage data keys, and the chunk codec that every
//! path moving chunk bytes goes through (upload, restore, lazy hydration, fast-restore images,
//! verify, bench).
//!
//! Keys:
//!
//! * A **key-encryption key** (KEK, 256 bits) belongs to the user: a Kubernetes Secret named by the
//!   snapshot or storage class (its `encryptionKey` entry), or a key file for the CLI. Strata never
//!   stores it; a manifest holds only its fingerprint (a keyed hash that reveals nothing about it).
//! * Each encrypted **lineage** has its own random **data key** (DEK), stored in every manifest
//!   only wrapped by a KEK (AES-256-GCM, the lineage id as associated data). Re-wrapping it under a
//!   new KEK rotates the key without touching a chunk.
//!
//! Chunks of an encrypted lineage are compressed, then sealed with AES-256-GCM under the data key
//! with a random 96-bit nonce; the header and the chunk's name are associated data, so an object
//! altered, moved to another name or taken from another lineage fails to open. Names are BLAKE3
//! keyed by a key derived from the data key: the store learns nothing about the plaintext, and
//! chunks still deduplicate within the lineage.

use base64::Engine as _;
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};

use super::chunk::{self, ChunkError, Hash};
use crate::proto::store::{Encryption, Manifest};

/// The only scheme so far: AES-256-GCM chunks, keyed BLAKE3 names, data key wrapped by AES-256-GCM.
pub const SCHEME: &str = "aes-256-gcm";

/// The entry of a CSI secret (snapshotter, provisioner, group snapshotter) holding the KEK.
pub const SECRET_KEY_ENTRY: &str = "encryptionKey";

const TAG_LEN: usize = 16;

/// Errors about keys. Messages name keys by fingerprint only, never by value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KeyError {
    /// The snapshot is encrypted and no key was given.
    #[error(
        "snapshot {snapshot} is encrypted (key {fingerprint}) and no key was given: name the \
         Secret holding it (entry `{SECRET_KEY_ENTRY}`) in the class, or pass --key-file"
    )]
    Missing {
        /// The snapshot.
        snapshot: String,
        /// Fingerprint of the key that wraps its data key.
        fingerprint: String,
    },
    /// The key given does not open the snapshot's data key.
    #[error("snapshot {snapshot} is encrypted with key {want}; the key given ({got}) is not that key")]
    Wrong {
        /// The snapshot.
        snapshot: String,
        /// Fingerprint the manifest records.
        want: String,
        /// Fingerprint of the key given.
        got: String,
    },
    /// A key given is not a 256-bit key.
    #[error("{0}")]
    Invalid(String),
    /// The manifest's encryption record is damaged or of an unknown scheme.
    #[error("snapshot {snapshot}: {reason}")]
    Unsupported {
        /// The snapshot.
        snapshot: String,
        /// What is wrong.
        reason: String,
    },
}

/// A key-encryption key. Its `Debug` shows the fingerprint only.
#[derive(Clone)]
pub struct Kek([u8; 32]);

impl std::fmt::Debug for Kek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Kek({})", self.fingerprint())
    }
}

impl Kek {
    /// A key from its 32 bytes.
    pub fn from_bytes(b: [u8; 32]) -> Self {
        Self(b)
    }

    /// A key as written in a Secret or a key file: 64 hex digits or the base64 of 32 bytes
    /// (surrounding whitespace ignored), or exactly 32 raw bytes. `what` names the source in errors.
    pub fn parse(value: &[u8], what: &str) -> Result<Self, KeyError> {
        if value.len() == 32 && std::str::from_utf8(value).is_err() {
            return Ok(Self(value.try_into().expect("32 bytes")));
        }
        let text = std::str::from_utf8(value)
            .map_err(|_| KeyError::Invalid(format!("{what}: not a 256-bit key (not text, not 32 bytes)")))?
            .trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).ok()
        } else {
            base64::engine::general_purpose::STANDARD.decode(text).ok()
        };
        match bytes {
            Some(b) if b.len() == 32 => Ok(Self(b.try_into().expect("32 bytes"))),
            Some(b) => Err(KeyError::Invalid(format!(
                "{what}: a key must be 256 bits (32 bytes as 64 hex digits or base64); this one has {} bytes",
                b.len()
            ))),
            None => Err(KeyError::Invalid(format!(
                "{what}: a key must be 256 bits written as 64 hex digits or base64"
            ))),
        }
    }

    /// The key from a CSI secret map (`encryptionKey`); `None` when the map has no such entry.
    pub fn from_secrets(
        secrets: &std::collections::HashMap<String, String>,
        what: &str,
    ) -> Result<Option<Self>, KeyError> {
        match secrets.get(SECRET_KEY_ENTRY) {
            None => Ok(None),
            Some(v) => Self::parse(v.as_bytes(), &format!("{what} entry `{SECRET_KEY_ENTRY}`")).map(Some),
        }
    }

    /// A key read from a file (`strata ... --key-file`).
    pub fn from_file(path: &std::path::Path) -> Result<Self, KeyError> {
        let data = std::fs::read(path)
            .map_err(|e| KeyError::Invalid(format!("key file {}: {e}", path.display())))?;
        Self::parse(&data, &format!("key file {}", path.display()))
    }

    /// A fresh random key (for `strata key generate`).
    pub fn generate() -> Self {
        Self(random32())
    }

    /// The key as 64 hex digits (for `strata key generate` only).
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Names the key without revealing it: 16 hex digits of a keyed hash.
    pub fn fingerprint(&self) -> String {
        hex::encode(&blake3::derive_key("strata kek fingerprint v1", &self.0)[..8])
    }

    /// The raw bytes, for the agent API (sent only inside its TLS channel).
    pub fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// The data key of an encrypted lineage and its wrapped form. `Debug` shows no key material.
#[derive(Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LineageKey {
    /// The data key (hex).
    #[serde(with = "hex32")]
    data_key: [u8; 32],
    /// The data key wrapped by the KEK (nonce, ciphertext, tag).
    #[serde(with = "hex_vec")]
    pub wrapped: Vec<u8>,
    /// Fingerprint of the KEK that wraps it.
    pub kek_fingerprint: String,
}

impl std::fmt::Debug for LineageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LineageKey")
            .field("key_id", &self.key_id())
            .field("kek_fingerprint", &self.kek_fingerprint)
            .finish()
    }
}

fn random32() -> [u8; 32] {
    let mut k = [0u8; 32];
    SystemRandom::new().fill(&mut k).expect("system random");
    k
}

fn wrap_aad(lineage: &str) -> Vec<u8> {
    let mut aad = b"strata data key v1\0".to_vec();
    aad.extend_from_slice(lineage.as_bytes());
    aad
}

fn seal(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("256-bit key"));
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new().fill(&mut nonce).expect("system random");
    let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let tag = k
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_LEN..],
        )
        .expect("seal");
    out.extend_from_slice(tag.as_ref());
    out
}

fn open(key: &LessSafeKey, aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let nonce = Nonce::try_assume_unique_for_key(&sealed[..NONCE_LEN]).ok()?;
    let mut buf = sealed[NONCE_LEN..].to_vec();
    let n = key.open_in_place(nonce, Aad::from(aad), &mut buf).ok()?.len();
    buf.truncate(n);
    Some(buf)
}

impl LineageKey {
    /// A new data key for `lineage`, wrapped by `kek`.
    pub fn generate(kek: &Kek, lineage: &str) -> Self {
        let data_key = random32();
        Self {
            data_key,
            wrapped: seal(&kek.0, &wrap_aad(lineage), &data_key),
            kek_fingerprint: kek.fingerprint(),
        }
    }

    /// The same data key wrapped by another KEK (rotation).
    pub fn rewrapped(&self, kek: &Kek, lineage: &str) -> Self {
        Self {
            data_key: self.data_key,
            wrapped: seal(&kek.0, &wrap_aad(lineage), &self.data_key),
            kek_fingerprint: kek.fingerprint(),
        }
    }

    /// Opens the data key of manifest `m` with `kek`.
    pub fn unwrap(m: &Manifest, kek: Option<&Kek>) -> Result<Option<Self>, KeyError> {
        let Some(e) = &m.encryption else {
            return Ok(None);
        };
        check_scheme(m, e)?;
        let Some(kek) = kek else {
            return Err(KeyError::Missing {
                snapshot: m.snapshot_id.clone(),
                fingerprint: e.kek_fingerprint.clone(),
            });
        };
        let wrong = || KeyError::Wrong {
            snapshot: m.snapshot_id.clone(),
            want: e.kek_fingerprint.clone(),
            got: kek.fingerprint(),
        };
        let k = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &kek.0).expect("256-bit key"));
        let plain = open(&k, &wrap_aad(&m.lineage), &e.wrapped_key).ok_or_else(wrong)?;
        let data_key: [u8; 32] = plain.try_into().map_err(|_| wrong())?;
        let key = Self {
            data_key,
            wrapped: e.wrapped_key.clone(),
            kek_fingerprint: kek.fingerprint(),
        };
        if key.key_id() != e.key_id {
            return Err(wrong());
        }
        Ok(Some(key))
    }

    /// Names the data key without revealing it (recorded in manifests; tells lineages apart).
    pub fn key_id(&self) -> String {
        hex::encode(&blake3::derive_key("strata data key id v1", &self.data_key)[..8])
    }

    /// The manifest's record of this key.
    pub fn record(&self) -> Encryption {
        Encryption {
            scheme: SCHEME.into(),
            wrapped_key: self.wrapped.clone(),
            kek_fingerprint: self.kek_fingerprint.clone(),
            key_id: self.key_id(),
        }
    }
}

fn check_scheme(m: &Manifest, e: &Encryption) -> Result<(), KeyError> {
    if e.scheme != SCHEME {
        return Err(KeyError::Unsupported {
            snapshot: m.snapshot_id.clone(),
            reason: format!("unknown encryption scheme {:?}", e.scheme),
        });
    }
    Ok(())
}

/// The codec of a snapshot's chunks: [`ChunkCodec::Plain`] for plaintext manifests, sealed with the
/// lineage's data key otherwise. `key` must be that manifest's data key.
pub fn codec_for(m: &Manifest, key: Option<&LineageKey>) -> Result<ChunkCodec, KeyError> {
    let Some(e) = &m.encryption else {
        return Ok(ChunkCodec::Plain);
    };
    check_scheme(m, e)?;
    match key {
        None => Err(KeyError::Missing {
            snapshot: m.snapshot_id.clone(),
            fingerprint: e.kek_fingerprint.clone(),
        }),
        Some(k) if k.key_id() != e.key_id => Err(KeyError::Unsupported {
            snapshot: m.snapshot_id.clone(),
            reason: format!(
                "its data key is {}, the volume's is {}: another lineage's key",
                e.key_id,
                k.key_id()
            ),
        }),
        Some(k) => Ok(ChunkCodec::sealed(k)),
    }
}

/// Hashes, encodes and decodes chunks: plaintext, or sealed with a lineage's data key.
#[derive(Clone)]
pub enum ChunkCodec {
    /// BLAKE3 names, payload compressed only.
    Plain,
    /// Keyed BLAKE3 names, payload compressed then sealed.
    Sealed(std::sync::Arc<Sealed>),
}

impl std::fmt::Debug for ChunkCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Plain => write!(f, "Plain"),
            Self::Sealed(s) => write!(f, "Sealed({})", s.key_id),
        }
    }
}

/// The keys of an encrypted lineage's chunks.
pub struct Sealed {
    name_key: [u8; 32],
    aead: LessSafeKey,
    key_id: String,
}

impl ChunkCodec {
    /// The codec of an encrypted lineage.
    pub fn sealed(k: &LineageKey) -> Self {
        Self::Sealed(std::sync::Arc::new(Sealed {
            name_key: blake3::derive_key("strata chunk name v1", &k.data_key),
            aead: LessSafeKey::new(
                UnboundKey::new(
                    &AES_256_GCM,
                    &blake3::derive_key("strata chunk seal v1", &k.data_key),
                )
                .expect("256-bit key"),
            ),
            key_id: k.key_id(),
        }))
    }

    /// Whether chunks are sealed.
    pub fn encrypted(&self) -> bool {
        matches!(self, Self::Sealed(_))
    }

    /// The name (and store key hash) of raw chunk bytes.
    pub fn name(&self, raw: &[u8]) -> Hash {
        match self {
            Self::Plain => chunk::hash(raw),
            Self::Sealed(s) => *blake3::keyed_hash(&s.name_key, raw).as_bytes(),
        }
    }

    /// The stored object of raw chunk bytes named `name` (zstd level `level` when it helps).
    pub fn encode(&self, name: &Hash, raw: &[u8], level: i32) -> bytes::Bytes {
        match self {
            Self::Plain => chunk::encode(raw, level),
            Self::Sealed(s) => {
                let (codec, payload) = chunk::compress(raw, level);
                let header = chunk::header(codec, chunk::CRYPTO_AES_256_GCM, raw.len());
                let sealed = seal_with(&s.aead, &aad(&header, name), &payload);
                chunk::assemble(header, &sealed)
            }
        }
    }

    /// The raw bytes of the object stored under `expected`, checked to be that chunk.
    pub fn decode(&self, expected: &Hash, obj: &[u8]) -> Result<Vec<u8>, ChunkError> {
        let corrupt = |reason: &str| ChunkError::Corrupt {
            hash: chunk::hex(expected),
            reason: reason.to_owned(),
        };
        let raw = match self {
            Self::Plain => return chunk::decode(expected, obj),
            Self::Sealed(s) => {
                let (header, payload) = chunk::split(expected, obj)?;
                if header.crypto != chunk::CRYPTO_AES_256_GCM {
                    return Err(corrupt(
                        "stored in plaintext inside an encrypted snapshot: the object was replaced",
                    ));
                }
                let compressed = open(&s.aead, &aad(&header.bytes, expected), payload).ok_or_else(|| {
                    corrupt(
                        "does not open with the lineage's data key: the object was altered, \
                         or belongs to another lineage",
                    )
                })?;
                chunk::decompress(expected, header.codec, header.raw_len, compressed)?
            }
        };
        if &self.name(&raw) != expected {
            return Err(corrupt("content does not match its name"));
        }
        Ok(raw)
    }
}

fn aad(header: &[u8; chunk::AAD_HEADER], name: &Hash) -> Vec<u8> {
    let mut a = Vec::with_capacity(header.len() + name.len());
    a.extend_from_slice(header);
    a.extend_from_slice(name);
    a
}

fn seal_with(k: &LessSafeKey, aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new().fill(&mut nonce).expect("system random");
    let mut out = Vec::with_capacity(NONCE_LEN + plain.len() + TAG_LEN);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plain);
    let tag = k
        .seal_in_place_separate_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut out[NONCE_LEN..],
        )
        .expect("seal");
    out.extend_from_slice(tag.as_ref());
    out
}

mod hex32 {
    pub fn serialize<S: serde::Serializer>(v: &[u8; 32], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 32], D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        hex::decode(text)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| serde::de::Error::custom("not 32 bytes of hex"))
    }
}

mod hex_vec {
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(v))
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let text: String = serde::Deserialize::deserialize(d)?;
        hex::decode(text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(lineage: &str, key: Option<&LineageKey>) -> Manifest {
        Manifest {
            snapshot_id: "snap-1".into(),
            lineage: lineage.into(),
            encryption: key.map(LineageKey::record),
            ..Default::default()
        }
    }

    #[test]
    fn keys_parse_from_hex_base64_and_raw_and_nothing_else() {
        let k = Kek::generate();
        let hex = k.to_hex();
        let b64 = base64::engine::general_purpose::STANDARD.encode(k.bytes());
        for v in [format!("{hex}\n"), b64.clone(), format!("  {b64}  ")] {
            assert_eq!(
                Kek::parse(v.as_bytes(), "t").unwrap().fingerprint(),
                k.fingerprint()
            );
        }
        let mut raw = *k.bytes();
        raw[0] = 0xff; // not UTF-8
        assert!(Kek::parse(&raw, "t").is_ok());
        let short = base64::engine::general_purpose::STANDARD.encode([1u8; 16]);
        let e = Kek::parse(short.as_bytes(), "secret x").unwrap_err().to_string();
        assert!(e.contains("16 bytes") && e.contains("secret x"), "{e}");
        assert!(Kek::parse(b"hunter2", "t").is_err());
        assert!(!format!("{k:?}").contains(&hex), "Debug shows the key");
    }

    #[test]
    fn data_keys_open_only_with_their_kek_and_lineage() {
        let kek = Kek::generate();
        let dk = LineageKey::generate(&kek, "lin-a");
        let m = manifest("lin-a", Some(&dk));
        let opened = LineageKey::unwrap(&m, Some(&kek)).unwrap().unwrap();
        assert_eq!(opened.key_id(), dk.key_id());
        assert!(matches!(
            LineageKey::unwrap(&m, None),
            Err(KeyError::Missing { .. })
        ));
        let other = Kek::generate();
        let e = LineageKey::unwrap(&m, Some(&other)).unwrap_err();
        assert!(matches!(e, KeyError::Wrong { .. }), "{e}");
        assert!(e.to_string().contains(&kek.fingerprint()));
        // The wrapped key moved to another lineage's manifest does not open.
        let moved = manifest("lin-b", Some(&dk));
        assert!(LineageKey::unwrap(&moved, Some(&kek)).is_err());
        // Rotation: same data key, opened by the new KEK only.
        let rotated = dk.rewrapped(&other, "lin-a");
        let m2 = manifest("lin-a", Some(&rotated));
        assert_eq!(
            LineageKey::unwrap(&m2, Some(&other)).unwrap().unwrap().key_id(),
            dk.key_id()
        );
        assert!(LineageKey::unwrap(&m2, Some(&kek)).is_err());
        assert!(!format!("{dk:?}").contains(&hex::encode(dk.data_key)));
        assert_eq!(LineageKey::unwrap(&manifest("lin-a", None), None).unwrap(), None);
    }

    #[test]
    fn sealed_chunks_round_trip_and_refuse_tampering_swaps_and_plaintext() {
        let kek = Kek::generate();
        let a = ChunkCodec::sealed(&LineageKey::generate(&kek, "lin-a"));
        let b = ChunkCodec::sealed(&LineageKey::generate(&kek, "lin-b"));
        let raw: Vec<u8> = (0..200_000u32).map(|i| (i % 253) as u8).collect();
        let name = a.name(&raw);
        assert_ne!(name, chunk::hash(&raw), "names must be keyed");
        assert_ne!(name, b.name(&raw), "lineages must name chunks apart");
        let obj = a.encode(&name, &raw, 1);
        assert!(obj.len() < raw.len() / 2, "compressed before sealing");
        assert!(
            !obj.windows(64)
                .any(|w| raw.windows(64).take(4096).any(|r| r == w)),
            "plaintext visible in the object"
        );
        assert_eq!(a.decode(&name, &obj).unwrap(), raw);
        // Two encodings of one chunk differ (fresh nonces).
        assert_ne!(a.encode(&name, &raw, 1), obj);
        let mut bad = obj.to_vec();
        let n = bad.len();
        bad[n - 20] ^= 1;
        // The CRC catches it first; recomputing the CRC the GCM tag still does.
        assert!(a.decode(&name, &bad).is_err());
        let fixed = chunk::with_fresh_crc(&bad);
        let e = a.decode(&name, &fixed).unwrap_err().to_string();
        assert!(e.contains("altered"), "{e}");
        // Another lineage's object, or this object under another name.
        let other = b.encode(&b.name(&raw), &raw, 1);
        assert!(a.decode(&name, &other).is_err());
        let raw2 = vec![7u8; 4096];
        let name2 = a.name(&raw2);
        assert!(a.decode(&name2, &obj).is_err());
        // A plaintext object planted under an encrypted name.
        let plain = chunk::encode(&raw, 1);
        let e = a.decode(&name, &plain).unwrap_err().to_string();
        assert!(e.contains("plaintext"), "{e}");
        // And a sealed object read without a key.
        let e = ChunkCodec::Plain.decode(&name, &obj).unwrap_err().to_string();
        assert!(e.contains("encrypted"), "{e}");
    }
}
