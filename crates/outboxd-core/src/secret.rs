//! Secrets in configuration: wrapped so that they cannot be printed by accident, read from
//! files for Kubernetes and Docker secrets, and masked in URLs that are shown.
//!
//! The contract: a [`Secret`]'s `Debug` shows `"***"`, never the value; a secret file's
//! content never appears in an error; [`mask_url`] keeps everything of a URL but its password.
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

/// Replaces the password of a `scheme://user:password@host` URL (or a `password=` pair) with
/// `***`.
pub fn mask_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        if let Some((userinfo, host)) = authority.rsplit_once('@') {
            let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            return format!("{scheme}://{masked}@{host}{tail}");
        }
        return url.to_owned();
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***".to_owned()
            } else {
                kv.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
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
            mask_url("host=db user=u password=pw dbname=app"),
            "host=db user=u password=*** dbname=app"
        );
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
