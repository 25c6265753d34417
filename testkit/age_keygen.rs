//! `age-keygen`: makes an age identity file, as Debian's `age-keygen -o FILE` does, for
//! the drill and machines without the age CLI. Same file format (a `# public key:`
//! comment, then the `AGE-SECRET-KEY-1...` line), mode 0600, made with the `age` crate
//! the engine encrypts with; the recipient (public key) is printed on stdout.
//!
//! ```text
//! runbook-testkit age-keygen FILE
//! ```

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;

use age::secrecy::ExposeSecret;

pub fn main(args: &[String]) -> Result<(), String> {
    let [file] = args else {
        return Err("usage: age-keygen FILE (FILE must not exist)".into());
    };
    let identity = age::x25519::Identity::generate();
    let recipient = identity.to_public().to_string();
    let created = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%SZ");
    let text = format!(
        "# created: {created}\n# public key: {recipient}\n{}\n",
        identity.to_string().expose_secret()
    );
    let mut out = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(file)
        .map_err(|e| format!("{file}: {e}"))?;
    out.write_all(text.as_bytes())
        .and_then(|()| out.sync_all())
        .map_err(|e| format!("{file}: {e}"))?;
    println!("{recipient}");
    Ok(())
}
