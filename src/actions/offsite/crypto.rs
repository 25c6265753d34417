//! Encryption is the age format through the `age` crate (x25519 recipients, identity
//! files as `age-keygen` writes them), so Debian's `age` CLI decrypts any object by
//! hand. Object ids are HMAC-SHA256 under a random key. No crypto of our own.

use std::io::{Read, Write};
use std::path::Path;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum CryptoError {
    #[error("`{index}` is not an age public key (`age1...`): {why}")]
    BadRecipient { index: String, why: String },
    #[error("no recipients: give at least one age public key in `recipients`")]
    NoRecipients,
    #[error("the identity file `{path}` does not exist (argument `identity`)")]
    IdentityMissing { path: String },
    // Never the file's content, nor the parser's words about it.
    #[error(
        "`{path}` is not an age identity file (the format age-keygen writes) (argument `identity`)"
    )]
    IdentityUnreadable { path: String },
    #[error("{what}: {why}")]
    Age { what: String, why: String },
    /// The ciphertext is whole, but for none of the identities given.
    #[error(
        "{what}: the identity is none of the recipients it was encrypted to (argument `identity`)"
    )]
    NotARecipient { what: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

pub type Identities = Vec<Box<dyn age::Identity + Send + Sync>>;

/// Identities with the file they came from, for messages that must say which.
pub type IdentityFile<'a> = (&'a Identities, &'a Path);

pub fn parse_recipients(keys: &[String]) -> Result<Vec<age::x25519::Recipient>, CryptoError> {
    if keys.is_empty() {
        return Err(CryptoError::NoRecipients);
    }
    keys.iter()
        .enumerate()
        .map(|(i, k)| {
            k.trim()
                .parse::<age::x25519::Recipient>()
                .map_err(|why| CryptoError::BadRecipient {
                    index: format!("recipients[{i}]"),
                    why: why.to_string(),
                })
        })
        .collect()
}

pub fn load_identities(path: &Path) -> Result<Identities, CryptoError> {
    let shown = path.display().to_string();
    if !path.is_file() {
        return Err(CryptoError::IdentityMissing { path: shown });
    }
    let file = age::IdentityFile::from_file(shown.clone()).map_err(|_| {
        CryptoError::IdentityUnreadable {
            path: shown.clone(),
        }
    })?;
    let ids = file
        .into_identities()
        .map_err(|_| CryptoError::IdentityUnreadable {
            path: shown.clone(),
        })?;
    if ids.is_empty() {
        return Err(CryptoError::IdentityUnreadable { path: shown });
    }
    Ok(ids)
}

/// Encrypts everything `input` yields to `recipients`, into `output`.
pub fn encrypt(
    recipients: &[age::x25519::Recipient],
    mut input: impl Read,
    output: impl Write,
    what: &str,
) -> Result<(), CryptoError> {
    let encryptor =
        age::Encryptor::with_recipients(recipients.iter().map(|r| r as &dyn age::Recipient))
            .map_err(|e| CryptoError::Age {
                what: what.to_string(),
                why: e.to_string(),
            })?;
    let io = |source| CryptoError::Io {
        what: what.to_string(),
        source,
    };
    let mut writer = encryptor.wrap_output(output).map_err(io)?;
    std::io::copy(&mut input, &mut writer).map_err(io)?;
    writer.finish().map_err(io)?;
    Ok(())
}

pub fn encrypt_bytes(
    recipients: &[age::x25519::Recipient],
    plain: &[u8],
    what: &str,
) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::new();
    encrypt(recipients, plain, &mut out, what)?;
    Ok(out)
}

/// A reader of the plaintext; reading fails where the ciphertext was damaged (age's
/// AEAD authenticates each chunk and the end).
pub fn decrypt<'r, R: Read + 'r>(
    identities: &Identities,
    input: R,
    what: &str,
) -> Result<Box<dyn Read + 'r>, CryptoError> {
    let age_err = |e: age::DecryptError| match e {
        age::DecryptError::NoMatchingKeys => CryptoError::NotARecipient {
            what: what.to_string(),
        },
        e => CryptoError::Age {
            what: what.to_string(),
            why: e.to_string(),
        },
    };
    let decryptor = age::Decryptor::new(input).map_err(age_err)?;
    let reader = decryptor
        .decrypt(identities.iter().map(|i| i.as_ref() as &dyn age::Identity))
        .map_err(age_err)?;
    Ok(Box::new(reader))
}

pub fn decrypt_bytes(
    identities: &Identities,
    cipher: &[u8],
    what: &str,
) -> Result<Vec<u8>, CryptoError> {
    let mut out = Vec::new();
    decrypt(identities, cipher, what)?
        .read_to_end(&mut out)
        .map_err(|source| CryptoError::Io {
            what: what.to_string(),
            source,
        })?;
    Ok(out)
}

/// 32 bytes from the kernel's CSPRNG.
pub fn random_key() -> Result<[u8; 32], CryptoError> {
    let mut key = [0u8; 32];
    let mut filled = 0;
    while filled < key.len() {
        // SAFETY: writes at most the remaining length into our buffer.
        let n =
            unsafe { libc::getrandom(key[filled..].as_mut_ptr().cast(), key.len() - filled, 0) };
        if n < 0 {
            return Err(CryptoError::Io {
                what: "getting random bytes for the object-id key".into(),
                source: std::io::Error::last_os_error(),
            });
        }
        filled += n as usize;
    }
    Ok(key)
}

/// The hasher of one file: its plaintext sha256 and its object id under the key.
pub struct FileHasher {
    sha: Sha256,
    mac: Hmac<Sha256>,
}

impl FileHasher {
    pub fn new(id_key: &[u8; 32]) -> Self {
        FileHasher {
            sha: Sha256::new(),
            mac: <Hmac<Sha256> as KeyInit>::new_from_slice(id_key).expect("any key length"),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        self.sha.update(data);
        self.mac.update(data);
    }

    /// (sha256, object id), both hex.
    pub fn finish(self) -> (String, String) {
        (
            hex(&self.sha.finalize()),
            hex(&self.mac.finalize().into_bytes()),
        )
    }
}

/// The sha256 (hex) and length of a file's bytes.
pub fn sha256_file(path: &Path) -> std::io::Result<(String, u64)> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((hex(&h.finalize()), len))
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex(&Sha256::digest(data))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

pub fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_round_trip_through_age_and_a_damaged_byte_is_caught() {
        let id = age::x25519::Identity::generate();
        let recipients = vec![id.to_public()];
        let ids: Identities = vec![Box::new(id)];
        let mut cipher = encrypt_bytes(&recipients, b"hello offsite", "t").unwrap();
        assert_eq!(decrypt_bytes(&ids, &cipher, "t").unwrap(), b"hello offsite");
        let last = cipher.len() - 3;
        cipher[last] ^= 1;
        assert!(decrypt_bytes(&ids, &cipher, "t").is_err());
    }

    #[test]
    fn ids_depend_on_the_key() {
        let mut a = FileHasher::new(&[1; 32]);
        a.update(b"x");
        let mut b = FileHasher::new(&[2; 32]);
        b.update(b"x");
        let (sa, ia) = a.finish();
        let (sb, ib) = b.finish();
        assert_eq!(sa, sb);
        assert_ne!(ia, ib);
        assert_eq!(unhex(&hex(&[0, 255, 16])).unwrap(), vec![0, 255, 16]);
    }
}
