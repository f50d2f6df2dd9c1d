//! The one registration point: [`sinks!`](crate::sinks) turns a list of sink folders into
//! everything the binary needs to know about them.
//!
//! `sinks! { "redis" => redis::Redis, ... }` (in `lib.rs`, beside the folders' `mod` lines,
//! which stay outside the macro so that rustfmt reaches them), for each entry built in (its
//! cargo feature on), generates:
//!
//! - [`SinkSections`](crate::SinkSections): the `[sink.<name>]` sections, one field each;
//! - [`AnySink`](crate::AnySink): the configured broker, one variant each, a `Sink`
//!   (`outboxd_core::Sink`) that forwards to it;
//! - [`SINKS`](crate::SINKS): every registered name, with whether this build has it, so that
//!   `kind = "<name>"` of a sink left out of the build says which feature to turn on.
//!
//! Each entry's feature, module, `[sink] kind` and section carry the same name.

/// Registers the sink folders; see the module documentation. Use it once, in `lib.rs`.
#[macro_export]
macro_rules! sinks {
    ($($feature:literal => $module:ident :: $plugin:ident),+ $(,)?) => {
        #[cfg(not(any($(feature = $feature),+)))]
        compile_error!("outboxd needs at least one sink: turn on one of its cargo features");

        /// Every registered sink: its name, and whether this build has it.
        pub const SINKS: &[(&str, bool)] = &[$(($feature, cfg!(feature = $feature))),+];

        /// The sections `[sink.<name>]` of the sinks this build has.
        #[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
        #[serde(default)]
        pub struct SinkSections {
            $(
                #[doc = concat!("`[sink.", $feature, "]`.")]
                #[cfg(feature = $feature)]
                pub $module: <$module::$plugin as $crate::SinkPlugin>::Config,
            )+
        }

        /// The configured broker: one of the sinks this build has.
        #[derive(Debug)]
        // One per process, built once: the sinks' sizes differ, and boxing would buy nothing.
        #[allow(clippy::large_enum_variant)]
        pub enum AnySink {
            $(
                #[doc = concat!("The `", $feature, "` sink.")]
                #[cfg(feature = $feature)]
                $plugin(<$module::$plugin as $crate::SinkPlugin>::Sink),
            )+
        }

        impl outboxd_core::Sink for AnySink {
            fn name(&self) -> &'static str {
                match self {
                    $(
                        #[cfg(feature = $feature)]
                        AnySink::$plugin(s) => s.name(),
                    )+
                }
            }

            async fn send(
                &mut self,
                batch: &[outboxd_core::Record],
            ) -> Result<outboxd_core::Delivery, outboxd_core::SinkError> {
                match self {
                    $(
                        #[cfg(feature = $feature)]
                        AnySink::$plugin(s) => s.send(batch).await,
                    )+
                }
            }

            async fn ping(&mut self) -> Result<(), outboxd_core::SinkError> {
                match self {
                    $(
                        #[cfg(feature = $feature)]
                        AnySink::$plugin(s) => s.ping().await,
                    )+
                }
            }
        }

        impl AnySink {
            /// This sink's own checks for `outboxd check` (see
            /// [`SinkPlugin::preflight`]($crate::SinkPlugin::preflight)).
            pub async fn preflight(
                &mut self,
                sections: &SinkSections,
                ctx: &$crate::Preflight<'_>,
            ) -> Vec<$crate::CheckLine> {
                match self {
                    $(
                        #[cfg(feature = $feature)]
                        AnySink::$plugin(s) => {
                            <$module::$plugin as $crate::SinkPlugin>::preflight(
                                s,
                                &sections.$module,
                                ctx,
                            )
                            .await
                        }
                    )+
                }
            }
        }

        impl SinkSections {
            /// The section of sink `kind`, as a plugin call: `None` when this build does not
            /// have it.
            fn with<R>(
                &self,
                kind: &str,
                f: impl FnOnce(&dyn $crate::registry::Section) -> R,
            ) -> Option<R> {
                $(
                    #[cfg(feature = $feature)]
                    if kind == $feature {
                        return Some(f(&$crate::registry::Of::<$module::$plugin>(
                            &self.$module,
                        )));
                    }
                )+
                let _ = (kind, f);
                None
            }

            /// Builds sink `kind` (connections are made on first use).
            pub fn build(
                &self,
                kind: &str,
                ctx: &$crate::SinkContext<'_>,
            ) -> Result<AnySink, outboxd_core::SinkError> {
                $(
                    #[cfg(feature = $feature)]
                    if kind == $feature {
                        return <$module::$plugin as $crate::SinkPlugin>::build(
                            &self.$module,
                            ctx,
                        )
                        .map(AnySink::$plugin);
                    }
                )+
                let _ = ctx;
                Err(outboxd_core::SinkError::permanent(
                    "building the sink",
                    $crate::registry::unknown_kind(kind),
                ))
            }

            /// Where sink `kind`'s broker is, without secrets.
            pub fn target(&self, kind: &str) -> String {
                self.with(kind, |s| s.target()).unwrap_or_default()
            }

            /// How sink `kind`'s connection is secured, for `check`.
            pub fn security(&self, kind: &str) -> ($crate::CheckLevel, String) {
                self.with(kind, |s| s.security())
                    .unwrap_or(($crate::CheckLevel::Fail, $crate::registry::unknown_kind(kind)))
            }

            /// Whether sink `kind` makes a NULL payload a tombstone.
            pub fn tombstone_on_null(&self, kind: &str) -> bool {
                self.with(kind, |s| s.tombstone_on_null()).unwrap_or(false)
            }

            /// Checks every section without connecting.
            pub fn validate(&self) -> Result<(), $crate::SinkConfigError> {
                $(
                    #[cfg(feature = $feature)]
                    <$module::$plugin as $crate::SinkPlugin>::validate(&self.$module)?;
                )+
                Ok(())
            }

            /// Reads every section's secret files; `is_set(dotted key)` tells whether a key
            /// was given (`sink.<name>.<key>`).
            pub fn read_secret_files(
                &mut self,
                is_set: &dyn Fn(&str) -> bool,
            ) -> Result<(), $crate::SinkConfigError> {
                $(
                    #[cfg(feature = $feature)]
                    {
                        let prefix = concat!("sink.", $feature, ".");
                        let in_section = |key: &str| is_set(&format!("{prefix}{key}"));
                        <$module::$plugin as $crate::SinkPlugin>::read_secret_files(
                            &mut self.$module,
                            &in_section,
                        )?;
                    }
                )+
                let _ = is_set;
                Ok(())
            }

            /// Every section with its secrets replaced by `***`.
            pub fn redacted(&self) -> SinkSections {
                #[allow(unused_mut)]
                let mut c = self.clone();
                $(
                    #[cfg(feature = $feature)]
                    <$module::$plugin as $crate::SinkPlugin>::redact(&mut c.$module);
                )+
                c
            }

            /// The log directives of the sinks this build has
            /// ([`SinkPlugin::LOG_DIRECTIVES`]).
            pub fn log_directives() -> Vec<&'static str> {
                #[allow(unused_mut)]
                let mut directives = Vec::new();
                $(
                    #[cfg(feature = $feature)]
                    directives.extend_from_slice(
                        <$module::$plugin as $crate::SinkPlugin>::LOG_DIRECTIVES,
                    );
                )+
                directives
            }

            /// The free-form tables of the sections, as dotted paths
            /// (`sink.kafka.options`).
            pub fn open_tables() -> Vec<String> {
                #[allow(unused_mut)]
                let mut tables = Vec::new();
                $(
                    #[cfg(feature = $feature)]
                    for t in <$module::$plugin as $crate::SinkPlugin>::OPEN_TABLES {
                        tables.push(format!(concat!("sink.", $feature, ".{}"), t));
                    }
                )+
                tables
            }

            /// Whether sink `kind` supports `delivery = "effectively-once"` (`None`: this
            /// build does not have it).
            /// Whether sink `kind` offers the CloudEvents envelopes; `None` when this build has
            /// no such sink.
            pub fn cloudevents(kind: &str) -> Option<bool> {
                $(
                    #[cfg(feature = $feature)]
                    if kind == $feature {
                        return Some(<$module::$plugin as $crate::SinkPlugin>::CLOUDEVENTS);
                    }
                )+
                let _ = kind;
                None
            }

            pub fn effectively_once(kind: &str) -> Option<bool> {
                $(
                    #[cfg(feature = $feature)]
                    if kind == $feature {
                        return Some(<$module::$plugin as $crate::SinkPlugin>::EFFECTIVELY_ONCE);
                    }
                )+
                let _ = kind;
                None
            }
        }
    };
}

use crate::plugin::{CheckLevel, SinkPlugin};

/// A sink section seen through its plugin, for the calls that need no sink type.
pub trait Section {
    /// [`SinkPlugin::target`].
    fn target(&self) -> String;
    /// [`SinkPlugin::security`].
    fn security(&self) -> (CheckLevel, String);
    /// [`SinkPlugin::tombstone_on_null`].
    fn tombstone_on_null(&self) -> bool;
}

/// The section of plugin `P`.
pub struct Of<'a, P: SinkPlugin>(pub &'a P::Config);

impl<P: SinkPlugin> std::fmt::Debug for Of<'_, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple(P::NAME).field(self.0).finish()
    }
}

impl<P: SinkPlugin> Section for Of<'_, P> {
    fn target(&self) -> String {
        P::target(self.0)
    }

    fn security(&self) -> (CheckLevel, String) {
        P::security(self.0)
    }

    fn tombstone_on_null(&self) -> bool {
        P::tombstone_on_null(self.0)
    }
}

/// What to say of a `[sink] kind` this build does not have.
pub fn unknown_kind(kind: &str) -> String {
    match crate::SINKS.iter().find(|(name, _)| *name == kind) {
        Some((name, false)) => format!(
            "sink.kind = {name:?}: this build of outboxd has no {name} sink (it was built \
             without the `{name}` cargo feature)"
        ),
        _ => {
            let known: Vec<&str> = crate::SINKS
                .iter()
                .filter(|(_, built)| *built)
                .map(|(n, _)| *n)
                .collect();
            format!(
                "sink.kind = {kind:?} is not a sink outboxd knows: use one of {}",
                known.join(", ")
            )
        }
    }
}
