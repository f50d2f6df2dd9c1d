//! Turning errors into the one line an operator reads.

use std::error::Error;

/// `err` and its causes joined by `: `, each cause only when the text so far does not already
/// say it (many errors print their source themselves).
pub fn one_line(err: &(dyn Error + 'static)) -> String {
    let mut line = String::new();
    let mut next: Option<&(dyn Error + 'static)> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
        next = e.source();
    }
    line.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer: {0}")]
    struct Outer(#[source] Inner);

    #[derive(Debug, thiserror::Error)]
    #[error("inner")]
    struct Inner(#[source] std::io::Error);

    #[test]
    fn joins_causes_without_repeating_them() {
        let e = Outer(Inner(std::io::Error::other("disk on fire")));
        assert_eq!(one_line(&e), "outer: inner: disk on fire");
    }
}
