//! Sending objects to the repository: tar streams of age ciphertext produced as they
//! are read (nothing is staged on this host), in batches that each commit on their
//! own. A batch's objects are checked there (`sha256sum -c`) and linked into place
//! without replacing anything; a link cut or a kill loses at most the batches in
//! flight, and the next push asks about (and skips) what earlier batches linked.
//! Batches go out over more than one ssh session at once: encryption is the
//! bottleneck, and each session encrypts on its own core.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};

use super::crypto;
use super::format::{Cipher, Index, Signed};
use super::key::RepoKey;
use super::repo::{self, Committed};
use super::ssh::{Remote, SshError};

/// Plaintext bytes per batch: small repositories still get a few batches (so a cut
/// keeps some of the work and both cores encrypt), large ones no more than needed.
pub fn batch_bytes(total: u64) -> u64 {
    (total / 8).clamp(4 << 20, 64 << 20)
}

/// How many ssh sessions send batches at once.
fn workers() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4)
}

/// Objects (path -> source) cut into batches of about `limit` plaintext bytes, in
/// the order given.
pub fn batches<'s, 'a>(
    objects: Vec<(String, &'s Source<'a>)>,
    limit: u64,
) -> Vec<Vec<(String, &'s Source<'a>)>> {
    let mut out: Vec<Vec<(String, &Source)>> = Vec::new();
    let mut size = 0u64;
    for (name, src) in objects {
        if out.is_empty() || (size >= limit && !out.last().is_some_and(Vec::is_empty)) {
            out.push(Vec::new());
            size = 0;
        }
        size += src.plain_bytes();
        out.last_mut().expect("pushed").push((name, src));
    }
    out
}

/// What went out and what the remote said.
#[derive(Default)]
pub struct Sent {
    /// Every object and file written, with its ciphertext digest.
    pub sums: BTreeMap<String, Cipher>,
    /// Objects that were there already, with the remote's digest of them.
    pub existing: BTreeMap<String, String>,
    /// Bytes of the tar streams.
    pub bytes: u64,
    /// A snapshot file of that stamp was there already (the final batch only).
    pub snapshot_existed: bool,
}

impl Sent {
    pub fn add(&mut self, other: Sent) {
        self.sums.extend(other.sums);
        self.existing.extend(other.existing);
        self.bytes += other.bytes;
        self.snapshot_existed |= other.snapshot_existed;
    }
}

/// Everything one upload needs besides its contents.
pub struct Sender<'a> {
    pub remote: &'a Remote<'a>,
    pub key: &'a RepoKey,
    pub recipients: &'a [&'a (dyn age::Recipient + Sync)],
    pub bar: Option<&'a indicatif::ProgressBar>,
}

/// Files an upload carries besides its objects: `head` before them, and what `tail`
/// makes once their digests are known (a snapshot file that names its manifest's).
pub type Tail<'t> =
    dyn FnMut(&BTreeMap<String, Cipher>) -> std::io::Result<Vec<(String, Vec<u8>)>> + 't;

impl Sender<'_> {
    /// One upload named `name` (`tmp/<name>` there), committed there as one: its
    /// objects with an index of them, then the tail; with `stamp`, the snapshot file
    /// the tail holds is linked last.
    pub fn send(
        &self,
        name: &str,
        stamp: &str,
        head: &[(String, Vec<u8>)],
        objects: &[(String, &Source)],
        tail: &mut Tail,
    ) -> Result<Sent, SshError> {
        let mut sums = BTreeMap::new();
        let mut bytes = 0u64;
        let id_key = self.key.id_key();
        let recipients: Vec<&dyn age::Recipient> = self
            .recipients
            .iter()
            .map(|r| *r as &dyn age::Recipient)
            .collect();
        let committed: Committed = repo::commit(self.remote, name, stamp, &mut |out| {
            let mut up = Upload {
                out,
                sums: BTreeMap::new(),
                bytes: 0,
            };
            for (file, data) in head {
                up.plain(file, data)?;
            }
            for (path, src) in objects {
                up.object(path, src, &recipients, &id_key, self.bar)?;
            }
            if !objects.is_empty() {
                // By object id, as a fetch and a check look them up.
                let by_id = objects
                    .iter()
                    .filter_map(|(path, _)| {
                        let id = path.rsplit('/').next()?;
                        Some((id.to_string(), up.sums.get(path)?.clone()))
                    })
                    .collect();
                let index = Index::new(by_id).sign(self.key);
                up.plain(&format!("index/{name}"), &index)?;
            }
            for (file, data) in tail(&up.sums)? {
                up.plain(&file, &data)?;
            }
            let (s, b) = up.finish()?;
            sums = s;
            bytes = b;
            Ok(())
        })?;
        Ok(Sent {
            sums,
            existing: committed.existing,
            bytes,
            snapshot_existed: committed.snapshot_existed,
        })
    }

    /// The batches, over several sessions at once, each its own upload
    /// (`<upload>.<n>`). The first failure stops the others taking new batches.
    pub fn send_batches(
        &self,
        upload: &str,
        batches: Vec<Vec<(String, &Source)>>,
    ) -> Result<Sent, SshError> {
        // Taken from the end: reversed, so they go out in order.
        let queue = Mutex::new(batches.into_iter().enumerate().rev().collect::<Vec<_>>());
        let failed = AtomicBool::new(false);
        let total = Mutex::new(Sent::default());
        let first_error: Mutex<Option<SshError>> = Mutex::new(None);
        std::thread::scope(|scope| {
            for _ in 0..workers() {
                scope.spawn(|| {
                    loop {
                        if failed.load(Ordering::SeqCst) {
                            return;
                        }
                        let Some((n, batch)) = queue.lock().expect("not poisoned").pop() else {
                            return;
                        };
                        match self.send(&format!("{upload}.{n}"), "", &[], &batch, &mut |_| {
                            Ok(Vec::new())
                        }) {
                            Ok(sent) => total.lock().expect("not poisoned").add(sent),
                            Err(e) => {
                                failed.store(true, Ordering::SeqCst);
                                first_error.lock().expect("not poisoned").get_or_insert(e);
                                return;
                            }
                        }
                    }
                });
            }
        });
        if let Some(e) = first_error.into_inner().expect("not poisoned") {
            return Err(e);
        }
        Ok(total.into_inner().expect("not poisoned"))
    }
}

impl Source<'_> {
    pub fn plain_bytes(&self) -> u64 {
        match self {
            Source::File(_, n) => *n,
            Source::Bytes(b) => b.len() as u64,
        }
    }
}

/// The size of age's ciphertext of `len` bytes after a header of `header` bytes: a
/// 16-byte nonce, then 64 KiB chunks each with a 16-byte tag (at least one chunk).
pub(super) fn age_size(header: u64, len: u64) -> u64 {
    let chunks = len.div_ceil(64 * 1024).max(1);
    header + 16 + len + 16 * chunks
}

/// A writer that counts and hashes what passes (the ciphertext into the tar stream).
struct Tee<'w> {
    inner: &'w mut dyn Write,
    sha: Sha256,
    bytes: u64,
}

impl Write for Tee<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.sha.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// One file of the upload: where its plaintext comes from.
pub enum Source<'a> {
    File(&'a Path, u64),
    Bytes(&'a [u8]),
}

/// The tar stream of an upload, written as it is produced.
struct Upload<'w> {
    out: &'w mut dyn Write,
    /// name -> sha256 of what was written, for SHA256SUMS and the index.
    sums: BTreeMap<String, Cipher>,
    bytes: u64,
}

impl Upload<'_> {
    fn header(&mut self, name: &str, size: u64) -> std::io::Result<()> {
        let mut h = tar::Header::new_gnu();
        h.set_path(name)?;
        h.set_size(size);
        h.set_mode(0o600);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        h.set_cksum();
        self.out.write_all(h.as_bytes())?;
        self.bytes += 512;
        Ok(())
    }

    fn pad(&mut self, size: u64) -> std::io::Result<()> {
        let rem = (size % 512) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; 512][..512 - rem])?;
            self.bytes += (512 - rem) as u64;
        }
        Ok(())
    }

    /// A plain file (config, index, snapshot, sums).
    fn plain(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        self.header(name, data.len() as u64)?;
        self.out.write_all(data)?;
        self.bytes += data.len() as u64;
        self.pad(data.len() as u64)?;
        self.sums.insert(
            name.to_string(),
            Cipher {
                sha256: crypto::sha256_hex(data),
                bytes: data.len() as u64,
            },
        );
        Ok(())
    }

    /// An object: encrypted into the stream as it is read. Its size is known before
    /// (the header's size, then the chunks'), and checked after.
    /// The plaintext's HMAC is computed as it is read and must be the object's id (the
    /// last part of `name`): a file that changed since it was named is not shipped
    /// under a name that lies about it.
    fn object(
        &mut self,
        name: &str,
        src: &Source,
        recipients: &[&dyn age::Recipient],
        id_key: &[u8; 32],
        bar: Option<&indicatif::ProgressBar>,
    ) -> std::io::Result<()> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(id_key).expect("any key length");
        let enc = age::Encryptor::with_recipients(recipients.iter().copied())
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let len = match src {
            Source::File(_, len) => *len,
            Source::Bytes(b) => b.len() as u64,
        };
        // The encryptor writes into a buffer this drains into the stream; its header
        // (with a random grease stanza) is written at once, which gives the size.
        let buffer = Shared::default();
        let mut writer = enc.wrap_output(buffer.clone())?;
        let size = age_size(buffer.len() as u64 - 16, len);
        self.header(name, size)?;
        let mut tee = Tee {
            inner: &mut *self.out,
            sha: Sha256::new(),
            bytes: 0,
        };
        match src {
            Source::File(path, _) => {
                let mut f = File::open(path)?;
                let mut buf = vec![0u8; 256 * 1024];
                let mut read = 0u64;
                loop {
                    let n = f.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    read += n as u64;
                    mac.update(&buf[..n]);
                    writer.write_all(&buf[..n])?;
                    tee.write_all(&buffer.take())?;
                    if let Some(b) = bar {
                        b.inc(n as u64);
                    }
                }
                if read != len {
                    return Err(std::io::Error::other(format!(
                        "`{}` changed while it was sent ({len} bytes, then {read}): a snapshot must not change",
                        path.display()
                    )));
                }
            }
            Source::Bytes(b) => {
                mac.update(b);
                writer.write_all(b)?;
            }
        }
        let id = crypto::hex(&mac.finalize().into_bytes());
        if Some(id.as_str()) != name.rsplit('/').next() {
            return Err(std::io::Error::other(match src {
                Source::File(path, _) => format!(
                    "`{}` changed while it was sent (its bytes are not those it was named by): a snapshot must not change",
                    path.display()
                ),
                Source::Bytes(_) => format!("{name}: the bytes sent are not those it was named by"),
            }));
        }
        writer.finish()?;
        tee.write_all(&buffer.take())?;
        let (sha, written) = (tee.sha.finalize(), tee.bytes);
        if written != size {
            return Err(std::io::Error::other(format!(
                "age wrote {written} bytes for {name}, {size} were announced"
            )));
        }
        self.bytes += written;
        self.pad(size)?;
        self.sums.insert(
            name.to_string(),
            Cipher {
                sha256: crypto::hex(&sha),
                bytes: size,
            },
        );
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<(BTreeMap<String, Cipher>, u64)> {
        let mut sums = String::new();
        for (name, c) in &self.sums {
            sums.push_str(&format!("{}  {name}\n", c.sha256));
        }
        self.header("SHA256SUMS", sums.len() as u64)?;
        self.out.write_all(sums.as_bytes())?;
        self.bytes += sums.len() as u64;
        self.pad(sums.len() as u64)?;
        self.out.write_all(&[0u8; 1024])?;
        self.bytes += 1024;
        Ok((self.sums, self.bytes))
    }
}

/// A buffer the encryptor writes into and the stream drains.
#[derive(Clone, Default)]
struct Shared(std::rc::Rc<std::cell::RefCell<Vec<u8>>>);

impl Shared {
    fn len(&self) -> usize {
        self.0.borrow().len()
    }
    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.0.borrow_mut())
    }
}

impl Write for Shared {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn age_sizes_are_known_before_encrypting() {
        let id = age::x25519::Identity::generate();
        let r = id.to_public();
        for len in [0usize, 1, 65535, 65536, 65537, 3 * 65536, 200_000] {
            let plain = vec![7u8; len];
            let buf = Shared::default();
            let enc = age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient))
                .unwrap();
            let mut w = enc.wrap_output(buf.clone()).unwrap();
            let header = buf.len() as u64 - 16;
            w.write_all(&plain).unwrap();
            w.finish().unwrap();
            assert_eq!(age_size(header, len as u64), buf.len() as u64, "{len}");
        }
    }
}
