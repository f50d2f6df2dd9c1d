//! Secrets in configuration: wrapped so that they cannot be printed by accident, read from
//! files for Kubernetes and Docker secrets, and masked in URLs that are shown.
//!
//! The contract: a [`Secret`]'s `Debug` shows `"***"`, never the value; a secret file's
//! content never appears in an error; [`mask_url`] keeps everything of a connection string
//! but its secrets.
//! Reading a secret file is the one piece of I/O in this crate: configuration types of every
//! crate use it, and it has no other dependency than `std`.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A secret string: its `Debug` never shows it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    /// Wraps `value`.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// Whether it is empty (not set).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A secret file (`…_file` key) cannot be used. Its content is never shown.
#[derive(Debug, thiserror::Error)]
#[error("cannot read {key} {path:?}: {source}")]
pub struct SecretFileError {
    /// The dotted key naming the file.
    pub key: &'static str,
    /// The file.
    pub path: String,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

/// Reads the secret in file `path`, named by configuration key `key`: the file's text
/// without its trailing line break (secret files written by `echo` or editors end with one).
/// An empty file is an error.
pub fn read_secret_file(key: &'static str, path: &str) -> Result<String, SecretFileError> {
    let error = |source| SecretFileError {
        key,
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(error)?;
    let value = text.trim_end_matches(['\n', '\r']);
    if value.is_empty() {
        return Err(error(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "the file is empty",
        )));
    }
    Ok(value.to_owned())
}

/// Replaces every secret of a connection string with `***`, for showing it: the password
/// of each `scheme://user:password@host` URL (several URLs may be given, separated by
/// commas, as NATS takes them), password-like query parameters (`?password=…`, libpq's
/// `sslpassword`, a `token`), and the values of `password` and `sslpassword` in libpq's
/// `key = value` form, quoted (`password='a b'`) or not, with or without spaces around `=`.
/// A user name without a password (`postgres://outboxd@db`) stays: it is not a secret.
pub fn mask_url(url: &str) -> String {
    mask(url, false)
}

/// [`mask_url`] for URLs whose user part alone is a secret: a NATS token
/// (`nats://TOKEN@host`) is shown as `nats://***@host`.
pub fn mask_token_url(url: &str) -> String {
    mask(url, true)
}

fn mask(text: &str, bare_userinfo_is_secret: bool) -> String {
    if !text.contains("://") {
        return mask_key_values(text);
    }
    split_urls(text)
        .iter()
        .map(|url| mask_one_url(url, bare_userinfo_is_secret))
        .collect::<Vec<_>>()
        .join(",")
}

/// `text` cut at each comma that begins another `scheme://` URL. Commas inside one URL (the
/// host list of a Postgres URL, `postgres://u:p@a:5432,b:5432/db`) do not cut it.
fn split_urls(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut start = 0;
    for (i, _) in text.match_indices(',') {
        if i >= start && starts_with_scheme(text[i + 1..].trim_start()) {
            parts.push(&text[start..i]);
            start = i + 1;
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Whether `text` starts with `scheme://` (RFC 3986: a letter, then letters, digits, `+`,
/// `-` or `.`).
fn starts_with_scheme(text: &str) -> bool {
    let Some((scheme, _)) = text.split_once("://") else {
        return false;
    };
    let mut chars = scheme.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
}

fn mask_one_url(url: &str, bare_userinfo_is_secret: bool) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    // The query starts at the first `?` or `#`; the user part ends at the last `@` before
    // it, so that a password with an unencoded `/` or `@` is still masked whole.
    let query_at = rest.find(['?', '#']).unwrap_or(rest.len());
    let (before_query, query) = rest.split_at(query_at);
    let (userinfo, host_and_path) = match before_query.rfind('@') {
        Some(at) => (Some(&before_query[..at]), &before_query[at + 1..]),
        None => (None, before_query),
    };
    let userinfo = match userinfo {
        None => String::new(),
        Some(info) => match info.split_once(':') {
            Some((user, _)) => format!("{user}:***@"),
            None if bare_userinfo_is_secret && !info.is_empty() => "***@".to_owned(),
            None => format!("{info}@"),
        },
    };
    format!("{scheme}://{userinfo}{host_and_path}{}", mask_query(query))
}

/// Whether a parameter of that name holds a secret.
fn is_secret_name(name: &str) -> bool {
    let name = name.trim().to_ascii_lowercase();
    name.contains("password") || name.contains("token") || name.contains("secret")
}

/// `?a=1&password=x#f` with secret parameters' values masked.
fn mask_query(query: &str) -> String {
    let Some(params) = query.strip_prefix('?') else {
        return query.to_owned();
    };
    let (params, fragment) = params.split_at(params.find('#').unwrap_or(params.len()));
    let masked: Vec<String> = params
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((name, _)) if is_secret_name(name) => format!("{name}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("?{}{fragment}", masked.join("&"))
}

/// libpq's `key = value` form with the secret values masked; the pairs are written back as
/// `key=value`, values as they were given (quotes kept).
fn mask_key_values(text: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut rest = text.trim_start();
    while !rest.is_empty() {
        let key_end = rest
            .find(|c: char| c == '=' || c.is_whitespace())
            .unwrap_or(rest.len());
        let key = &rest[..key_end];
        rest = rest[key_end..].trim_start();
        let Some(after_eq) = rest.strip_prefix('=') else {
            // Not a pair: keep the word as it is.
            out.push(key.to_owned());
            continue;
        };
        rest = after_eq.trim_start();
        let value_len = key_value_len(rest);
        let value = &rest[..value_len];
        rest = rest[value_len..].trim_start();
        if is_secret_name(key) {
            out.push(format!("{key}=***"));
        } else {
            out.push(format!("{key}={value}"));
        }
    }
    out.join(" ")
}

/// The length of the value at the start of `text`, as libpq reads it: up to the next
/// whitespace, or a single-quoted string (`\'` and `\\` escaped); a backslash escapes the
/// next character in either.
fn key_value_len(text: &str) -> usize {
    let quoted = text.starts_with('\'');
    let mut escaped = false;
    for (i, c) in text.char_indices().skip(usize::from(quoted)) {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if quoted && c == '\'' {
            return i + 1;
        } else if !quoted && c.is_whitespace() {
            return i;
        }
    }
    text.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_secret_never_shows_in_debug() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s:?}"), "\"***\"");
        assert_eq!(s.expose(), "hunter2");
    }

    #[test]
    fn masks_passwords_in_urls() {
        assert_eq!(
            mask_url("postgres://outboxd:pw@db:5432/app"),
            "postgres://outboxd:***@db:5432/app"
        );
        assert_eq!(mask_url("redis://:pw@r:6379"), "redis://:***@r:6379");
        assert_eq!(mask_url("redis://r:6379"), "redis://r:6379");
        assert_eq!(
            mask_url("postgres://outboxd@db/app"),
            "postgres://outboxd@db/app"
        );
        // A multi-host Postgres URL is one URL.
        assert_eq!(
            mask_url("postgres://u:pw@a:5432,b:5433/app?target_session_attrs=read-write"),
            "postgres://u:***@a:5432,b:5433/app?target_session_attrs=read-write"
        );
        // Unencoded `/` and `@` in the password.
        assert_eq!(
            mask_url("postgres://u:p/a@ss@db/app"),
            "postgres://u:***@db/app"
        );
        // libpq takes the password as a query parameter too.
        assert_eq!(
            mask_url("postgresql://db/app?user=u&password=pw&sslmode=require"),
            "postgresql://db/app?user=u&password=***&sslmode=require"
        );
        assert_eq!(
            mask_url("postgres://db/app?sslpassword=k#x"),
            "postgres://db/app?sslpassword=***#x"
        );
    }

    #[test]
    fn masks_every_url_of_a_list_and_tokens() {
        assert_eq!(
            mask_url("nats://u:p1@a:4222,nats://u:p2@b:4222"),
            "nats://u:***@a:4222,nats://u:***@b:4222"
        );
        assert_eq!(
            mask_url("nats://u:p1@a:4222, tls://v:p2@b:4222"),
            "nats://u:***@a:4222, tls://v:***@b:4222"
        );
        assert_eq!(
            mask_token_url("nats://s3cr3t-token@a:4222,nats://b:4222"),
            "nats://***@a:4222,nats://b:4222"
        );
        assert_eq!(mask_token_url("nats://u:p@a:4222"), "nats://u:***@a:4222");
        assert_eq!(mask_token_url("nats://a:4222"), "nats://a:4222");
    }

    #[test]
    fn masks_passwords_in_key_value_strings() {
        for (given, shown) in [
            (
                "host=db user=u password=pw dbname=app",
                "host=db user=u password=*** dbname=app",
            ),
            (
                "host=db password = pw dbname=app",
                "host=db password=*** dbname=app",
            ),
            ("password= pw host=db", "password=*** host=db"),
            (
                "host=db password='a b c' user=u",
                "host=db password=*** user=u",
            ),
            (r"password='it\'s secret' host=db", "password=*** host=db"),
            (r"password=a\ b host=db", "password=*** host=db"),
            ("host=db sslpassword=k", "host=db sslpassword=***"),
            (
                "host=db application_name='my app'",
                "host=db application_name='my app'",
            ),
            ("password='unterminated", "password=***"),
        ] {
            let masked = mask_url(given);
            assert_eq!(masked, shown, "{given}");
            for secret in ["pw", "a b c", "secret", "a\\ b", "=k", "unterminated"] {
                assert!(!masked.contains(secret), "{given} shows {secret}: {masked}");
            }
        }
    }

    #[test]
    fn secret_files_lose_their_line_break_and_may_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("outboxd-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("pw");
        std::fs::write(&file, "s3cret\n").unwrap();
        let path = file.to_string_lossy().into_owned();
        assert_eq!(read_secret_file("k", &path).unwrap(), "s3cret");
        std::fs::write(&file, "\n").unwrap();
        let err = read_secret_file("k", &path).unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let err = read_secret_file("k", "/nonexistent/x").unwrap_err();
        assert!(err.to_string().starts_with("cannot read k"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
