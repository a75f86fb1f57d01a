//! Secure aggregation: the coordinator learns only the sum of the hospitals' vectors, never one
//! hospital's vector.
//!
//! Every hospital holds an X25519 key pair; the public keys of all taking part (the roster) are
//! known to all before anyone uploads. Each pair of hospitals (i, j) derives the same secret
//! seed from its Diffie-Hellman secret, the run's session name and the two names, without
//! talking to each other. A hospital turns its vector into 64-bit fixed point (2^-32 units) and
//! adds, modulo 2^64, for every other hospital j a pseudo-random mask stream from their pair's
//! seed: with a plus sign when its name sorts before j's, a minus sign after. Summed over all
//! hospitals every mask meets its negative and cancels, leaving the sum of the vectors exactly
//! (up to the fixed-point rounding of each entry, 1.2e-10). A single masked upload is a uniform
//! random 64-bit word per entry to anyone without the pair seeds.
//!
//! A hospital that never uploads leaves its pairs' masks in the others' uploads. Each surviving
//! hospital then publishes a dropout share: its pair seed with the dropped one (nothing else),
//! and the coordinator removes those masks. Nobody waits on a dropped hospital: the others'
//! shares are all the merge needs. What this does not defend: a coordinator that claims a
//! hospital dropped while holding its upload would unmask it with the shares (Bonawitz et al.
//! 2017 add a second, self mask for that); the merge therefore refuses an upload from a
//! hospital whose masks were revealed. Sessions must not repeat: two uploads under the same
//! masks give away their difference.

use std::collections::BTreeMap;
use std::path::Path;

use rand::RngCore;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey, StaticSecret};

/// Metadata key of a masked vector: what it was masked for (the trainer's `MaskedFor`).
pub const MASKED_KEY: &str = "secure_sum";

/// Units per 1.0 of the fixed-point encoding.
pub const FIXED_SCALE: f64 = 4_294_967_296.0;
/// Largest magnitude a vector entry (or a sum of them) may have in fixed point.
pub const FIXED_LIMIT: f64 = 2_147_483_647.0;

/// Why a key, a roster or a share was refused.
#[derive(Debug, thiserror::Error)]
pub enum SecureError {
    /// A key file could not be read or written, or is not a key.
    #[error("key {path}: {message}")]
    Key { path: String, message: String },
    /// The roster is not a map of names to public keys, or lacks a name.
    #[error("roster: {0}")]
    Roster(String),
    /// A masked vector or a share does not fit the others.
    #[error("{0}")]
    Mismatch(String),
}

/// A hospital's private X25519 key.
pub struct HospitalKey(StaticSecret);

impl std::fmt::Debug for HospitalKey {
    /// Shows the public half only: a private key never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HospitalKey(public {})", self.public_hex())
    }
}

impl HospitalKey {
    /// A new key from the operating system's randomness.
    pub fn generate() -> Self {
        let mut bytes = [0u8; 32];
        rand::rng().fill_bytes(&mut bytes);
        HospitalKey(StaticSecret::from(bytes))
    }

    /// Reads a key written by [`HospitalKey::save`] (64 hex digits).
    pub fn load(path: &Path) -> Result<Self, SecureError> {
        let err = |message: String| SecureError::Key { path: path.display().to_string(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        let bytes: [u8; 32] = hex::decode(text.trim()).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| err("not 64 hex digits".into()))?;
        Ok(HospitalKey(StaticSecret::from(bytes)))
    }

    /// Writes the key (readable by its owner only) and refuses to overwrite one.
    pub fn save(&self, path: &Path) -> Result<(), SecureError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let err = |e: std::io::Error| SecureError::Key { path: path.display().to_string(), message: e.to_string() };
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(err)?;
        f.write_all(hex::encode(self.0.to_bytes()).as_bytes()).map_err(err)
    }

    /// The public key, as the roster lists it (64 hex digits).
    pub fn public_hex(&self) -> String {
        hex::encode(PublicKey::from(&self.0).as_bytes())
    }
}

/// Every hospital taking part, by shard name, with its public key.
#[derive(Clone, Debug, PartialEq)]
pub struct Roster(BTreeMap<String, PublicKey>);

impl Roster {
    /// Parses a YAML or JSON map `shard: <public key hex>`.
    pub fn parse(text: &str) -> Result<Self, SecureError> {
        let map: BTreeMap<String, String> = serde_yaml::from_str(text).map_err(|e| SecureError::Roster(e.to_string()))?;
        let mut keys = BTreeMap::new();
        for (name, key) in map {
            let bytes: [u8; 32] = hex::decode(key.trim()).ok().and_then(|b| b.try_into().ok()).ok_or_else(|| SecureError::Roster(format!("{name}: the public key is not 64 hex digits")))?;
            keys.insert(name, PublicKey::from(bytes));
        }
        if keys.len() < 2 {
            return Err(SecureError::Roster("a sum needs at least two hospitals".into()));
        }
        Ok(Roster(keys))
    }

    /// Reads [`Roster::parse`]'s format from a file.
    pub fn load(path: &Path) -> Result<Self, SecureError> {
        Roster::parse(&std::fs::read_to_string(path).map_err(|e| SecureError::Roster(format!("{}: {e}", path.display())))?)
    }

    /// The hospitals' names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.0.keys().cloned().collect()
    }

    fn key(&self, name: &str) -> Result<&PublicKey, SecureError> {
        self.0.get(name).ok_or_else(|| SecureError::Roster(format!("{name} is not in the roster ({})", self.names().join(", "))))
    }

    /// The seed hospital `me` (holding `key`) shares with `peer` in `session`; `peer` derives
    /// the same one from its own key and `me`'s public key.
    pub fn pair_seed(&self, me: &str, key: &HospitalKey, peer: &str, session: &str) -> Result<PairSeed, SecureError> {
        if PublicKey::from(&key.0) != *self.key(me)? {
            return Err(SecureError::Roster(format!("the key given is not {me}'s key in the roster")));
        }
        let shared = key.0.diffie_hellman(self.key(peer)?);
        let (first, second) = if me < peer { (me, peer) } else { (peer, me) };
        let mut h = Sha256::new();
        for part in ["medmerge secure sum v1", session, first, second] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part.as_bytes());
        }
        h.update(shared.as_bytes());
        Ok(PairSeed(h.finalize().into()))
    }
}

/// The secret two hospitals share for one session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PairSeed(pub [u8; 32]);

impl PairSeed {
    /// The pair's mask stream for tensor `tensor`: independent per tensor, so masks are made
    /// and removed one tensor at a time.
    pub fn stream(&self, tensor: &str) -> ChaCha20Rng {
        let mut h = Sha256::new();
        h.update(self.0);
        h.update(tensor.as_bytes());
        ChaCha20Rng::from_seed(h.finalize().into())
    }
}

/// The sign of the masks `me` adds for its pair with `peer`: + when `me` sorts first.
pub fn mask_sign(me: &str, peer: &str) -> bool {
    me < peer
}

/// What a surviving hospital publishes when `dropped` never uploaded: their pair's seed, with
/// which the coordinator removes the masks that pair left in the survivor's upload.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropoutShare {
    /// The run's session name.
    pub session: String,
    /// The surviving hospital that publishes it.
    pub from: String,
    /// The hospital that dropped out.
    pub dropped: String,
    /// Their pair seed (hex).
    pub seed: String,
}

impl DropoutShare {
    /// `me`'s share for `dropped` in `session`.
    pub fn new(roster: &Roster, me: &str, key: &HospitalKey, dropped: &str, session: &str) -> Result<Self, SecureError> {
        let seed = roster.pair_seed(me, key, dropped, session)?;
        Ok(DropoutShare { session: session.into(), from: me.into(), dropped: dropped.into(), seed: hex::encode(seed.0) })
    }

    /// The pair seed it reveals.
    pub fn pair_seed(&self) -> Result<PairSeed, SecureError> {
        hex::decode(&self.seed)
            .ok()
            .and_then(|b| b.try_into().ok())
            .map(PairSeed)
            .ok_or_else(|| SecureError::Mismatch(format!("share of {} about {}: the seed is not 64 hex digits", self.from, self.dropped)))
    }
}

/// `x` in fixed point (two's complement in 64 bits), or None when it is not finite or too large.
pub fn to_fixed(x: f32) -> Option<u64> {
    let scaled = (x as f64 * FIXED_SCALE).round();
    (x.is_finite() && scaled.abs() <= FIXED_LIMIT * FIXED_SCALE).then_some(scaled as i64 as u64)
}

/// A fixed-point word (or a sum of them) back as a number.
pub fn from_fixed(word: u64) -> f64 {
    word as i64 as f64 / FIXED_SCALE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roster(keys: &[(&str, &HospitalKey)]) -> Roster {
        Roster::parse(&keys.iter().map(|(n, k)| format!("{n}: {}\n", k.public_hex())).collect::<String>()).unwrap()
    }

    #[test]
    fn both_hospitals_of_a_pair_derive_the_same_seed_and_other_pairs_or_sessions_do_not() {
        let (a, b, c) = (HospitalKey::generate(), HospitalKey::generate(), HospitalKey::generate());
        let r = roster(&[("a", &a), ("b", &b), ("c", &c)]);
        let ab = r.pair_seed("a", &a, "b", "run-1").unwrap();
        assert_eq!(ab, r.pair_seed("b", &b, "a", "run-1").unwrap());
        assert_ne!(ab, r.pair_seed("a", &a, "c", "run-1").unwrap());
        assert_ne!(ab, r.pair_seed("a", &a, "b", "run-2").unwrap(), "a new session, new masks");
        let wrong = r.pair_seed("a", &b, "c", "run-1").unwrap_err().to_string();
        assert!(wrong.contains("not a's key"), "{wrong}");
        assert!(r.pair_seed("a", &a, "zed", "run-1").unwrap_err().to_string().contains("zed is not in the roster"));
    }

    #[test]
    fn fixed_point_round_trips_within_half_a_unit_and_refuses_what_does_not_fit() {
        for x in [0.0f32, 1e-6, -0.0123, 3.5, -1000.25] {
            assert!((from_fixed(to_fixed(x).unwrap()) - x as f64).abs() <= 0.5 / FIXED_SCALE, "{x}");
        }
        let sum = [0.25f32, -0.5, 0.125].iter().fold(0u64, |s, x| s.wrapping_add(to_fixed(*x).unwrap()));
        assert_eq!(from_fixed(sum), -0.125, "sums wrap and come back signed");
        assert!(to_fixed(f32::NAN).is_none() && to_fixed(f32::INFINITY).is_none() && to_fixed(3e9).is_none());
    }

    #[test]
    fn keys_round_trip_through_their_file_which_only_the_owner_reads() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let key = HospitalKey::generate();
        let path = dir.path().join("a.key");
        key.save(&path).unwrap();
        assert_eq!(HospitalKey::load(&path).unwrap().public_hex(), key.public_hex());
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(key.save(&path).is_err(), "an existing key is never overwritten");
        std::fs::write(dir.path().join("bad.key"), "zz").unwrap();
        assert!(HospitalKey::load(&dir.path().join("bad.key")).unwrap_err().to_string().contains("bad.key"));
    }
}
