//! The pure domain of outboxd. Nothing in this crate touches the network; the only I/O is
//! reading a secret from the file a `*_file` key names ([`secret`]).
//!
//! The data flow, and where each piece lives:
//!
//! ```text
//! WAL ─▶ decode (outboxd-postgres) ─▶ route ([`route`]) ─▶ Record ([`event`])
//!     ─▶ Sink ([`sink`], implemented in outboxd-sinks) ─▶ broker ack
//!     ─▶ Checkpoint ([`checkpoint`]) ─▶ confirmed Lsn ([`lsn`]) ─▶ back to the slot
//! ```
//!
//! The one rule everything here serves: the slot is never confirmed past an event that the
//! broker has not acknowledged.

pub mod checkpoint;
pub mod event;
pub mod lsn;
pub mod origin;
pub mod route;
pub mod secret;
pub mod sink;

pub use checkpoint::Checkpoint;
pub use event::{Event, Headers, Poison, PoisonKind, Position, Record};
pub use lsn::{Lsn, WalHorizon};
pub use origin::{Marker, Trust, WalOrigin};
pub use route::{
    PayloadEncoding, RouteError, RouteSpec, Router, Template, TimestampSource, glob_escape,
    rfc3339_millis,
};
pub use secret::{Secret, SecretFileError, mask_token_url, mask_url, read_secret_file};
pub use sink::{Delivery, Ledger, Sink, SinkError};
