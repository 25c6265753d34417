//! Secrets never reach the journal, a plan or a log: every occurrence of a secret
//! value in anything shown or stored is replaced by a mask.
//!
//! A value does not always leave the engine as it was given. In a URL it is
//! percent-encoded (`%20` or `+` for a space, upper or lower hex, some characters left
//! as they are), in a JSON document its `"`, `\` and control characters are escaped
//! (once, or twice when JSON text is itself kept as a JSON string), and in an HTTP
//! basic-auth header it is base64 of `user:secret`, at an alignment that depends on the
//! user name. One pattern per secret covers all of these: each character of the secret
//! matches itself or any of its encoded spellings, and the base64 forms are the part of
//! the encoding that the secret's bytes alone decide, at each of the three offsets.

use std::sync::{Arc, Mutex, OnceLock};

use regex::Regex;
use serde_json::Value as Json;

pub const MASK: &str = "********";

/// A base64 fragment shorter than this is not masked: a few base64 characters occur in
/// ordinary text by chance, and masking them would garble it. Secrets of 5 bytes or
/// more always have a fragment at least this long at every offset; shorter ones are
/// found by decoding instead (see [`Redactor::short_in_base64`]).
const MIN_BASE64_FRAGMENT: usize = 6;
/// Secrets shorter than this have no base64 fragment of [`MIN_BASE64_FRAGMENT`] at every
/// offset.
const SHORT_SECRET: usize = 5;

#[derive(Debug, Clone, Default)]
pub struct Redactor {
    /// Longest first, so a secret that contains another is masked whole.
    secrets: Vec<String>,
    /// Every secret and its encoded forms; `None` while there is no secret.
    pattern: Option<Arc<Regex>>,
}

impl Redactor {
    pub fn add(&mut self, value: &Json) {
        let text = match value {
            Json::String(s) => s.clone(),
            Json::Null => return,
            other => other.to_string(),
        };
        self.add_text(&text);
    }

    fn add_text(&mut self, text: &str) {
        if self.learn(text) {
            register_for_logs(text);
        }
    }

    /// Adds a secret; false when it was known (or empty).
    fn learn(&mut self, text: &str) -> bool {
        if text.is_empty() || self.secrets.iter().any(|s| s == text) {
            return false;
        }
        self.secrets.push(text.to_string());
        self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        self.pattern = Some(Arc::new(build_pattern(&self.secrets)));
        true
    }

    /// Learns every secret another redactor knows (a called runbook's, once it ran).
    pub fn absorb(&mut self, other: &Redactor) {
        for s in &other.secrets {
            self.add_text(s);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.secrets.is_empty()
    }

    /// Whether the text holds a secret (in any of its forms).
    pub fn finds_in(&self, s: &str) -> bool {
        self.pattern.as_ref().is_some_and(|p| p.is_match(s)) || !self.short_in_base64(s).is_empty()
    }

    /// The byte ranges of base64 words in `s` that decode to printable text holding a
    /// secret too short to have a base64 fragment of its own (`Basic dXNlcjpwdzEy` for
    /// the password `pw12`). A whole word is masked, and only when its decoding is text:
    /// ordinary words decode to binary, so they are left alone.
    fn short_in_base64(&self, s: &str) -> Vec<std::ops::Range<usize>> {
        let short: Vec<&[u8]> = self
            .secrets
            .iter()
            .filter(|x| x.len() < SHORT_SECRET)
            .map(|x| x.as_bytes())
            .collect();
        if short.is_empty() {
            return Vec::new();
        }
        static WORD: OnceLock<Regex> = OnceLock::new();
        let word =
            WORD.get_or_init(|| Regex::new("[A-Za-z0-9+/_-]{4,}={0,2}").expect("a valid regex"));
        word.find_iter(s)
            .filter(|m| {
                decode_base64(m.as_str()).is_some_and(|bytes| {
                    bytes.iter().all(|b| (0x20..0x7f).contains(b))
                        && short
                            .iter()
                            .any(|x| bytes.windows(x.len()).any(|w| w == *x))
                })
            })
            .map(|m| m.range())
            .collect()
    }

    /// Whether a value holds a secret anywhere in it.
    pub fn finds_in_json(&self, v: &Json) -> bool {
        !self.is_empty() && &self.json(v) != v
    }

    pub fn text(&self, s: &str) -> String {
        let masked = match &self.pattern {
            Some(p) => p.replace_all(s, MASK).into_owned(),
            None => return s.to_string(),
        };
        let words = self.short_in_base64(&masked);
        if words.is_empty() {
            return masked;
        }
        let mut out = String::with_capacity(masked.len());
        let mut at = 0;
        for w in words {
            out.push_str(&masked[at..w.start]);
            out.push_str(MASK);
            at = w.end;
        }
        out.push_str(&masked[at..]);
        out
    }

    pub fn json(&self, v: &Json) -> Json {
        if self.secrets.is_empty() {
            return v.clone();
        }
        match v {
            Json::String(s) => Json::String(self.text(s)),
            Json::Array(items) => Json::Array(items.iter().map(|i| self.json(i)).collect()),
            Json::Object(map) => Json::Object(
                map.iter()
                    .map(|(k, v)| (self.text(k), self.json(v)))
                    .collect(),
            ),
            Json::Number(_) | Json::Bool(_) if self.secrets.contains(&v.to_string()) => {
                Json::String(MASK.into())
            }
            other => other.clone(),
        }
    }
}

/// Every secret any redactor of this process learnt: the log writer masks with it
/// (debug logs of libraries such as the HTTP client see URLs and headers).
fn log_redactor() -> &'static Mutex<Redactor> {
    static LOG: OnceLock<Mutex<Redactor>> = OnceLock::new();
    LOG.get_or_init(|| Mutex::new(Redactor::default()))
}

fn register_for_logs(secret: &str) {
    log_redactor()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .learn(secret);
}

/// Masks every secret this process has seen (for log lines).
pub fn mask_for_logs(s: &str) -> String {
    log_redactor()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .text(s)
}

/// Standard or URL-safe base64 (padding optional); None when `word` is not that.
fn decode_base64(word: &str) -> Option<Vec<u8>> {
    let digits = word.trim_end_matches('=');
    if digits.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for c in digits.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    Some(out)
}

/// One alternation of every secret's spellings, longest source first.
fn build_pattern(secrets: &[String]) -> Regex {
    let mut forms: Vec<String> = Vec::new();
    for secret in secrets {
        forms.push(secret.clone());
        for alphabet in [BASE64_STD, BASE64_URL] {
            for offset in 0..3 {
                let fragment = base64_fragment(secret.as_bytes(), offset, alphabet);
                if fragment.len() >= MIN_BASE64_FRAGMENT && !forms.contains(&fragment) {
                    forms.push(fragment);
                }
            }
        }
    }
    forms.sort_by_key(|f| std::cmp::Reverse(f.len()));
    let source: Vec<String> = forms.iter().map(|f| spellings(f)).collect();
    regex::RegexBuilder::new(&source.join("|"))
        .size_limit(256 << 20)
        .build()
        .unwrap_or_else(|_| {
            // Too large to compile with every spelling (a secret of many kilobytes):
            // mask the forms as they are, which still covers the raw value.
            let literal: Vec<String> = forms.iter().map(|f| regex::escape(f)).collect();
            regex::RegexBuilder::new(&literal.join("|"))
                .size_limit(1 << 30)
                .build()
                .expect("an alternation of escaped literals compiles")
        })
}

/// A regex matching `text` with each character spelt as itself, percent-encoded (any
/// hex case; `+` for a space), or JSON-escaped (as serde_json writes it, `\uXXXX`, or
/// escaped twice).
fn spellings(text: &str) -> String {
    let mut out = String::from("(?:");
    for c in text.chars() {
        let mut alternatives: Vec<String> = vec![regex::escape(c.encode_utf8(&mut [0; 4]))];
        let mut bytes = [0u8; 4];
        let percent: String = c
            .encode_utf8(&mut bytes)
            .bytes()
            .map(|b| format!("%{}{}", hex_class(b >> 4), hex_class(b & 0xf)))
            .collect();
        alternatives.push(percent);
        if c == ' ' {
            alternatives.push(regex::escape("+"));
        }
        let once = json_escape_char(c);
        if once != c.to_string() {
            let twice: String = once.chars().map(json_escape_char).collect();
            alternatives.push(regex::escape(&twice));
            alternatives.push(regex::escape(&once));
        }
        if c == '/' {
            alternatives.push(regex::escape("\\/"));
        }
        if (c as u32) <= 0xffff {
            let code = c as u32;
            alternatives.push(format!(
                "\\\\u{}{}{}{}",
                hex_class((code >> 12) as u8 & 0xf),
                hex_class((code >> 8) as u8 & 0xf),
                hex_class((code >> 4) as u8 & 0xf),
                hex_class(code as u8 & 0xf)
            ));
        }
        out.push_str("(?:");
        out.push_str(&alternatives.join("|"));
        out.push(')');
    }
    out.push(')');
    out
}

/// One hex digit, matching either case.
fn hex_class(nibble: u8) -> String {
    let digit = char::from_digit(u32::from(nibble), 16).unwrap_or('0');
    if digit.is_ascii_alphabetic() {
        format!("[{}{}]", digit, digit.to_ascii_uppercase())
    } else {
        digit.to_string()
    }
}

/// A character as serde_json writes it inside a string.
fn json_escape_char(c: char) -> String {
    match c {
        '"' => "\\\"".into(),
        '\\' => "\\\\".into(),
        '\n' => "\\n".into(),
        '\r' => "\\r".into(),
        '\t' => "\\t".into(),
        '\u{8}' => "\\b".into(),
        '\u{c}' => "\\f".into(),
        c if (c as u32) < 0x20 => format!("\\u{:04x}", c as u32),
        c => c.to_string(),
    }
}

const BASE64_STD: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const BASE64_URL: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";

/// The base64 characters that `secret`'s bytes alone decide when it starts `offset`
/// bytes (0, 1 or 2) into a 3-byte group of a longer encoded text: whatever comes
/// before or after it, these characters appear in that text's encoding.
fn base64_fragment(secret: &[u8], offset: usize, alphabet: &[u8; 64]) -> String {
    let mut data = vec![0u8; offset];
    data.extend_from_slice(secret);
    let bits = data.len() * 8;
    // Characters 6-bit aligned: the first ones mix in the bytes before the secret, the
    // last one the bytes after it.
    let first = (offset * 8).div_ceil(6);
    let end = bits / 6;
    (first..end)
        .map(|i| {
            let bit = i * 6;
            let (byte, shift) = (bit / 8, bit % 8);
            let hi = u16::from(data[byte]) << 8;
            let lo = u16::from(data.get(byte + 1).copied().unwrap_or(0));
            let sextet = ((hi | lo) >> (10 - shift)) & 0x3f;
            char::from(alphabet[sextet as usize])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An independent encoder, for the tests only.
    fn base64(data: &[u8]) -> String {
        let mut out = String::new();
        for chunk in data.chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
            for i in 0..4 {
                if i <= chunk.len() {
                    out.push(char::from(
                        BASE64_STD[((n >> (18 - 6 * i)) & 0x3f) as usize],
                    ));
                } else {
                    out.push('=');
                }
            }
        }
        out
    }

    fn redactor(secrets: &[&str]) -> Redactor {
        let mut r = Redactor::default();
        for s in secrets {
            r.add(&Json::from(*s));
        }
        r
    }

    #[test]
    fn masks_every_occurrence_longest_first() {
        let r = redactor(&["tok", "tok-123"]);
        assert_eq!(r.text("a tok-123 b tok"), "a ******** b ********");
        assert_eq!(
            r.json(&serde_json::json!({"h": ["x tok"]})),
            serde_json::json!({"h": ["x ********"]})
        );
    }

    #[test]
    fn masks_percent_encoded_forms_in_either_hex_case_and_with_plus_for_space() {
        let r = redactor(&["p@ss w/rd:é"]);
        for encoded in [
            "p%40ss%20w%2Frd%3A%C3%A9",
            "p%40ss+w%2frd%3a%c3%a9",
            "p@ss%20w/rd:%C3%A9",
            "%70%40ss w/rd:é",
        ] {
            assert_eq!(
                r.text(&format!("GET http://h/x?t={encoded}&n=1")),
                "GET http://h/x?t=********&n=1",
                "{encoded}"
            );
        }
        // A near miss is left alone.
        assert_eq!(r.text("p%40ss%20w%2Frd"), "p%40ss%20w%2Frd");
    }

    #[test]
    fn masks_json_escaped_forms_once_or_twice() {
        let secret = "a\"b\\c\nd\u{1}e/f";
        let r = redactor(&[secret]);
        let once = serde_json::to_string(secret).unwrap();
        let twice = serde_json::to_string(&once).unwrap();
        assert_eq!(r.text(&once), format!("\"{MASK}\""));
        assert_eq!(r.text(&twice), format!("\"\\\"{MASK}\\\"\""));
        assert_eq!(r.text("a\\u0022b\\u005Cc\\u000ad\\u0001e\\/f"), MASK);
        // Inside a JSON value that is itself text.
        let doc = serde_json::json!({"body": format!("{{\"token\": {once}}}")});
        assert!(!r.json(&doc).to_string().contains("c\\nd"));
    }

    #[test]
    fn masks_the_middle_of_a_base64_encoding_at_every_alignment() {
        let secret = "s3cr3t-v4lue!";
        let r = redactor(&[secret]);
        for user in ["", "u", "us", "use", "admin", "operator"] {
            let header = format!("Basic {}", base64(format!("{user}:{secret}").as_bytes()));
            let masked = r.text(&header);
            assert!(masked.contains(MASK), "{user}: {header} -> {masked}");
            // What is left of the encoding decides at most the secret's edges.
            let left = masked.replace(MASK, "");
            assert!(left.len() < header.len() - 10, "{header} -> {masked}");
        }
        // URL-safe alphabet too.
        let raw = base64(format!("x{secret}").as_bytes());
        let url_safe = raw.replace('+', "-").replace('/', "_");
        assert!(r.text(&url_safe).contains(MASK), "{url_safe}");
        // And a base64 fragment that went through percent-encoding.
        let pct = raw
            .replace('+', "%2B")
            .replace('/', "%2F")
            .replace('=', "%3D");
        assert!(r.text(&pct).contains(MASK), "{pct}");
    }

    #[test]
    fn a_short_secret_is_masked_in_base64_text_and_ordinary_words_are_left() {
        for secret in ["ab", "pw1", "pw12"] {
            let r = redactor(&[secret]);
            for user in ["u", "us", "usr", "user"] {
                let header = format!(
                    "Authorization: Basic {}",
                    base64(format!("{user}:{secret}").as_bytes())
                );
                assert_eq!(
                    r.text(&header),
                    format!("Authorization: Basic {MASK}"),
                    "{secret} {user}"
                );
                assert!(r.finds_in(&header));
            }
            // Words that decode to binary, not text, are not base64 of anything shown.
            let prose = "Hello world, this restore was verified";
            assert_eq!(r.text(prose), prose, "{secret}");
        }
        // `YWJj` is base64 of `abc`: it holds `ab`.
        assert_eq!(
            redactor(&["ab"]).text("YWJj and ab"),
            format!("{MASK} and {MASK}")
        );
    }

    #[test]
    fn finds_secrets_in_values_and_learns_from_another_redactor() {
        let mut r = redactor(&["one-secret"]);
        assert!(r.finds_in_json(&serde_json::json!(["x", {"k": "a one-secret b"}])));
        assert!(!r.finds_in_json(&serde_json::json!({"k": "clean"})));
        r.absorb(&redactor(&["two-secret"]));
        assert_eq!(r.text("one-secret two-secret"), format!("{MASK} {MASK}"));
        assert!(mask_for_logs("log: two-secret").contains(MASK));
    }
}
