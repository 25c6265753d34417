//! The repository key of format version 2: 32 random bytes made when the repository
//! is created, kept by the pushing host (`STATE_DIR/offsite/<repo>/repo-key`, mode
//! 0600) and stored in the repository age-encrypted to the recipients
//! (`keys/<fingerprint>.age`), so that the holder of an identity can get it back.
//!
//! Everything the repository says is authenticated with keys derived from it, which
//! whoever can write the off-site directory does not have: snapshot and index files
//! carry an HMAC, object names are HMACs of their plaintext. The age *public* keys are
//! no secret, so a key file in the repository proves nothing by itself (anyone can
//! encrypt a key of their own to them): a host without the key file trusts a key only
//! when its fingerprint is the one the operator pinned (`repo.key`), as ssh trusts a
//! host key only through known_hosts.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use super::crypto::{self, Identities};

/// The repository key and what is derived from it.
#[derive(Clone)]
pub struct RepoKey {
    master: [u8; 32],
}

impl std::fmt::Debug for RepoKey {
    // Never the key itself.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RepoKey({})", self.fingerprint())
    }
}

/// The first line of a wrapped key's plaintext.
const KEY_HEADER: &str = "runbook-offsite repository key, format version 2";

pub fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    m.update(data);
    m.finalize().into_bytes().into()
}

/// HMAC-SHA256 of a file's bytes (an object name), read in `buf`-sized pieces, each
/// counted on `bar`.
pub fn hmac_file(
    path: &Path,
    key: &[u8; 32],
    buf: &mut [u8],
    bar: Option<&indicatif::ProgressBar>,
) -> std::io::Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)?;
    let mut m = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("any key length");
    loop {
        let n = f.read(buf)?;
        if n == 0 {
            break;
        }
        m.update(&buf[..n]);
        if let Some(b) = bar {
            b.inc(n as u64);
        }
    }
    Ok(crypto::hex(&m.finalize().into_bytes()))
}

impl RepoKey {
    pub fn generate() -> Result<RepoKey, String> {
        Ok(RepoKey {
            master: crypto::random_key().map_err(|e| e.to_string())?,
        })
    }

    fn derive(&self, purpose: &str) -> [u8; 32] {
        hmac(
            &self.master,
            format!("runbook-offsite/2 {purpose}").as_bytes(),
        )
    }

    /// What the operator pins (`repo.key`): 128 bits, so that no other key can be
    /// found with the same one.
    pub fn fingerprint(&self) -> String {
        crypto::hex(&self.derive("fingerprint"))[..32].to_string()
    }

    /// The key of the HMACs over snapshot, index and check files.
    pub fn mac(&self, data: &[u8]) -> String {
        crypto::hex(&hmac(&self.derive("mac"), data))
    }

    /// The key object names are computed with (HMAC-SHA256 of the plaintext).
    pub fn id_key(&self) -> [u8; 32] {
        self.derive("object id")
    }

    /// An age identity derived from the key: every object is also encrypted to it, so
    /// the pushing host (which holds no identity of the operator) can read the
    /// manifests it needs for retention and checks.
    pub fn identity(&self) -> age::x25519::Identity {
        let secret = self.derive("age identity");
        let hrp = bech32::Hrp::parse("age-secret-key-").expect("a valid prefix");
        let text = bech32::encode::<bech32::Bech32>(hrp, &secret).expect("32 bytes encode");
        text.to_uppercase()
            .parse()
            .expect("a bech32 X25519 secret parses")
    }

    pub fn recipient(&self) -> age::x25519::Recipient {
        self.identity().to_public()
    }

    pub fn identities(&self) -> Identities {
        vec![Box::new(self.identity())]
    }

    /// The key's file in the repository: age-encrypted to the operator's recipients.
    pub fn wrap(&self, recipients: &[age::x25519::Recipient]) -> Result<Vec<u8>, String> {
        let plain = format!("{KEY_HEADER}\n{}\n", crypto::hex(&self.master));
        crypto::encrypt_bytes(
            recipients,
            plain.as_bytes(),
            "encrypting the repository key",
        )
        .map_err(|e| e.to_string())
    }

    /// The key from its file in the repository; `None` when the identities cannot
    /// decrypt it or it is not a key file.
    pub fn unwrap(ids: &Identities, sealed: &[u8]) -> Option<RepoKey> {
        let plain = crypto::decrypt_bytes(ids, sealed, "").ok()?;
        let text = String::from_utf8(plain).ok()?;
        let mut lines = text.lines();
        (lines.next()? == KEY_HEADER).then_some(())?;
        RepoKey::parse(lines.next()?)
    }

    fn parse(hex: &str) -> Option<RepoKey> {
        let bytes = crypto::unhex(hex.trim())?;
        Some(RepoKey {
            master: bytes.try_into().ok()?,
        })
    }

    /// The key this host keeps for a repository, if it has one.
    pub fn load(path: &Path) -> Result<Option<RepoKey>, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => RepoKey::parse(&text).map(Some).ok_or_else(|| {
                format!(
                    "the repository key `{}` is damaged (it holds 64 hex digits)",
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("cannot read `{}`: {e}", path.display())),
        }
    }

    /// Keeps the key for this host: created 0600 (never readable by others, not even
    /// for a moment), written to a temp name, synced, renamed.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        write_private(path, format!("{}\n", crypto::hex(&self.master)).as_bytes())
    }
}

/// Where this host keeps a repository's key.
pub fn local_key_path(local_dir: &Path) -> PathBuf {
    local_dir.join("repo-key")
}

/// Writes `data` to `path` through a temp file created 0600 and a rename.
pub fn write_private(path: &Path, data: &[u8]) -> Result<(), String> {
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(|e| {
        format!(
            "creating `{}`: {e}{}",
            parent.display(),
            crate::actions::offsite::room_hint(&e)
        )
    })?;
    let tmp = path.with_extension(format!("tmp.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!(
            "writing `{}`: {e}{}",
            path.display(),
            crate::actions::offsite::room_hint(&e)
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_wraps_to_the_recipients_and_its_derived_identity_is_stable() {
        let op = age::x25519::Identity::generate();
        let ids: Identities = vec![Box::new(op.clone())];
        let k = RepoKey::generate().unwrap();
        let sealed = k.wrap(&[op.to_public()]).unwrap();
        let back = RepoKey::unwrap(&ids, &sealed).unwrap();
        assert_eq!(back.fingerprint(), k.fingerprint());
        assert_eq!(k.fingerprint().len(), 32);
        assert_eq!(
            back.recipient().to_string(),
            k.identity().to_public().to_string()
        );
        let other = RepoKey::generate().unwrap();
        assert_ne!(other.fingerprint(), k.fingerprint());
        assert_ne!(other.mac(b"x"), k.mac(b"x"));
        let stranger: Identities = vec![Box::new(age::x25519::Identity::generate())];
        assert!(RepoKey::unwrap(&stranger, &sealed).is_none());
    }
}
