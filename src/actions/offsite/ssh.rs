//! The transport: OpenSSH and rsync driven by argv. Nothing here speaks a protocol of
//! its own; every remote command is a fixed `sh -c` script of ours whose variable parts
//! arrive as positional words, each POSIX-single-quoted by [`quote`], so no name on
//! either side is ever parsed as shell syntax.
//!
//! The ssh key is passed to `ssh -i` by path; this program never reads it.

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};

use super::repo::RepoArgs;

#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// ssh itself failed: no route, refused, host key not verified, key refused, or the
    /// link dropped during the command (exit 255).
    #[error("cannot reach the off-site host {target}: {detail}")]
    Unreachable { target: String, detail: String },
    #[error("on the off-site host {target}, {what} failed (exit {code}): {detail}")]
    Remote {
        target: String,
        what: String,
        code: i32,
        detail: String,
    },
    /// What was being sent could not be produced here (a file changed or vanished):
    /// the remote only saw the stream end.
    #[error("{what}: {detail}")]
    Feed { what: String, detail: String },
    #[error("cannot run `{program}`: {source} (is it installed?)")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
}

impl SshError {
    /// Whether the connection itself failed (as opposed to a command on the remote).
    pub fn is_link(&self) -> bool {
        matches!(self, SshError::Unreachable { .. })
    }
}

/// One word for a POSIX shell: single-quoted, with each `'` written as `'\''`.
pub fn quote(word: &str) -> String {
    let mut out = String::with_capacity(word.len() + 2);
    out.push('\'');
    for c in word.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// The words of a command line, quoted, joined by spaces.
pub fn quote_argv<S: AsRef<str>>(argv: &[S]) -> String {
    argv.iter()
        .map(|w| quote(w.as_ref()))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Prefixes each transferred name in rsync's output.
const SENT_MARK: &str = "runbook-transferred ";

/// What the bytes over one transfer were, as rsync counts them.
#[derive(Debug, Default, Clone)]
pub struct Transfer {
    /// The files rsync actually transferred (not those it found complete there).
    pub names: Vec<String>,
    pub bytes_sent: u64,
    pub bytes_received: u64,
}

pub struct Remote<'a> {
    pub repo: &'a RepoArgs,
}

impl<'a> Remote<'a> {
    pub fn new(repo: &'a RepoArgs) -> Self {
        Remote { repo }
    }

    pub fn target(&self) -> String {
        format!("{}@{}:{}", self.repo.user, self.repo.host, self.repo.port)
    }

    /// `ssh` and its options, without the destination.
    fn ssh_options(&self) -> Vec<String> {
        let r = self.repo;
        let mut v: Vec<String> = vec![
            "ssh".into(),
            "-i".into(),
            r.ssh_key.display().to_string(),
            "-p".into(),
            r.port.to_string(),
        ];
        for opt in [
            "BatchMode=yes".to_string(),
            "IdentitiesOnly=yes".to_string(),
            "StrictHostKeyChecking=yes".to_string(),
            format!("UserKnownHostsFile={}", r.known_hosts.display()),
            "GlobalKnownHostsFile=/dev/null".to_string(),
            "ConnectTimeout=10".to_string(),
            // A dropped link is noticed within 15 s, not at TCP's timeout.
            "ServerAliveInterval=5".to_string(),
            "ServerAliveCountMax=3".to_string(),
            // No ~/.ssh/config of the operator changes what these arguments say.
            "LogLevel=ERROR".to_string(),
        ] {
            v.push("-o".into());
            v.push(opt);
        }
        v.push("-F".into());
        v.push("/dev/null".into());
        v
    }

    fn destination(&self) -> String {
        format!("{}@{}", self.repo.user, self.repo.host)
    }

    /// Starts `sh -c SCRIPT sh ARGS...` on the remote with `stdin` fed to it from a
    /// thread (a large stdin and a large stdout would deadlock a single thread that
    /// writes all before it reads) and its stderr collected by another.
    fn spawn(
        &self,
        script: &str,
        args: &[&str],
        stdin: &[u8],
        compress: bool,
    ) -> Result<Spawned, SshError> {
        let (child, mut input) = self.spawn_piped(script, args, compress)?;
        let mut child = child;

        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&data);
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        let err_reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stderr.read_to_end(&mut s);
            s
        });
        let stdout = child.stdout.take().expect("piped stdout");
        Ok(Spawned {
            child,
            stdout,
            writer,
            err_reader,
        })
    }

    /// Runs `sh -c SCRIPT sh ARGS...` on the remote, feeding `stdin`; returns stdout.
    /// `what` names the operation in errors. Exit codes in `ok_codes` count as success
    /// (a `sha256sum` over a missing file exits 1 and still reports the others).
    pub fn run(
        &self,
        what: &str,
        script: &str,
        args: &[&str],
        stdin: &[u8],
        ok_codes: &[i32],
    ) -> Result<Vec<u8>, SshError> {
        // Listings and digests are text: compressed, they cost half as much on the link.
        // (Not for rsync: ciphertext does not compress.)
        let mut spawned = self.spawn(script, args, stdin, true)?;
        let mut out = Vec::new();
        let _ = spawned.stdout.read_to_end(&mut out);
        let (code, err) = spawned.wait()?;
        if code == 0 || ok_codes.contains(&code) {
            return Ok(out);
        }
        let detail = last_lines(&err);
        if code == 255 {
            return Err(SshError::Unreachable {
                target: self.target(),
                detail,
            });
        }
        Err(SshError::Remote {
            target: self.target(),
            what: what.to_string(),
            code,
            detail,
        })
    }

    /// Runs `sh -c SCRIPT sh ARGS...` on the remote with its stdin written by `feed`
    /// (a stream as large as a snapshot, never held whole); returns stdout. A feed
    /// that fails because the remote stopped reading reports the remote's error.
    pub fn run_feeding(
        &self,
        what: &str,
        script: &str,
        args: &[&str],
        feed: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<Vec<u8>, SshError> {
        let (mut child, mut input) = self.spawn_piped(script, args, false)?;
        let mut stdout = child.stdout.take().expect("piped stdout");
        let out_reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stdout.read_to_end(&mut s);
            s
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        let err_reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stderr.read_to_end(&mut s);
            s
        });
        let fed = {
            let mut w = std::io::BufWriter::with_capacity(1 << 20, &mut input);
            feed(&mut w).and_then(|_| w.flush())
        };
        drop(input);
        let status = child.wait().map_err(|source| SshError::Spawn {
            program: "ssh".into(),
            source,
        })?;
        let out = out_reader.join().unwrap_or_default();
        let err = err_reader.join().unwrap_or_default();
        // This side's own failure explains the broken stream better than the remote's
        // complaint about it; a broken pipe is the remote's (or the link's) doing.
        if let Err(e) = &fed
            && e.kind() != std::io::ErrorKind::BrokenPipe
        {
            return Err(SshError::Feed {
                what: what.to_string(),
                detail: e.to_string(),
            });
        }
        self.judge(what, status.code().unwrap_or(-1), &err, fed.err())?;
        Ok(out)
    }

    /// Runs `sh -c SCRIPT sh ARGS...` on the remote, feeding `stdin`, and hands its
    /// stdout as a stream to `consume` (a snapshot's objects, never held whole).
    pub fn run_reading<T>(
        &self,
        what: &str,
        script: &str,
        args: &[&str],
        stdin: &[u8],
        consume: &mut dyn FnMut(&mut dyn Read) -> Result<T, String>,
    ) -> Result<T, String> {
        let mut spawned = self
            .spawn(script, args, stdin, false)
            .map_err(|e| e.to_string())?;
        let result = {
            let mut r = std::io::BufReader::with_capacity(1 << 20, &mut spawned.stdout);
            let result = consume(&mut r);
            // Whatever is left is drained, so the remote is not killed by SIGPIPE
            // when the consumer stopped at the end of the archive.
            let _ = std::io::copy(&mut r, &mut std::io::sink());
            result
        };
        let (code, err) = spawned.wait().map_err(|e| e.to_string())?;
        // The link's or the remote's failure explains a broken stream best.
        self.judge(what, code, &err, None)
            .map_err(|e| e.to_string())?;
        result
    }

    fn judge(
        &self,
        what: &str,
        code: i32,
        err: &[u8],
        io: Option<std::io::Error>,
    ) -> Result<(), SshError> {
        if code == 0 {
            if let Some(e) = io {
                return Err(SshError::Remote {
                    target: self.target(),
                    what: what.to_string(),
                    code,
                    detail: e.to_string(),
                });
            }
            return Ok(());
        }
        let detail = last_lines(err);
        if code == 255 || code == -1 {
            return Err(SshError::Unreachable {
                target: self.target(),
                detail,
            });
        }
        Err(SshError::Remote {
            target: self.target(),
            what: what.to_string(),
            code,
            detail,
        })
    }

    fn spawn_piped(
        &self,
        script: &str,
        args: &[&str],
        compress: bool,
    ) -> Result<(std::process::Child, std::process::ChildStdin), SshError> {
        let mut remote = vec!["sh", "-c", script, "sh"];
        remote.extend_from_slice(args);
        let mut argv = self.ssh_options();
        if compress {
            argv.extend(["-o".to_string(), "Compression=yes".to_string()]);
        }
        argv.push(self.destination());
        argv.push("--".into());
        argv.push(quote_argv(&remote));
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| SshError::Spawn {
                program: "ssh".into(),
                source,
            })?;
        let input = child.stdin.take().expect("piped stdin");
        Ok((child, input))
    }

    /// Runs `sh -c SCRIPT sh ARGS...` on the remote like [`Remote::run`], but hands
    /// each line of its stdout to `on_line` as it arrives (a fleet host's events), and
    /// returns the remote's exit code and the tail of its stderr. Only a failure of
    /// the connection itself (ssh's 255) is an error.
    pub fn run_lines(
        &self,
        script: &str,
        args: &[&str],
        stdin: &[u8],
        on_line: &mut dyn FnMut(&str),
    ) -> Result<(i32, String), SshError> {
        let mut spawned = self.spawn(script, args, stdin, false)?;
        let stdout = std::io::BufReader::new(&mut spawned.stdout);
        for line in std::io::BufRead::lines(stdout) {
            match line {
                Ok(line) => on_line(&line),
                Err(_) => break,
            }
        }
        match spawned.wait()? {
            // ssh's own failure, or ssh killed: either way the link is gone.
            (255 | -1, err) => Err(SshError::Unreachable {
                target: self.target(),
                detail: last_lines(&err),
            }),
            (code, err) => Ok((code, last_lines(&err))),
        }
    }

    /// The `-e` value for rsync: the ssh argv, each word quoted (rsync splits it as a
    /// shell would, honouring the quotes).
    fn rsync_shell(&self) -> String {
        quote_argv(&self.ssh_options())
    }

    /// Sends the files `names` (relative to `local_root`) to the repository, keeping
    /// their relative paths. rsync writes each into a temp file and renames it, so an
    /// interrupted upload never leaves a truncated object under its final name, and a
    /// rerun skips files already complete there (same size and mtime).
    pub fn upload(
        &self,
        local_root: &Path,
        names: &[String],
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<Transfer, SshError> {
        let remote = format!("{}:{}/", self.destination(), self.repo.dir.display());
        let mut src = local_root.as_os_str().to_owned();
        src.push("/");
        self.rsync(
            "sending objects",
            &[src.to_string_lossy().as_ref(), &remote],
            names,
            progress,
        )
    }

    /// Fetches `names` from the repository into `local_root` (relative paths kept).
    pub fn download(
        &self,
        local_root: &Path,
        names: &[String],
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<Transfer, SshError> {
        let remote = format!("{}:{}/", self.destination(), self.repo.dir.display());
        let mut dst = local_root.as_os_str().to_owned();
        dst.push("/");
        self.rsync(
            "fetching objects",
            &[&remote, dst.to_string_lossy().as_ref()],
            names,
            progress,
        )
    }

    fn rsync(
        &self,
        what: &str,
        ends: &[&str],
        names: &[String],
        progress: Option<&indicatif::ProgressBar>,
    ) -> Result<Transfer, SshError> {
        let mut argv: Vec<String> = vec![
            "rsync".into(),
            // Times and modes kept, so a rerun's quick check skips what arrived.
            "--recursive".into(),
            "--times".into(),
            "--perms".into(),
            // Remote names are taken literally, never by a remote shell.
            "--protect-args".into(),
            "--files-from=-".into(),
            "--stats".into(),
            format!("--out-format={SENT_MARK}%n"),
            "--no-human-readable".into(),
            "-e".into(),
            self.rsync_shell(),
        ];
        if progress.is_some() {
            argv.push("--info=progress2".into());
        }
        argv.extend(ends.iter().map(|s| s.to_string()));
        let mut child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| SshError::Spawn {
                program: "rsync".into(),
                source,
            })?;
        let mut input = child.stdin.take().expect("piped stdin");
        let list: Vec<u8> = names
            .iter()
            .flat_map(|n| format!("{n}\n").into_bytes())
            .collect();
        let writer = std::thread::spawn(move || {
            let _ = input.write_all(&list);
        });
        let mut stderr = child.stderr.take().expect("piped stderr");
        let err_reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stderr.read_to_end(&mut s);
            s
        });
        // stdout carries progress lines (ended by \r) and, at the end, the stats.
        let mut stdout = child.stdout.take().expect("piped stdout");
        let mut all = Vec::new();
        let mut segment = Vec::new();
        let mut buf = [0u8; 8192];
        loop {
            let n = match stdout.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            all.extend_from_slice(&buf[..n]);
            for &b in &buf[..n] {
                if b == b'\r' || b == b'\n' {
                    if let (Some(bar), Some(done)) = (progress, progress_bytes(&segment)) {
                        bar.set_position(done);
                    }
                    segment.clear();
                } else {
                    segment.push(b);
                }
            }
        }
        let status = child.wait().map_err(|source| SshError::Spawn {
            program: "rsync".into(),
            source,
        })?;
        let _ = writer.join();
        let err = err_reader.join().unwrap_or_default();
        let text = String::from_utf8_lossy(&all);
        let transfer = Transfer {
            names: text
                .lines()
                .filter_map(|l| l.strip_prefix(SENT_MARK))
                .map(str::to_string)
                .collect(),
            bytes_sent: stat(&text, "Total bytes sent:"),
            bytes_received: stat(&text, "Total bytes received:"),
        };
        match status.code() {
            Some(0) => Ok(transfer),
            // 255 from ssh, 12 (protocol stream), 10 (socket), 30/35 (timeouts): the link.
            Some(code @ (255 | 12 | 10 | 30 | 35)) | Some(code @ 5) => Err(SshError::Unreachable {
                target: self.target(),
                detail: format!("rsync {what} stopped (exit {code}): {}", last_lines(&err)),
            }),
            code => Err(SshError::Remote {
                target: self.target(),
                what: format!("rsync {what}"),
                code: code.unwrap_or(-1),
                detail: last_lines(&err),
            }),
        }
    }
}

/// A started remote command: its stdout to read, then [`Spawned::wait`].
struct Spawned {
    child: std::process::Child,
    stdout: std::process::ChildStdout,
    writer: std::thread::JoinHandle<()>,
    err_reader: std::thread::JoinHandle<Vec<u8>>,
}

impl Spawned {
    /// The exit code (-1 when killed by a signal, as 255 is ssh's own) and stderr.
    fn wait(mut self) -> Result<(i32, Vec<u8>), SshError> {
        drop(self.stdout);
        let status = self.child.wait().map_err(|source| SshError::Spawn {
            program: "ssh".into(),
            source,
        })?;
        let _ = self.writer.join();
        let err = self.err_reader.join().unwrap_or_default();
        Ok((status.code().unwrap_or(-1), err))
    }
}

/// The leading byte count of an rsync `--info=progress2` line ("  1,234,567  45% ...").
fn progress_bytes(segment: &[u8]) -> Option<u64> {
    let text = std::str::from_utf8(segment).ok()?;
    let first = text.split_whitespace().next()?;
    let digits: String = first.chars().filter(|c| *c != ',' && *c != '.').collect();
    text.contains('%').then_some(())?;
    digits.parse().ok()
}

fn stat(text: &str, label: &str) -> u64 {
    text.lines()
        .find_map(|l| l.trim().strip_prefix(label))
        .and_then(|rest| {
            let digits: String = rest
                .split_whitespace()
                .next()?
                .chars()
                .filter(char::is_ascii_digit)
                .collect();
            digits.parse().ok()
        })
        .unwrap_or(0)
}

/// The last lines of a program's stderr, for a message.
fn last_lines(err: &[u8]) -> String {
    let text = String::from_utf8_lossy(err);
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    let tail = &lines[lines.len().saturating_sub(3)..];
    if tail.is_empty() {
        "no message".to_string()
    } else {
        tail.join("; ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_are_single_quoted_for_a_posix_shell() {
        assert_eq!(quote("plain"), "'plain'");
        assert_eq!(quote("it's $HOME `x`"), "'it'\\''s $HOME `x`'");
        assert_eq!(quote_argv(&["a b", ""]), "'a b' ''");
    }

    #[test]
    fn rsync_figures_are_read_from_its_stats() {
        let text = "Number of files: 3\nTotal bytes sent: 1,234\nTotal bytes received: 56\n";
        assert_eq!(stat(text, "Total bytes sent:"), 1234);
        assert_eq!(stat(text, "Total bytes received:"), 56);
        assert_eq!(
            progress_bytes(b"    1,048,576  45%   10.00MB/s    0:00:01"),
            Some(1048576)
        );
        assert_eq!(progress_bytes(b"sending incremental file list"), None);
    }
}
