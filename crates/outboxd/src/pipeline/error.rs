//! Why `outboxd run` stops, or a replication session ends: the error the pipeline returns,
//! and which of its kinds a new session may overcome ([`RunError::is_transient`]).

use outboxd_core::{RouteError, SinkError};
use outboxd_postgres::slot::SlotError;
use outboxd_postgres::{ConnInfo, StreamError};

/// Why `run` stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Postgres could not be reached.
    #[error(
        "cannot connect to Postgres at {target}: {}. {advice}",
        crate::report::one_line(.source)
    )]
    Connect {
        /// The server, without password.
        target: String,
        /// What to do: the TLS setting to change, or where to look.
        advice: String,
        /// Why.
        #[source]
        source: tokio_postgres::Error,
    },
    /// Postgres is not set up for outboxd.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// The replication stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// Table-less events need the key their messages are signed with.
    #[error(
        "postgres.source = \"messages\" needs the key table-less events are signed with \
         (outboxd.message_keys), and this database has none: as the admin, apply sql/state.sql \
         and sql/role.sql"
    )]
    NoMessageKey,
    /// The route does not fit the table.
    #[error("the route does not fit the outbox table: {0}")]
    Route(#[from] RouteError),
    /// The broker could not be reached at startup.
    #[error(
        "cannot reach {broker} at {target}: {}. Check the [sink.{broker}] settings and that \
         the broker is running",
        crate::report::one_line(.source)
    )]
    BrokerUnreachable {
        /// The broker.
        broker: &'static str,
        /// Its address, without secrets.
        target: String,
        /// Why.
        #[source]
        source: SinkError,
    },
    /// The broker answered at startup and refused outboxd (credentials, permissions).
    #[error(
        "{broker} at {target} refused outboxd: {}",
        crate::report::one_line(.source)
    )]
    BrokerRefused {
        /// The broker.
        broker: &'static str,
        /// Its address, without secrets.
        target: String,
        /// Why.
        #[source]
        source: SinkError,
    },
    /// The broker failed in a way retrying cannot fix.
    #[error("{broker} failed permanently: {source}")]
    Sink {
        /// The broker.
        broker: &'static str,
        /// Why.
        #[source]
        source: SinkError,
    },
}

impl RunError {
    /// Postgres could not be reached at `conn`.
    pub fn connect(conn: &ConnInfo) -> impl FnOnce(tokio_postgres::Error) -> RunError + '_ {
        move |source| RunError::Connect {
            target: conn.to_string(),
            advice: conn
                .tls_advice(&crate::report::one_line(&source))
                .unwrap_or_else(|| {
                    "Check postgres.url and that Postgres is running and accepts connections \
                     from here"
                        .to_owned()
                }),
            source,
        }
    }

    /// The broker did not answer the startup ping: unreachable when retrying may help,
    /// refusing outboxd otherwise.
    pub(super) fn ping(broker: &'static str, target: String, source: SinkError) -> RunError {
        if source.is_transient() {
            RunError::BrokerUnreachable {
                broker,
                target,
                source,
            }
        } else {
            RunError::BrokerRefused {
                broker,
                target,
                source,
            }
        }
    }

    /// The dispatcher of a session ended (`ended`: what its task returned) while the session
    /// still had records for it.
    pub(super) fn dispatcher_ended(
        broker: &'static str,
        ended: Result<Result<(), SinkError>, tokio::task::JoinError>,
    ) -> RunError {
        let source = match ended {
            Ok(Err(e)) => e,
            Ok(Ok(())) => SinkError::permanent("the sink driver stopped", "its input closed"),
            Err(e) => SinkError::permanent("the sink driver panicked", e.to_string()),
        };
        RunError::Sink { broker, source }
    }

    /// Whether a new session may succeed.
    pub(super) fn is_transient(&self) -> bool {
        match self {
            RunError::Connect { .. } => true,
            RunError::Stream(e) => e.is_transient(),
            RunError::Slot(SlotError::Postgres { .. }) => true,
            _ => false,
        }
    }
}
