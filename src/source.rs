//! A runbook (or vars) file as text, plus an index from YAML paths to positions.
//!
//! serde_yaml reports positions only for errors it finds itself; the checks that
//! come after deserialization (duplicate ids, undefined template names, call cycles)
//! need to point into the file too, so the file is also read by yaml-rust2's event
//! parser once and every key and value is indexed by the same path syntax serde_yaml
//! uses in its messages (`steps[0].with.path`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use yaml_rust2::parser::{Event, MarkedEventReceiver, Parser};
use yaml_rust2::scanner::Marker;

/// The deepest a runbook or vars file may nest (the top mapping is level 1). serde_yaml
/// refuses deeper documents anyway (its recursion limit), but only after libyaml has
/// scanned the whole text, in time quadratic in the depth of flow nesting: 64 KB of
/// `[` took seconds. Such a file is refused before serde_yaml reads it.
pub const MAX_NESTING: usize = 128;

/// A 1-based line and column in a source file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Pos {
    pub line: usize,
    pub col: usize,
}

#[derive(Debug)]
pub struct SourceFile {
    /// The path as the user gave it (or as found on the search path); used in messages.
    pub path: PathBuf,
    pub text: String,
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
    /// Byte offset of each line's start: a diagnostic's snippet is found without
    /// scanning the file (one scan per error made `validate` quadratic in errors).
    line_starts: Vec<usize>,
    /// The text of every `<list>[i].id` scalar, so an error found by serde can name
    /// its step without parsing the file again.
    ids: HashMap<String, String>,
    /// Where the nesting first goes deeper than [`MAX_NESTING`].
    too_deep: Option<Pos>,
}

impl SourceFile {
    pub fn new(path: &Path, text: String) -> Self {
        let mut index = Indexer::default();
        // Syntax errors are reported by serde_yaml with a location; here a failed parse
        // only leaves the index partial, except when yaml-rust2 gives up on the nesting
        // (past 255 flow levels, before it reports any of their nodes).
        if let Err(e) = Parser::new_from_str(&text).load(&mut index, false)
            && e.info() == "recursion limit exceeded"
            && index.too_deep.is_none()
        {
            index.too_deep = Some(Pos {
                line: e.marker().line(),
                col: e.marker().col() + 1,
            });
        }
        let line_starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        SourceFile {
            path: path.to_path_buf(),
            text,
            values: index.values,
            keys: index.keys,
            line_starts,
            ids: index.ids,
            too_deep: index.too_deep,
        }
    }

    /// Refuses a file nested deeper than [`MAX_NESTING`], at the first node too deep
    /// (or, past 255 flow levels, where yaml-rust2 gave up). Call it before handing the
    /// text to serde_yaml.
    pub fn check_nesting(&self) -> Result<(), Pos> {
        self.too_deep.map_or(Ok(()), Err)
    }

    /// Position of the value at `path`, falling back to the nearest indexed ancestor.
    pub fn value_pos(&self, path: &str) -> Pos {
        let mut p = path.to_string();
        loop {
            if let Some(pos) = self.values.get(&p) {
                return *pos;
            }
            match parent_path(&p) {
                Some(parent) => p = parent,
                None => return Pos { line: 1, col: 1 },
            }
        }
    }

    /// Position of the key that introduces `path` (or of its value when it has no key).
    pub fn key_pos(&self, path: &str) -> Pos {
        self.keys
            .get(path)
            .copied()
            .unwrap_or_else(|| self.value_pos(path))
    }

    pub fn line_text(&self, line: usize) -> Option<&str> {
        let start = *self.line_starts.get(line.checked_sub(1)?)?;
        if start >= self.text.len() && line > 1 {
            return None;
        }
        let end = self
            .line_starts
            .get(line)
            .map_or(self.text.len(), |e| e - 1);
        let text = &self.text[start..end.max(start)];
        Some(text.strip_suffix('\r').unwrap_or(text))
    }

    /// The id of the step at `list_path` (`steps[2]`), as written.
    pub fn step_id(&self, list_path: &str) -> Option<&str> {
        self.ids.get(&format!("{list_path}.id")).map(String::as_str)
    }
}

/// `steps[0].with.path` -> `steps[0].with`; `steps[0]` -> `steps`; `steps` -> None.
pub fn parent_path(path: &str) -> Option<String> {
    if path.is_empty() {
        return None;
    }
    if path.ends_with(']') {
        return path.rfind('[').map(|i| path[..i].to_string());
    }
    Some(
        path.rfind('.')
            .map_or(String::new(), |i| path[..i].to_string()),
    )
}

fn child_key(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_string()
    } else {
        format!("{parent}.{key}")
    }
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

#[derive(Default)]
struct Indexer {
    stack: Vec<Frame>,
    values: HashMap<String, Pos>,
    keys: HashMap<String, Pos>,
    ids: HashMap<String, String>,
    too_deep: Option<Pos>,
}

impl Indexer {
    /// Decides the path of the node that starts now; returns None when it is a mapping key.
    fn node_path(&mut self, ev: &Event, pos: Pos) -> Option<String> {
        match self.stack.last_mut() {
            None => Some(String::new()),
            Some(Frame::Seq { path, next }) => {
                let p = format!("{path}[{next}]");
                *next += 1;
                Some(p)
            }
            Some(Frame::Map { path, key }) => match key.take() {
                Some(k) => Some(child_key(path, &k)),
                None => {
                    let k = match ev {
                        Event::Scalar(s, ..) => s.clone(),
                        _ => String::from("?"),
                    };
                    self.keys.insert(child_key(path, &k), pos);
                    *key = Some(k);
                    None
                }
            },
        }
    }
}

impl MarkedEventReceiver for Indexer {
    fn on_event(&mut self, ev: Event, mark: Marker) {
        let pos = Pos {
            line: mark.line(),
            col: mark.col() + 1,
        };
        match ev {
            Event::Scalar(..) | Event::Alias(..) => {
                if let Some(p) = self.node_path(&ev, pos) {
                    if let Event::Scalar(text, ..) = &ev
                        && p.ends_with("].id")
                    {
                        self.ids.insert(p.clone(), text.clone());
                    }
                    self.values.insert(p, pos);
                }
            }
            Event::MappingStart(..) | Event::SequenceStart(..) => {
                let is_map = matches!(ev, Event::MappingStart(..));
                let p = self.node_path(&ev, pos).unwrap_or_default();
                self.values.entry(p.clone()).or_insert(pos);
                self.stack.push(if is_map {
                    Frame::Map { path: p, key: None }
                } else {
                    Frame::Seq { path: p, next: 0 }
                });
                if self.stack.len() > MAX_NESTING && self.too_deep.is_none() {
                    self.too_deep = Some(pos);
                }
            }
            Event::MappingEnd | Event::SequenceEnd => {
                self.stack.pop();
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indexes_keys_and_values_by_serde_path() {
        let text = "version: 1\nsteps:\n  - id: a\n    with: {path: /x}\n";
        let src = SourceFile::new(Path::new("f.yaml"), text.to_string());
        assert_eq!(src.key_pos("steps"), Pos { line: 2, col: 1 });
        assert_eq!(src.value_pos("steps[0].id"), Pos { line: 3, col: 9 });
        assert_eq!(src.key_pos("steps[0].with"), Pos { line: 4, col: 5 });
        assert_eq!(
            src.value_pos("steps[0].with.path"),
            Pos { line: 4, col: 18 }
        );
        // Unknown paths fall back to the nearest ancestor.
        assert_eq!(
            src.value_pos("steps[0].with.nope"),
            Pos { line: 4, col: 11 }
        );
    }

    #[test]
    fn line_text_is_each_line_without_its_end() {
        let src = SourceFile::new(Path::new("f.yaml"), "a: 1\r\nb: 2\n\nc: 3".to_string());
        assert_eq!(src.line_text(1), Some("a: 1"));
        assert_eq!(src.line_text(2), Some("b: 2"));
        assert_eq!(src.line_text(3), Some(""));
        assert_eq!(src.line_text(4), Some("c: 3"));
        assert_eq!(src.line_text(5), None);
        assert_eq!(src.line_text(0), None);
        let src = SourceFile::new(Path::new("f.yaml"), "a: 1\n".to_string());
        assert_eq!(src.line_text(1), Some("a: 1"));
        assert_eq!(src.line_text(2), None);
    }

    #[test]
    fn parent_paths() {
        assert_eq!(parent_path("a.b[2]").as_deref(), Some("a.b"));
        assert_eq!(parent_path("a.b").as_deref(), Some("a"));
        assert_eq!(parent_path("a").as_deref(), Some(""));
        assert_eq!(parent_path(""), None);
    }
}
