//! At-rest encryption for a manager's data dir.
//!
//! Every record the Raft store writes (log entries, vote, snapshots) is
//! sealed with AES-256-GCM under a random **data key**, with a fresh random
//! nonce and the record's slot as associated data, so a record cannot be
//! read elsewhere or moved to another slot undetected.
//!
//! The data key is itself sealed under a **key-encrypting key** and kept as
//! `keys/data.sealed`. The KEK is either kept next to it (`keys/kek`), so the
//! manager restarts unattended, or, with autolock, never written: the
//! operator keeps it (`meshctl swarm unlock-key`) and hands it to
//! `meshd unlock` after each start, as with Swarm's autolock.

use std::{
    fmt, fs, io,
    path::{Path, PathBuf},
};

use ring::{
    aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey},
    rand::{SecureRandom, SystemRandom},
};

const KEY_LEN: usize = 32;
const UNLOCK_PREFIX: &str = "MESHKEY-";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error(
        "this manager's data is locked (autolock); unlock it with `meshd unlock` and the key from `meshctl swarm unlock-key`"
    )]
    Locked,
    #[error("the unlock key is wrong for this data dir")]
    WrongKey,
    #[error(
        "{0:?} is not an unlock key (it starts with {UNLOCK_PREFIX} followed by 64 hex digits)"
    )]
    BadUnlockKey(String),
    #[error("a sealed record in {0} is damaged or was moved")]
    Corrupt(String),
    #[error("the system random source failed")]
    Random,
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> SealError + '_ {
    move |source| SealError::Io {
        path: path.to_owned(),
        source,
    }
}

fn random<const N: usize>() -> Result<[u8; N], SealError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| SealError::Random)?;
    Ok(b)
}

/// An AES-256-GCM key.
pub struct Key(LessSafeKey);

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    pub(crate) fn from_bytes(bytes: &[u8; KEY_LEN]) -> Key {
        Key(LessSafeKey::new(
            UnboundKey::new(&AES_256_GCM, bytes).expect("32-byte AES-256 key"),
        ))
    }

    /// `nonce || ciphertext || tag`, bound to `slot`.
    pub fn seal(&self, slot: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, SealError> {
        let nonce: [u8; NONCE_LEN] = random()?;
        let mut buf = plaintext.to_vec();
        self.0
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(slot),
                &mut buf,
            )
            .map_err(|_| SealError::Random)?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(out)
    }

    /// The plaintext of a record sealed for `slot`.
    pub fn open(&self, slot: &[u8], sealed: &[u8]) -> Result<Vec<u8>, SealError> {
        let corrupt = || SealError::Corrupt(String::from_utf8_lossy(slot).into_owned());
        if sealed.len() < NONCE_LEN {
            return Err(corrupt());
        }
        let (nonce, body) = sealed.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| corrupt())?;
        let mut buf = body.to_vec();
        let plain = self
            .0
            .open_in_place(nonce, Aad::from(slot), &mut buf)
            .map_err(|_| corrupt())?;
        Ok(plain.to_vec())
    }
}

/// The key-encrypting key as an operator handles it.
#[derive(Clone, PartialEq, Eq)]
pub struct UnlockKey([u8; KEY_LEN]);

impl fmt::Display for UnlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(UNLOCK_PREFIX)?;
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for UnlockKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("UnlockKey(..)")
    }
}

impl std::str::FromStr for UnlockKey {
    type Err = SealError;

    fn from_str(s: &str) -> Result<UnlockKey, SealError> {
        let bad = || SealError::BadUnlockKey(s.to_owned());
        let hex = s.trim().strip_prefix(UNLOCK_PREFIX).ok_or_else(bad)?;
        if hex.len() != KEY_LEN * 2 {
            return Err(bad());
        }
        let mut out = [0u8; KEY_LEN];
        for (i, b) in out.iter_mut().enumerate() {
            *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
        }
        Ok(UnlockKey(out))
    }
}

const DATA_KEY_SLOT: &[u8] = b"mesh data key";

/// The data key of a data dir, and how it is protected.
#[derive(Debug)]
pub struct DataKeys {
    pub data: Key,
    /// Set when the KEK is not stored (autolock): what the operator must keep.
    pub unlock: Option<UnlockKey>,
}

fn keys_dir(dir: &Path) -> PathBuf {
    dir.join("keys")
}

impl DataKeys {
    /// Creates the keys of a new data dir. With `autolock`, the KEK is
    /// returned in `unlock` and not written.
    pub fn create(dir: &Path, autolock: bool) -> Result<DataKeys, SealError> {
        let kek: [u8; KEY_LEN] = random()?;
        Self::create_inner(dir, kek, autolock)
    }

    /// Creates the keys of a new data dir in an autolocked cluster, whose
    /// unlock key the operator (and the cluster) already has.
    pub fn create_locked_by(dir: &Path, unlock: &UnlockKey) -> Result<DataKeys, SealError> {
        Self::create_inner(dir, unlock.0, true)
    }

    fn create_inner(dir: &Path, kek: [u8; KEY_LEN], autolock: bool) -> Result<DataKeys, SealError> {
        let keys = keys_dir(dir);
        fs::create_dir_all(&keys).map_err(io_err(&keys))?;
        let dek: [u8; KEY_LEN] = random()?;
        let sealed = Key::from_bytes(&kek).seal(DATA_KEY_SLOT, &dek)?;
        write_private(&keys.join("data.sealed"), &sealed)?;
        if !autolock {
            write_private(&keys.join("kek"), &kek)?;
        }
        Ok(DataKeys {
            data: Key::from_bytes(&dek),
            unlock: autolock.then_some(UnlockKey(kek)),
        })
    }

    /// Opens the data key: with the stored KEK, or with `unlock` when the
    /// data dir is autolocked.
    pub fn load(dir: &Path, unlock: Option<&UnlockKey>) -> Result<DataKeys, SealError> {
        let keys = keys_dir(dir);
        let sealed_path = keys.join("data.sealed");
        let sealed = fs::read(&sealed_path).map_err(io_err(&sealed_path))?;
        let kek_path = keys.join("kek");
        let kek: [u8; KEY_LEN] = match (unlock, fs::read(&kek_path)) {
            (Some(k), _) => k.0,
            (None, Ok(bytes)) => bytes.try_into().map_err(|_| SealError::WrongKey)?,
            (None, Err(e)) if e.kind() == io::ErrorKind::NotFound => return Err(SealError::Locked),
            (None, Err(e)) => return Err(io_err(&kek_path)(e)),
        };
        let dek = Key::from_bytes(&kek)
            .open(DATA_KEY_SLOT, &sealed)
            .map_err(|_| SealError::WrongKey)?;
        let dek: [u8; KEY_LEN] = dek.try_into().map_err(|_| SealError::WrongKey)?;
        Ok(DataKeys {
            data: Key::from_bytes(&dek),
            unlock: unlock.cloned(),
        })
    }
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), SealError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(path))?;
    io::Write::write_all(&mut f, bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raft::store::tests::TempDir;

    #[test]
    fn records_are_bound_to_their_slot() {
        let key = Key::from_bytes(&[7; KEY_LEN]);
        let sealed = key.seal(b"log:1", b"hello").unwrap();
        assert!(!sealed.windows(5).any(|w| w == b"hello"));
        assert_eq!(key.open(b"log:1", &sealed).unwrap(), b"hello");
        let err = key.open(b"log:2", &sealed).unwrap_err();
        assert_eq!(
            err.to_string(),
            "a sealed record in log:2 is damaged or was moved"
        );
        let mut flipped = sealed.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(key.open(b"log:1", &flipped).is_err());
        assert_ne!(
            key.seal(b"log:1", b"hello").unwrap(),
            sealed,
            "fresh nonce each time"
        );
    }

    #[test]
    fn autolock_needs_the_right_unlock_key() {
        let dir = TempDir::new();
        let keys = DataKeys::create(dir.path(), true).unwrap();
        let unlock = keys.unlock.clone().expect("autolock returns the key");
        assert!(!dir.path().join("keys/kek").exists(), "the KEK was written");
        let sealed = keys.data.seal(b"x", b"secret").unwrap();

        assert!(matches!(
            DataKeys::load(dir.path(), None),
            Err(SealError::Locked)
        ));
        let wrong: UnlockKey = format!("MESHKEY-{}", "ab".repeat(32)).parse().unwrap();
        assert!(matches!(
            DataKeys::load(dir.path(), Some(&wrong)),
            Err(SealError::WrongKey)
        ));
        let text = unlock.to_string();
        let again = DataKeys::load(dir.path(), Some(&text.parse().unwrap())).unwrap();
        assert_eq!(again.data.open(b"x", &sealed).unwrap(), b"secret");
        for bad in [
            "",
            "MESHKEY-12",
            "KEY-00",
            &format!("MESHKEY-{}", "zz".repeat(32)),
        ] {
            let err = bad.parse::<UnlockKey>().unwrap_err().to_string();
            assert!(err.contains("is not an unlock key"), "{err}");
        }
    }

    #[test]
    fn without_autolock_the_kek_is_kept_and_the_dir_reopens_alone() {
        let dir = TempDir::new();
        let keys = DataKeys::create(dir.path(), false).unwrap();
        assert!(keys.unlock.is_none());
        let sealed = keys.data.seal(b"x", b"v").unwrap();
        let again = DataKeys::load(dir.path(), None).unwrap();
        assert_eq!(again.data.open(b"x", &sealed).unwrap(), b"v");
    }
}
