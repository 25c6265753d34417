//! Secrets never reach the journal, a plan or a log: every occurrence of a secret
//! value in anything shown or stored is replaced by a mask.

use serde_json::Value as Json;

pub const MASK: &str = "********";

#[derive(Debug, Clone, Default)]
pub struct Redactor {
    secrets: Vec<String>,
}

impl Redactor {
    pub fn add(&mut self, value: &Json) {
        let text = match value {
            Json::String(s) => s.clone(),
            Json::Null => return,
            other => other.to_string(),
        };
        if !text.is_empty() && !self.secrets.contains(&text) {
            self.secrets.push(text);
            // Longest first, so a secret that contains another is masked whole.
            self.secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        }
    }

    pub fn text(&self, s: &str) -> String {
        let mut out = s.to_string();
        for secret in &self.secrets {
            if out.contains(secret.as_str()) {
                out = out.replace(secret.as_str(), MASK);
            }
        }
        out
    }

    pub fn json(&self, v: &Json) -> Json {
        if self.secrets.is_empty() {
            return v.clone();
        }
        match v {
            Json::String(s) => Json::String(self.text(s)),
            Json::Array(items) => Json::Array(items.iter().map(|i| self.json(i)).collect()),
            Json::Object(map) => {
                Json::Object(map.iter().map(|(k, v)| (k.clone(), self.json(v))).collect())
            }
            Json::Number(_) | Json::Bool(_) if self.secrets.contains(&v.to_string()) => {
                Json::String(MASK.into())
            }
            other => other.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masks_every_occurrence_longest_first() {
        let mut r = Redactor::default();
        r.add(&Json::from("tok"));
        r.add(&Json::from("tok-123"));
        assert_eq!(r.text("a tok-123 b tok"), "a ******** b ********");
        assert_eq!(
            r.json(&serde_json::json!({"h": ["x tok"]})),
            serde_json::json!({"h": ["x ********"]})
        );
    }
}
