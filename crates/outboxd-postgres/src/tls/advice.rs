//! What a failed connection means for TLS, and the setting to change.
//!
//! [`advice`] reads the message of a failed connection (with its causes, as rustls, the
//! server or outboxd's own negotiation word them) and, when it recognises a TLS problem, says
//! in one sentence what is wrong and which setting or file to change. It returns `None` for
//! any other message (a wrong password, say), so the caller's own message then stands alone,
//! and it never repeats the message it reads.

use super::PgTls;

/// What to do about a failed connection whose message (`error`, with its causes) shows a TLS
/// problem; `None` when it shows none. `host` is the server as configured.
pub fn advice(error: &str, tls: &PgTls, host: &str) -> Option<String> {
    let roots = tls
        .roots
        .as_ref()
        .map_or_else(|| "sslrootcert".to_owned(), ToString::to_string);
    if error.contains("UnknownIssuer") || error.contains("unknown issuer") {
        return Some(format!(
            "The server's certificate is not signed by a CA in {roots}: set sslrootcert to the \
             CA that signed it (managed services publish theirs), or check that outboxd \
             reaches the server you mean"
        ));
    }
    if error.contains("not valid for name") || error.contains("NotValidForName") {
        return Some(format!(
            "The server's certificate does not cover the host {host:?}{}: connect by a name \
             the certificate lists, or use sslmode=verify-ca to check the chain only",
            presented_names(error)
        ));
    }
    if error.contains("certificate expired") || error.contains("Expired") {
        return Some(format!(
            "The server's certificate has expired (checked against {roots}): renew the server's \
             certificate; outboxd does not connect to a server whose certificate it cannot trust"
        ));
    }
    if error.contains("not valid yet") || error.contains("NotValidYet") {
        return Some(
            "The server's certificate is not valid yet: check the clocks of this host and of \
             the server"
                .to_owned(),
        );
    }
    if error.contains("no encryption") {
        return Some(format!(
            "The server accepts only TLS connections from here (pg_hba.conf hostssl), and \
             sslmode={} sent none: set sslmode=verify-full with sslrootcert (or require)",
            tls.requested
        ));
    }
    if error.contains("server does not support TLS")
        || error.contains("server does not support SSL")
        || error.contains("SSLRequest rejected")
    {
        return Some(format!(
            "The server does not offer TLS, and sslmode={} needs it: turn on ssl in \
             postgresql.conf, or connect with sslmode=prefer",
            tls.requested
        ));
    }
    if error.contains("certificate") && (error.contains("client") || error.contains("sslcert")) {
        return Some(
            "The server wants a client certificate it trusts: set sslcert and sslkey to a \
             certificate signed by the server's ssl_ca_file whose CN is the role name"
                .to_owned(),
        );
    }
    if error.contains("invalid peer certificate") || error.contains("TLS handshake failed") {
        return Some(format!(
            "The TLS handshake failed with sslmode={}: check sslrootcert, sslcert and sslkey",
            tls.mode
        ));
    }
    None
}

/// The names a certificate covers, from rustls' `… is only valid for DnsName("a") or
/// IpAddress(…)` (the quoted ones), as ` (it names a, b)`; empty when the message has none.
fn presented_names(error: &str) -> String {
    let Some((_, names)) = error.split_once("is only valid for ") else {
        return String::new();
    };
    let quoted: Vec<&str> = names.split('"').skip(1).step_by(2).collect();
    if quoted.is_empty() {
        String::new()
    } else {
        format!(" (it names {})", quoted.join(", "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advice_names_what_to_change() {
        let tls = PgTls::disabled();
        let cases = [
            (
                "invalid peer certificate: UnknownIssuer",
                "not signed by a CA",
            ),
            (
                "invalid peer certificate: certificate not valid for name \"db\"; certificate is only valid for DnsName(\"localhost\")",
                "does not cover the host \"db\" (it names localhost)",
            ),
            (
                "invalid peer certificate: certificate expired: verification time 1 (UNIX), but certificate is not valid after 0 (1 seconds ago)",
                "has expired",
            ),
            (
                "no pg_hba.conf entry for host \"127.0.0.1\", user \"outboxd\", database \"app\", no encryption",
                "accepts only TLS",
            ),
            (
                "TLS error: server does not support TLS (SSLRequest rejected)",
                "does not offer TLS",
            ),
        ];
        for (error, expected) in cases {
            let text = advice(error, &tls, "db").unwrap_or_default();
            assert!(text.contains(expected), "{error}: {text}");
        }
        assert_eq!(advice("password authentication failed", &tls, "db"), None);
    }
}
