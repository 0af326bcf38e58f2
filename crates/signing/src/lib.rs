//! Ed25519 signatures of Brume WASM modules, and of the hub's messages to agents.
//!
//! Hub messages ([`SecretKey::sign_hub_message`], [`Keyring::verify_hub_message`]) are
//! signed over `b"brume-hub-message-v1\0" || topic || b"\0" || message` with the hub's
//! key (same key file format), so that an agent pinning it acts only on what a hub said,
//! on the topic it said it on. The rest of this page is about modules.
//!
//! A publisher signs a module with its secret key. The hub verifies the signature when
//! the module is uploaded, against its trusted publisher keys (`registry.trusted_keys`),
//! and an agent verifies it again before it loads a module it downloaded, against the
//! keys pinned in its own config (`fleet.trusted_keys`). Neither side relies on the other
//! having checked: a compromised hub or broker cannot make an agent run code that no
//! trusted publisher signed.
//!
//! # What is signed
//!
//! `b"brume-module-signature-v1\0" || sha256(module bytes)`. The prefix separates these
//! signatures from anything else the same key may ever sign; the digest covers every
//! byte, including the embedded manifest with the module's name and version. Signatures
//! are detached (a `.sig` file beside the `.wasm`, a header on upload, a field of the
//! desired state), so the signed bytes are exactly the bytes that run.
//!
//! # Text forms
//!
//! One line each, so that they paste into TOML, HTTP headers and shell variables:
//!
//! | What | Form |
//! |---|---|
//! | public key | `ed25519:<64 hex digits>` |
//! | key id | 16 hex digits: the first 8 bytes of sha256 of the public key |
//! | signature | `brume-sig-v1:<key id>:<128 hex digits>` |
//! | secret key file | `brume-secret-key-v1:<64 hex digits>` (the seed), mode 0600 |
//!
//! # Key rotation
//!
//! A [`Keyring`] holds any number of keys. To rotate: add the new public key to every
//! hub's and agent's trusted keys, sign new uploads with the new key, and remove the old
//! key once no deployed module is signed with it (the registry lists each module's key
//! id). A module signed with a key that is no longer trusted is refused on upload and
//! by agents at their next load; re-sign and upload it under a new version.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};

/// Domain separation prefix of every module signature.
const CONTEXT: &[u8] = b"brume-module-signature-v1\0";
/// Domain separation prefix of every signed hub message (`brume_protocol::SignedV1`).
const HUB_CONTEXT: &[u8] = b"brume-hub-message-v1\0";

/// What a hub signs for a message published on `topic`: the prefix, the topic, a NUL
/// (never part of an MQTT topic), the message.
fn hub_message(topic: &str, message: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(HUB_CONTEXT.len() + topic.len() + 1 + message.len());
    m.extend_from_slice(HUB_CONTEXT);
    m.extend_from_slice(topic.as_bytes());
    m.push(0);
    m.extend_from_slice(message);
    m
}

const PUBLIC_PREFIX: &str = "ed25519:";
const SIGNATURE_PREFIX: &str = "brume-sig-v1:";
const SECRET_PREFIX: &str = "brume-secret-key-v1:";

/// Why a key, signature or module was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// A text form does not parse.
    #[error("malformed {what}: {problem}")]
    Malformed {
        /// What was being parsed, e.g. `public key`.
        what: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The signature names a key that is not trusted here.
    #[error(
        "signed by key {key_id}, which is not among the trusted keys ({trusted}); add its public key to the trusted keys or sign with a trusted key"
    )]
    UntrustedKey {
        /// The signature's key id.
        key_id: KeyId,
        /// The trusted key ids, comma separated (`none` if empty).
        trusted: String,
    },
    /// The signature does not match the module under the key it names: the module was
    /// changed after signing, or the signature belongs to another module.
    #[error(
        "signature by key {key_id} does not match this module (sha256 {sha256}): the module or its signature was altered"
    )]
    Mismatch {
        /// The signature's key id.
        key_id: KeyId,
        /// Hex sha256 of the module that was checked.
        sha256: String,
    },
    /// A hub message's signature does not match it under the key it names: it was forged
    /// or altered, or published on another topic than the one it was signed for.
    #[error("hub message on {topic} is not signed by key {key_id}: forged, altered or moved from another topic")]
    HubMismatch {
        /// The key id the message names.
        key_id: KeyId,
        /// The topic it arrived on.
        topic: String,
    },
    /// Reading or writing a key file failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was being done, e.g. `reading secret key`.
        op: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The IO error.
        source: std::io::Error,
    },
}

/// Lower-case hex of `bytes`.
pub fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Parses exactly `N` bytes of hex (either case).
pub fn from_hex<const N: usize>(s: &str) -> Result<[u8; N], String> {
    if s.len() != 2 * N {
        return Err(format!("expected {} hex digits, got {}", 2 * N, s.len()));
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2).ok_or("not hex")?, 16)
            .map_err(|_| format!("{s:?} is not hex"))?;
    }
    Ok(out)
}

/// The sha256 of a module's bytes: what the registry and agents address it by.
pub fn module_digest(module: &[u8]) -> [u8; 32] {
    Sha256::digest(module).into()
}

fn message(sha256: &[u8; 32]) -> Vec<u8> {
    [CONTEXT, sha256.as_slice()].concat()
}

/// Names a public key: the first 8 bytes of its sha256.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; 8]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&to_hex(&self.0))
    }
}

impl FromStr for KeyId {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<KeyId, SignatureError> {
        from_hex::<8>(s).map(KeyId).map_err(|problem| SignatureError::Malformed { what: "key id", problem })
    }
}

/// A publisher's public key (`ed25519:<hex>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublicKey(VerifyingKey);

impl PublicKey {
    /// The key's id.
    pub fn id(&self) -> KeyId {
        let d = Sha256::digest(self.0.as_bytes());
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        KeyId(id)
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PUBLIC_PREFIX}{}", to_hex(self.0.as_bytes()))
    }
}

impl FromStr for PublicKey {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<PublicKey, SignatureError> {
        let bad = |problem: String| SignatureError::Malformed { what: "public key", problem };
        let hex = s
            .trim()
            .strip_prefix(PUBLIC_PREFIX)
            .ok_or_else(|| bad(format!("{s:?} does not start with {PUBLIC_PREFIX:?}")))?;
        let bytes = from_hex::<32>(hex).map_err(bad)?;
        VerifyingKey::from_bytes(&bytes).map(PublicKey).map_err(|e| bad(format!("not an ed25519 point: {e}")))
    }
}

/// A detached signature of one module (`brume-sig-v1:<key id>:<hex>`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signature {
    /// Which key made it.
    pub key_id: KeyId,
    /// The ed25519 signature over the signed message (see the crate docs).
    pub bytes: [u8; 64],
}

impl fmt::Display for Signature {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SIGNATURE_PREFIX}{}:{}", self.key_id, to_hex(&self.bytes))
    }
}

impl FromStr for Signature {
    type Err = SignatureError;
    fn from_str(s: &str) -> Result<Signature, SignatureError> {
        let bad = |problem: String| SignatureError::Malformed { what: "signature", problem };
        let rest = s
            .trim()
            .strip_prefix(SIGNATURE_PREFIX)
            .ok_or_else(|| bad(format!("does not start with {SIGNATURE_PREFIX:?}")))?;
        let (id, sig) = rest.split_once(':').ok_or_else(|| bad("expected <key id>:<signature>".into()))?;
        let key_id = from_hex::<8>(id).map(KeyId).map_err(|p| bad(format!("key id: {p}")))?;
        let bytes = from_hex::<64>(sig).map_err(bad)?;
        Ok(Signature { key_id, bytes })
    }
}

/// A publisher's secret key.
pub struct SecretKey(SigningKey);

impl fmt::Debug for SecretKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the seed.
        write!(f, "SecretKey({})", self.public().id())
    }
}

impl SecretKey {
    /// A new random key, from the operating system's generator (through rand's
    /// thread-local CSPRNG, seeded from it).
    pub fn generate() -> SecretKey {
        SecretKey(SigningKey::from_bytes(&rand::random::<[u8; 32]>()))
    }

    /// Its public key.
    pub fn public(&self) -> PublicKey {
        PublicKey(self.0.verifying_key())
    }

    /// Signs a module.
    pub fn sign(&self, module: &[u8]) -> Signature {
        self.sign_digest(&module_digest(module))
    }

    /// Signs a module given its sha256.
    pub fn sign_digest(&self, sha256: &[u8; 32]) -> Signature {
        Signature { key_id: self.public().id(), bytes: self.0.sign(&message(sha256)).to_bytes() }
    }

    /// Signs a hub message published on `topic` (see `brume_protocol::SignedV1`).
    /// Returns the key id and the signature.
    pub fn sign_hub_message(&self, topic: &str, message: &[u8]) -> (KeyId, [u8; 64]) {
        (self.public().id(), self.0.sign(&hub_message(topic, message)).to_bytes())
    }

    /// The key file's text (`brume-secret-key-v1:<hex seed>`).
    pub fn to_file_text(&self) -> String {
        format!("{SECRET_PREFIX}{}\n", to_hex(self.0.as_bytes()))
    }

    /// Parses [`to_file_text`](Self::to_file_text).
    pub fn from_file_text(text: &str) -> Result<SecretKey, SignatureError> {
        let bad = |problem: String| SignatureError::Malformed { what: "secret key", problem };
        let hex = text
            .trim()
            .strip_prefix(SECRET_PREFIX)
            .ok_or_else(|| bad(format!("does not start with {SECRET_PREFIX:?}")))?;
        Ok(SecretKey(SigningKey::from_bytes(&from_hex::<32>(hex).map_err(bad)?)))
    }

    /// Reads a key file.
    pub fn read(path: &Path) -> Result<SecretKey, SignatureError> {
        let text = std::fs::read_to_string(path).map_err(|source| SignatureError::Io {
            op: "reading secret key",
            path: path.to_owned(),
            source,
        })?;
        SecretKey::from_file_text(&text)
    }

    /// Writes a new key file, readable by its owner only. Never overwrites: an existing
    /// file is an error, since replacing a key loses the ability to sign as it.
    pub fn write_new(&self, path: &Path) -> Result<(), SignatureError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| SignatureError::Io { op: "writing secret key", path: path.to_owned(), source };
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(io)?;
        f.write_all(self.to_file_text().as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)
    }
}

/// The public keys trusted to sign modules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Keyring {
    keys: Vec<PublicKey>,
}

impl Keyring {
    /// A keyring of these keys.
    pub fn new(keys: Vec<PublicKey>) -> Keyring {
        Keyring { keys }
    }

    /// Parses `ed25519:<hex>` strings, naming the position of a bad one.
    pub fn parse<S: AsRef<str>>(keys: &[S]) -> Result<Keyring, SignatureError> {
        let keys = keys
            .iter()
            .enumerate()
            .map(|(i, k)| {
                k.as_ref().parse::<PublicKey>().map_err(|e| SignatureError::Malformed {
                    what: "trusted key",
                    problem: format!("entry {}: {e}", i + 1),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Keyring { keys })
    }

    /// True if no key is trusted (every signature is refused).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The trusted keys.
    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Checks that `sig` is a trusted key's signature of the module whose sha256 is
    /// `sha256`. The caller computes the digest of the bytes it is about to use, so a
    /// signature can never vouch for other bytes. Uses ed25519's strict verification
    /// (no malleable or small-order encodings).
    pub fn verify(&self, sha256: &[u8; 32], sig: &Signature) -> Result<KeyId, SignatureError> {
        let key = self.find(sig.key_id)?;
        let s = ed25519_dalek::Signature::from_bytes(&sig.bytes);
        key.0
            .verify_strict(&message(sha256), &s)
            .map(|()| sig.key_id)
            .map_err(|_| SignatureError::Mismatch { key_id: sig.key_id, sha256: to_hex(sha256) })
    }

    /// Checks that `signature` is a trusted key's signature of a hub message published on
    /// `topic` (see [`SecretKey::sign_hub_message`]), with strict verification.
    pub fn verify_hub_message(
        &self,
        topic: &str,
        message: &[u8],
        key_id: KeyId,
        signature: &[u8],
    ) -> Result<KeyId, SignatureError> {
        let key = self.find(key_id)?;
        let bytes: [u8; 64] = signature.try_into().map_err(|_| SignatureError::Malformed {
            what: "hub signature",
            problem: format!("{} bytes, expected 64", signature.len()),
        })?;
        key.0
            .verify_strict(&hub_message(topic, message), &ed25519_dalek::Signature::from_bytes(&bytes))
            .map(|()| key_id)
            .map_err(|_| SignatureError::HubMismatch { key_id, topic: topic.to_owned() })
    }

    fn find(&self, key_id: KeyId) -> Result<&PublicKey, SignatureError> {
        self.keys.iter().find(|k| k.id() == key_id).ok_or_else(|| SignatureError::UntrustedKey {
            key_id,
            trusted: if self.keys.is_empty() {
                "none".into()
            } else {
                self.keys.iter().map(|k| k.id().to_string()).collect::<Vec<_>>().join(", ")
            },
        })
    }

    /// [`verify`](Self::verify) of a module's bytes.
    pub fn verify_module(&self, module: &[u8], sig: &Signature) -> Result<KeyId, SignatureError> {
        self.verify(&module_digest(module), sig)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hub_messages_verify_only_on_their_topic_and_bytes() {
        let key = SecretKey::generate();
        let ring = Keyring::new(vec![key.public()]);
        let (id, sig) = key.sign_hub_message("brume/v1/agents/a1/acks", b"ack");
        assert_eq!(ring.verify_hub_message("brume/v1/agents/a1/acks", b"ack", id, &sig).unwrap(), id);
        // Another agent's topic, other bytes, a flipped bit, a short signature, another key.
        for (topic, msg) in [("brume/v1/agents/a2/acks", &b"ack"[..]), ("brume/v1/agents/a1/acks", b"acj")] {
            assert!(matches!(ring.verify_hub_message(topic, msg, id, &sig), Err(SignatureError::HubMismatch { .. })));
        }
        let mut bad = sig;
        bad[10] ^= 1;
        assert!(ring.verify_hub_message("brume/v1/agents/a1/acks", b"ack", id, &bad).is_err());
        assert!(matches!(
            ring.verify_hub_message("brume/v1/agents/a1/acks", b"ack", id, &sig[..63]),
            Err(SignatureError::Malformed { .. })
        ));
        let other = SecretKey::generate();
        let (oid, osig) = other.sign_hub_message("brume/v1/agents/a1/acks", b"ack");
        assert!(matches!(
            ring.verify_hub_message("brume/v1/agents/a1/acks", b"ack", oid, &osig),
            Err(SignatureError::UntrustedKey { .. })
        ));
        // The same key id with another key's signature.
        assert!(ring.verify_hub_message("brume/v1/agents/a1/acks", b"ack", id, &osig).is_err());
        // A module signature of the same bytes is not a hub message signature.
        let msig = key.sign(b"ack");
        assert!(ring.verify_hub_message("brume/v1/agents/a1/acks", b"ack", id, &msig.bytes).is_err());
    }

    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_signature_verifies_under_its_key_only() {
        let key = SecretKey::generate();
        let other = SecretKey::generate();
        let ring = Keyring::new(vec![key.public()]);
        let module = b"\0asm\x01\0\0\0 pretend module";
        let sig = key.sign(module);
        assert_eq!(ring.verify_module(module, &sig).unwrap(), key.public().id());

        let err = ring.verify_module(module, &other.sign(module)).unwrap_err();
        assert!(matches!(err, SignatureError::UntrustedKey { .. }), "{err}");
        assert!(err.to_string().contains(&key.public().id().to_string()), "names the trusted keys: {err}");

        // Another key's signature bytes under this key's id: a mismatch, not a pass.
        let forged = Signature { key_id: key.public().id(), bytes: other.sign(module).bytes };
        assert!(matches!(ring.verify_module(module, &forged), Err(SignatureError::Mismatch { .. })));

        let err = Keyring::default().verify_module(module, &sig).unwrap_err();
        assert!(err.to_string().contains("(none)"), "{err}");
    }

    #[test]
    fn text_forms_round_trip_and_bad_ones_say_what_is_wrong() {
        let key = SecretKey::generate();
        let public: PublicKey = key.public().to_string().parse().unwrap();
        assert_eq!(public, key.public());
        let sig = key.sign(b"x");
        assert_eq!(sig.to_string().parse::<Signature>().unwrap(), sig);
        let again = SecretKey::from_file_text(&key.to_file_text()).unwrap();
        assert_eq!(again.public(), key.public());
        assert!(!format!("{key:?}").contains(&to_hex(key.0.as_bytes())), "Debug never shows the seed");

        let err = "ed25519:abcd".parse::<PublicKey>().unwrap_err().to_string();
        assert!(err.contains("public key") && err.contains("64 hex digits"), "{err}");
        let err = "rsa:00".parse::<PublicKey>().unwrap_err().to_string();
        assert!(err.contains("ed25519:"), "{err}");
        let err = Keyring::parse(&[public.to_string(), "nope".into()]).unwrap_err().to_string();
        assert!(err.contains("entry 2"), "{err}");
        let err = "brume-sig-v1:zz:00".parse::<Signature>().unwrap_err().to_string();
        assert!(err.contains("key id"), "{err}");
    }

    #[test]
    fn key_files_are_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("publisher.key");
        let key = SecretKey::generate();
        key.write_new(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert_eq!(SecretKey::read(&path).unwrap().public(), key.public());
        let err = SecretKey::generate().write_new(&path).unwrap_err();
        assert!(matches!(err, SignatureError::Io { .. }), "{err}");
        assert_eq!(SecretKey::read(&path).unwrap().public(), key.public(), "the first key is still there");
    }

    proptest! {
        #[test]
        fn any_changed_byte_breaks_the_signature(module in proptest::collection::vec(any::<u8>(), 1..512), at in any::<prop::sample::Index>(), flip in 1u8..=255) {
            let key = SecretKey::generate();
            let ring = Keyring::new(vec![key.public()]);
            let sig = key.sign(&module);
            let mut tampered = module.clone();
            let i = at.index(tampered.len());
            tampered[i] ^= flip;
            let mismatch = matches!(ring.verify_module(&tampered, &sig), Err(SignatureError::Mismatch { .. }));
            prop_assert!(mismatch);
            prop_assert!(ring.verify_module(&module, &sig).is_ok());
        }

        #[test]
        fn parsers_never_panic(s in ".{0,200}") {
            let _ = s.parse::<PublicKey>();
            let _ = s.parse::<Signature>();
            let _ = s.parse::<KeyId>();
            let _ = SecretKey::from_file_text(&s);
        }
    }
}
