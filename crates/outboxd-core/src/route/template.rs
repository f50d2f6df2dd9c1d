//! Templates: text with `{column}` placeholders, parsed once and bound to a table's columns.
//!
//! `{{` and `}}` stand for literal braces. A bound template renders a row; a NULL column in
//! it is a [`Poison`] naming the column.

use bytes::Bytes;

use super::RouteError;
use crate::event::{Poison, PoisonKind};
/// A template that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A `{` without its `}`.
    #[error("unclosed '{{' at byte {at}")]
    Unclosed {
        /// Byte offset of the opening brace.
        at: usize,
    },
    /// A `}` that closes nothing (write `}}` for a literal brace).
    #[error("unmatched '}}' at byte {at} (write '}}}}' for a literal brace)")]
    Unmatched {
        /// Byte offset of the brace.
        at: usize,
    },
    /// `{}` names no column.
    #[error("empty placeholder '{{}}' at byte {at}")]
    EmptyPlaceholder {
        /// Byte offset of the opening brace.
        at: usize,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Part<C> {
    Text(String),
    Column(C),
}

/// A parsed template; column references are by name until bound to a table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Template {
    pub(super) parts: Vec<Part<String>>,
}

impl Template {
    /// Parses `{column}` placeholders and `{{`/`}}` escapes.
    pub fn parse(text: &str) -> Result<Self, TemplateError> {
        let mut parts = Vec::new();
        let mut literal = String::new();
        let mut chars = text.char_indices().peekable();
        while let Some((at, c)) = chars.next() {
            match c {
                '{' if chars.peek().map(|&(_, c)| c) == Some('{') => {
                    chars.next();
                    literal.push('{');
                }
                '}' if chars.peek().map(|&(_, c)| c) == Some('}') => {
                    chars.next();
                    literal.push('}');
                }
                '{' => {
                    let rest = &text[at + 1..];
                    let end = rest.find('}').ok_or(TemplateError::Unclosed { at })?;
                    let name = &rest[..end];
                    if name.is_empty() {
                        return Err(TemplateError::EmptyPlaceholder { at });
                    }
                    if name.contains('{') {
                        return Err(TemplateError::Unclosed { at });
                    }
                    if !literal.is_empty() {
                        parts.push(Part::Text(std::mem::take(&mut literal)));
                    }
                    parts.push(Part::Column(name.to_owned()));
                    // Skip the name and the closing brace.
                    for _ in 0..name.chars().count() + 1 {
                        chars.next();
                    }
                }
                '}' => return Err(TemplateError::Unmatched { at }),
                c => literal.push(c),
            }
        }
        if !literal.is_empty() {
            parts.push(Part::Text(literal));
        }
        Ok(Template { parts })
    }

    /// The columns the template refers to, in order of appearance.
    pub fn columns(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().filter_map(|p| match p {
            Part::Column(c) => Some(c.as_str()),
            Part::Text(_) => None,
        })
    }

    /// A Redis `SCAN MATCH` glob that matches every name the template can produce:
    /// placeholders become `*`, glob characters of the literal text are escaped.
    pub fn glob(&self) -> String {
        self.parts
            .iter()
            .map(|part| match part {
                Part::Column(_) => "*".to_owned(),
                Part::Text(t) => glob_escape(t),
            })
            .collect()
    }

    pub(super) fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    pub(super) fn bind(
        &self,
        field: &'static str,
        columns: &[String],
    ) -> Result<BoundTemplate, RouteError> {
        let parts = self
            .parts
            .iter()
            .map(|p| match p {
                Part::Text(t) => Ok(Part::Text(t.clone())),
                Part::Column(name) => Ok(Part::Column(BoundColumn {
                    index: column_index(field, name, columns)?,
                    name: name.clone(),
                })),
            })
            .collect::<Result<_, _>>()?;
        Ok(BoundTemplate { field, parts })
    }
}

/// `text` as a Redis glob that matches only itself.
pub fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

pub(super) fn column_index(
    field: &'static str,
    name: &str,
    columns: &[String],
) -> Result<usize, RouteError> {
    columns
        .iter()
        .position(|c| c == name)
        .ok_or_else(|| RouteError::UnknownColumn {
            field,
            column: name.to_owned(),
            available: columns.join(", "),
        })
}

#[derive(Clone, Debug)]
pub(super) struct BoundColumn {
    pub(super) index: usize,
    pub(super) name: String,
}

impl BoundColumn {
    pub(super) fn bind(
        field: &'static str,
        name: &str,
        columns: &[String],
    ) -> Result<Option<BoundColumn>, RouteError> {
        if name.is_empty() {
            return Ok(None);
        }
        Ok(Some(BoundColumn {
            index: column_index(field, name, columns)?,
            name: name.to_owned(),
        }))
    }

    /// The column's value, or the poison reason when it is NULL.
    pub(super) fn value(&self, field: &str, values: &[Option<Bytes>]) -> Result<Bytes, Poison> {
        values.get(self.index).cloned().flatten().ok_or_else(|| {
            Poison::new(
                PoisonKind::NullField,
                format!("{field} column {:?} is NULL", self.name),
            )
        })
    }
}

#[derive(Clone, Debug)]
pub(super) struct BoundTemplate {
    field: &'static str,
    parts: Vec<Part<BoundColumn>>,
}

impl BoundTemplate {
    pub(super) fn render(&self, values: &[Option<Bytes>]) -> Result<Bytes, Poison> {
        // The common template `{column}` is the column's value itself: no copy.
        if let [Part::Column(col)] = self.parts.as_slice() {
            return col.value(self.field, values);
        }
        let mut out = Vec::new();
        for part in &self.parts {
            match part {
                Part::Text(t) => out.extend_from_slice(t.as_bytes()),
                Part::Column(col) => out.extend_from_slice(&col.value(self.field, values)?),
            }
        }
        Ok(Bytes::from(out))
    }
}
