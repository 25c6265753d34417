//! Errors that point into a file: `FILE:LINE:COL`, the step, the field, a hint.

use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

use crate::source::{Pos, SourceFile};

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Diagnostic {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    /// The step id, when the error is inside a step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<String>,
    /// The YAML path of the offending field, e.g. `steps[1].with.path`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    /// The source line, for the snippet under the message.
    #[serde(skip)]
    pub snippet: Option<String>,
}

impl Diagnostic {
    pub fn at(src: &SourceFile, pos: Pos, message: impl Into<String>) -> Self {
        Diagnostic {
            file: src.path.clone(),
            line: pos.line,
            column: pos.col,
            step: None,
            field: None,
            message: message.into(),
            hint: None,
            snippet: src.line_text(pos.line).map(str::to_string),
        }
    }

    pub fn step(mut self, step: Option<&str>) -> Self {
        self.step = step.map(str::to_string);
        self
    }

    pub fn field(mut self, field: impl Into<String>) -> Self {
        let f = field.into();
        self.field = (!f.is_empty()).then_some(f);
        self
    }

    pub fn hint(mut self, hint: Option<String>) -> Self {
        self.hint = hint;
        self
    }
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: error: {}",
            self.file.display(),
            self.line,
            self.column,
            self.message
        )?;
        let mut context = Vec::new();
        if let Some(step) = &self.step {
            context.push(format!("step `{step}`"));
        }
        if let Some(field) = &self.field {
            context.push(format!("field `{field}`"));
        }
        if !context.is_empty() {
            write!(f, " ({})", context.join(", "))?;
        }
        if let Some(line) = &self.snippet {
            let num = self.line.to_string();
            let pad = " ".repeat(num.len());
            write!(f, "\n {num} | {line}")?;
            let caret_pad: String = line
                .chars()
                .take(self.column.saturating_sub(1))
                .map(|c| if c == '\t' { '\t' } else { ' ' })
                .collect();
            write!(f, "\n {pad} | {caret_pad}^")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, "\nhelp: {hint}")?;
        }
        Ok(())
    }
}

/// "did you mean" for a misspelt name, when one candidate is close enough.
pub fn did_you_mean<'a>(
    name: &str,
    candidates: impl IntoIterator<Item = &'a str>,
) -> Option<String> {
    candidates
        .into_iter()
        .map(|c| (strsim::jaro_winkler(name, c), c))
        .filter(|(score, _)| *score > 0.8)
        .max_by(|a, b| a.0.total_cmp(&b.0))
        .map(|(_, c)| format!("did you mean `{c}`?"))
}
