//! Unit tests of the module above.

use super::*;
use std::io::Write;

/// A configuration file in the temporary directory, removed on drop.
struct TempConfig(std::path::PathBuf);

impl TempConfig {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempConfig {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn write(text: &str) -> TempConfig {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!(
        "outboxd-config-test-{}-{n}.toml",
        std::process::id()
    ));
    let mut f = std::fs::File::create(&path).expect("create");
    f.write_all(text.as_bytes()).expect("write");
    TempConfig(path)
}

#[cfg(all(feature = "redis", feature = "kafka"))]
const DOCUMENTED_EXAMPLE: &str = r#"
[postgres]
url = "postgres://outboxd:secret@127.0.0.1:5432/app"
slot = "outboxd"
publication = "outboxd"
table = "public.outbox"

[route]
topic = "outbox.{aggregate_type}"
key = "{aggregate_id}"
id_column = "id"
type_column = "event_type"
payload_column = "payload"
headers_column = "headers"

[sink]
kind = "redis"
dead_letter = "outboxd.dlq"
delivery = "at-least-once"

[sink.redis]
url = "redis://127.0.0.1:6379"
stream_prefix = ""
maxlen = 0

[sink.kafka]
brokers = "127.0.0.1:9092"
offsets_topic = "outboxd.offsets"
[sink.kafka.options]
"compression.type" = "lz4"

[http]
listen = "127.0.0.1:9187"
"#;

#[test]
#[cfg(all(feature = "redis", feature = "kafka"))]
fn loads_the_documented_example() {
    let f = write(DOCUMENTED_EXAMPLE);
    let c = Config::load(f.path(), true, []).expect("loads");
    assert_eq!(
        c.postgres.url.expose(),
        "postgres://outboxd:secret@127.0.0.1:5432/app"
    );
    assert_eq!(c.sink.kind, "redis");
    assert_eq!(c.sink.sections.kafka.options["compression.type"], "lz4");
    assert!(!format!("{c:?}").contains("secret"));
    assert!(!c.redacted_toml().contains("secret"));
}

#[test]
#[cfg(all(feature = "redis", feature = "kafka"))]
fn environment_overrides_every_kind_of_key() {
    let f = write(DOCUMENTED_EXAMPLE);
    let env = [
        ("OUTBOXD_POSTGRES__URL", "postgres://u:pw2@db/app"),
        ("OUTBOXD_SINK__KIND", "kafka"),
        ("OUTBOXD_SINK__REDIS__MAXLEN", "5000"),
        ("OUTBOXD_POSTGRES__FAILOVER_SLOT", "true"),
        ("OUTBOXD_SINK__KAFKA__OPTIONS__LINGER.MS", "7"),
        ("OUTBOXD_CONFIG", "ignored: not a key override"),
        ("HOME", "/root"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let c = Config::load(f.path(), true, env).expect("loads");
    assert_eq!(c.postgres.url.expose(), "postgres://u:pw2@db/app");
    assert_eq!(c.sink.kind, "kafka");
    assert_eq!(c.sink.sections.redis.maxlen, 5000);
    assert!(c.postgres.failover_slot);
    assert_eq!(c.sink.sections.kafka.options["linger.ms"], "7");
}

#[test]
#[cfg(all(feature = "redis", feature = "kafka"))]
fn the_debezium_preset_changes_defaults_and_keys_set_still_win() {
    let f = write(
        "[postgres]\nurl = \"postgres://u@h/db\"\n[route]\npreset = \"debezium\"\nkey = \"{id}\"\n",
    );
    let c = Config::load(f.path(), true, []).expect("loads");
    let spec = c.route_spec();
    assert_eq!(spec.topic, "outbox.event.{aggregatetype}");
    assert_eq!(spec.key, "{id}", "set in the file");
    assert_eq!(spec.type_column, "type");
    assert_eq!(spec.headers_column, "");
    assert_eq!(
        spec.payload_encoding,
        outboxd_core::PayloadEncoding::JsonString
    );
    assert!(!c.route.type_header());
    let env = [
        ("OUTBOXD_ROUTE__TOPIC", "events"),
        ("OUTBOXD_ROUTE__EXPAND_JSON_PAYLOAD", "true"),
        ("OUTBOXD_ROUTE__HEADERS__TENANT", "{tenant}"),
        ("OUTBOXD_ROUTE__TIMESTAMP", "created"),
        ("OUTBOXD_SINK__KIND", "kafka"),
        ("OUTBOXD_SINK__KAFKA__TOMBSTONE_ON_NULL", "true"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let c = Config::load(f.path(), true, env).expect("loads");
    let spec = c.route_spec();
    assert_eq!(spec.topic, "events", "set in the environment");
    assert_eq!(
        spec.payload_encoding,
        outboxd_core::PayloadEncoding::JsonDocument
    );
    assert_eq!(
        spec.attributes,
        [("tenant".to_owned(), "{tenant}".to_owned())]
    );
    assert_eq!(
        spec.timestamp,
        outboxd_core::TimestampSource::Column("created".into())
    );
    assert!(spec.tombstone_on_null);

    // Without the preset: outboxd's defaults, the type header, no tombstones on Redis.
    let f =
        write("[postgres]\nurl = \"postgres://u@h/db\"\n[sink.kafka]\ntombstone_on_null = true\n");
    let c = Config::load(f.path(), true, []).expect("loads");
    assert_eq!(c.route_spec().topic, "outbox.{aggregate_type}");
    assert!(c.route.type_header());
    assert!(
        !c.route_spec().tombstone_on_null,
        "the redis sink has no tombstones"
    );
}

#[test]
#[cfg(feature = "redis")]
fn format_settings_that_cannot_work_are_refused() {
    let cases = [
        (
            "[route]\nexpand_json_payload = true",
            "preset = \"debezium\"",
        ),
        ("[route]\npreset = \"avro\"", "preset"),
        ("[route.headers]\n\"\" = \"x\"", "route.headers"),
        (
            "[sink.redis.fields]\npayload = \"id\"",
            "sink.redis.fields.payload",
        ),
        (
            "[sink.redis.fields]\nid = \"\"\ntype = \"\"\nkey = \"\"\npayload = \"\"\nheaders = \"\"",
            "at least one",
        ),
        ("[sink.redis.fields]\nbody = \"data\"", "body"),
        (
            "[sink]\nenvelope = \"cloudevents\"\n[route]\ntype_column = \"\"",
            "needs route.type_column",
        ),
        (
            "[sink]\nenvelope = \"cloudevents-structured\"\nsource = \" \"",
            "needs sink.source",
        ),
        ("[sink]\nenvelope = \"xml\"", "envelope"),
        (
            "[otel]\nendpoint = \"https://otel.example.com\"",
            "plain http://",
        ),
        #[cfg(feature = "nats")]
        (
            "[sink]\nkind = \"nats\"\nenvelope = \"cloudevents\"",
            "not supported by sink.kind = \"nats\"",
        ),
    ];
    for (text, expected) in cases {
        let f = write(&format!(
            "[postgres]\nurl = \"postgres://u@h/db\"\n{text}\n"
        ));
        let err = Config::load(f.path(), true, []).unwrap_err().to_string();
        assert!(err.contains(expected), "{text}: {err}");
    }
}

#[test]
#[cfg(all(feature = "redis", feature = "kafka"))]
fn linger_defaults_to_one_millisecond_and_is_bounded() {
    let f = write(DOCUMENTED_EXAMPLE);
    let c = Config::load(f.path(), true, []).expect("loads");
    assert_eq!(c.sink.linger_ms, 1);
    let env = |v: &str| [("OUTBOXD_SINK__LINGER_MS".to_owned(), v.to_owned())];
    let c = Config::load(f.path(), true, env("0")).expect("0 turns it off");
    assert_eq!(c.sink.linger_ms, 0);
    let err = Config::load(f.path(), true, env("5000"))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("sink.linger_ms must be between 0 and 1000"),
        "{err}"
    );
}

#[test]
#[cfg(all(feature = "redis", feature = "kafka"))]
fn unknown_keys_are_named() {
    let f = write("[postgres]\nurl = \"postgres://u@h/d\"\nslott = \"x\"\n");
    let err = Config::load(f.path(), true, []).unwrap_err();
    let text = err.to_string();
    assert!(text.contains("`postgres.slott`"), "{text}");
    assert!(text.contains("slot"), "{text}");

    let f = write("[sinks]\nkind = \"redis\"\n");
    assert!(
        Config::load(f.path(), true, [])
            .unwrap_err()
            .to_string()
            .contains("`sinks`")
    );

    let f = write("[postgres]\nurl = \"postgres://u@h/d\"\n");
    let env = [("OUTBOXD_SINK__REDIS__URLL".to_owned(), "x".to_owned())];
    let text = Config::load(f.path(), true, env).unwrap_err().to_string();
    assert!(
        text.contains("sink.redis.urll") && text.contains("OUTBOXD_SINK__REDIS__URLL"),
        "{text}"
    );
}

#[test]
#[cfg(all(feature = "redis", feature = "kafka"))]
fn bad_values_and_missing_url_are_clear() {
    let f = write("[postgres]\nurl = \"postgres://u@h/d\"\n[sink]\nkind = \"rabbitmq\"\n");
    let text = Config::load(f.path(), true, []).unwrap_err().to_string();
    assert!(text.contains("rabbitmq"), "{text}");
    assert!(!text.contains('\n'), "one line: {text}");

    let f = write("[postgres]\nurl = \"postgres://u@h/d\"\n");
    let env = [("OUTBOXD_SINK__REDIS__MAXLEN".to_owned(), "lots".to_owned())];
    let text = Config::load(f.path(), true, env).unwrap_err().to_string();
    assert!(text.contains("must be an integer"), "{text}");

    let f = write("");
    let text = Config::load(f.path(), true, []).unwrap_err().to_string();
    assert!(text.contains("OUTBOXD_POSTGRES__URL"), "{text}");

    let f = write("[postgres\n");
    let text = Config::load(f.path(), true, []).unwrap_err().to_string();
    assert!(
        text.contains("not valid TOML") && !text.contains('\n'),
        "{text}"
    );
}

#[test]
#[cfg(all(feature = "redis", feature = "kafka"))]
fn kafka_keys_load_and_options_that_weaken_the_producer_are_refused() {
    let f = write(
        "[postgres]\nurl = \"postgres://u@h/d\"\n[sink]\nkind = \"kafka\"\n\
         [sink.kafka]\nbrokers = \"k1:9092,k2:9092\"\ncreate_topics = true\n\
         topic_partitions = 6\ntopic_replication_factor = 3\n\
         [sink.kafka.options]\n\"security.protocol\" = \"sasl_ssl\"\n\
         \"sasl.password\" = \"kafka-Secr3t\"\n",
    );
    let env = [(
        "OUTBOXD_SINK__KAFKA__DELIVERY_TIMEOUT_MS".to_owned(),
        "5000".to_owned(),
    )];
    let c = Config::load(f.path(), true, env).expect("loads");
    let k = &c.sink.sections.kafka;
    assert_eq!(k.brokers, "k1:9092,k2:9092");
    assert!(k.create_topics);
    assert_eq!((k.topic_partitions, k.topic_replication_factor), (6, 3));
    assert_eq!(k.delivery_timeout_ms, 5000);
    assert_eq!(k.timeout_ms, 10_000);
    assert!(!format!("{c:?}").contains("kafka-Secr3t"));
    assert!(!c.redacted_toml().contains("kafka-Secr3t"));
    assert!(c.redacted_toml().contains("sasl_ssl"));

    for (name, value) in [
        ("enable.idempotence", "false"),
        ("acks", "1"),
        ("message.timeout.ms", "1000"),
    ] {
        let f = write(&format!(
            "[postgres]\nurl = \"postgres://u@h/d\"\n[sink.kafka.options]\n\"{name}\" = \"{value}\"\n"
        ));
        let text = Config::load(f.path(), true, []).unwrap_err().to_string();
        assert!(
            text.contains(name) && text.contains("may not be set"),
            "{text}"
        );
    }
    let f = write("[postgres]\nurl = \"postgres://u@h/d\"\n[sink.kafka]\ntopic_partitions = 0\n");
    let text = Config::load(f.path(), true, []).unwrap_err().to_string();
    assert!(text.contains("sink.kafka.topic_partitions"), "{text}");
}

#[test]
fn a_missing_file_is_an_error_only_when_named() {
    let missing = Path::new("/nonexistent/outboxd.toml");
    assert!(matches!(
        Config::load(missing, true, []),
        Err(ConfigError::Read { .. })
    ));
    let env = [(
        "OUTBOXD_POSTGRES__URL".to_owned(),
        "postgres://u@h/d".to_owned(),
    )];
    assert!(Config::load(missing, false, env).is_ok());
}

#[test]
fn durations_take_a_unit() {
    use std::time::Duration;
    assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
    assert_eq!(parse_duration("12h"), Ok(Duration::from_secs(12 * 3600)));
    assert_eq!(parse_duration(" 30m "), Ok(Duration::from_secs(1800)));
    assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
    assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
    assert!(parse_duration("7 weeks").is_err());
    assert!(parse_duration("d").is_err());
    let f = write("[postgres]\nurl = \"postgres://u@h/d\"\nprune_after = \"1y\"\n");
    let text = Config::load(f.path(), true, []).unwrap_err().to_string();
    assert!(
        text.contains("postgres.prune_after") && text.contains("\"y\""),
        "{text}"
    );
}

/// docs/configuration.md documents every key with its default and its environment
/// variable, and nothing else.
#[test]
fn the_configuration_reference_matches_the_keys() {
    let doc = include_str!("../../../../docs/configuration.md");
    let documented = documented_keys(doc);
    let mut keys = Vec::new();
    leaf_keys(&defaults_table(), "", &mut keys);
    for (key, default) in &keys {
        let Some((doc_default, env)) = documented.get(key) else {
            panic!("docs/configuration.md does not document `{key}`");
        };
        let want_env = format!("{ENV_PREFIX}{}", key.replace('.', "__").to_uppercase());
        assert!(
            env.starts_with(&format!("`{want_env}")),
            "`{key}`: documented environment {env}, expected {want_env}"
        );
        // `[sink] kind` defaults to the first sink of the build: the documented one,
        // redis, in the default build.
        let build_dependent = key == "sink.kind" && !cfg!(feature = "redis");
        if let Some(shown) = doc_default
            .strip_prefix('`')
            .and_then(|d| d.strip_suffix('`'))
            && !build_dependent
        {
            assert_eq!(
                &shown_default(default),
                shown,
                "the documented default of `{key}`"
            );
        }
    }
    // A sink this build was made without is documented too.
    let not_built = |key: &str| {
        outboxd_sinks::SINKS
            .iter()
            .any(|(name, built)| !built && key.starts_with(&format!("sink.{name}.")))
    };
    for key in documented.keys().filter(|k| !not_built(k)) {
        assert!(
            keys.iter().any(|(k, _)| k == key),
            "docs/configuration.md documents `{key}`, which is not a configuration key"
        );
    }
}

/// `section.key` → (default cell, environment cell) of the reference's tables.
fn documented_keys(doc: &str) -> std::collections::BTreeMap<String, (String, String)> {
    let mut keys = std::collections::BTreeMap::new();
    let mut section = String::new();
    for line in doc.lines() {
        if let Some(rest) = line.strip_prefix("## `[") {
            section = rest.trim_end_matches("]`").to_owned();
            continue;
        }
        let cells: Vec<&str> = line.split(" | ").map(str::trim).collect();
        let Some(key) = cells.first().and_then(|c| c.strip_prefix("| `")) else {
            continue;
        };
        let Some(key) = key.strip_suffix('`') else {
            continue;
        };
        if cells.len() >= 4 && cells[2].starts_with("`OUTBOXD_") && !section.is_empty() {
            keys.insert(
                format!("{section}.{key}"),
                (cells[1].to_owned(), cells[2].to_owned()),
            );
        }
    }
    keys
}

/// The keys of the defaults that take a value (free-form tables count as one key).
fn leaf_keys(table: &toml::Table, prefix: &str, out: &mut Vec<(String, toml::Value)>) {
    let open = keys::open_tables();
    for (key, value) in table {
        let dotted = if prefix.is_empty() {
            key.clone()
        } else {
            format!("{prefix}.{key}")
        };
        match value {
            toml::Value::Table(t) if !open.contains(&dotted) => leaf_keys(t, &dotted, out),
            v => out.push((dotted, v.clone())),
        }
    }
}

/// A default as the reference shows it: text as is (`""` when empty), the rest as TOML.
fn shown_default(value: &toml::Value) -> String {
    match value {
        toml::Value::String(s) if s.is_empty() => "\"\"".into(),
        toml::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[test]
#[cfg(feature = "nats")]
fn a_list_from_the_environment_is_comma_separated() {
    let env = [
        ("OUTBOXD_POSTGRES__URL", "postgres://u@h/d"),
        ("OUTBOXD_SINK__KIND", "nats"),
        ("OUTBOXD_SINK__NATS__SUBJECTS", "orders.>, outboxd.dlq ,"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()));
    let c = Config::load(Path::new("/nonexistent/outboxd.toml"), false, env).expect("loads");
    assert_eq!(c.sink.kind, "nats");
    assert_eq!(c.sink.sections.nats.subjects, ["orders.>", "outboxd.dlq"]);
}

#[test]
fn a_syntax_error_names_the_place_and_never_echoes_the_line() {
    let f = write("[postgres]\nurl = \"postgres://outboxd:hunter2@db/app\nslot = \"s\"\n");
    let text = Config::load(f.path(), true, []).unwrap_err().to_string();
    assert!(
        text.contains("not valid TOML") && text.contains("line 2"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "{text}");
    assert!(!text.contains('\n'), "one line: {text}");
}

#[test]
fn numbers_and_durations_out_of_range_name_the_key_and_the_range() {
    let f = write("[postgres]\nurl = \"postgres://u@h/d\"\n");
    for (var, value, expected) in [
        (
            "OUTBOXD_SINK__MAX_INFLIGHT_EVENTS",
            "9223372036854775807",
            "sink.max_inflight_events must be between 1 and 10000000",
        ),
        (
            "OUTBOXD_SINK__MAX_BATCH_EVENTS",
            "0",
            "sink.max_batch_events must be between 1 and 100000",
        ),
        (
            "OUTBOXD_SINK__MAX_INFLIGHT_BYTES",
            "99999999999999",
            "sink.max_inflight_bytes must be between 65536 and 4294967295",
        ),
        (
            "OUTBOXD_SINK__DRAIN_TIMEOUT_MS",
            "9223372036854775807",
            "sink.drain_timeout_ms must be between 0 and 3600000",
        ),
        (
            "OUTBOXD_POSTGRES__PRUNE_AFTER",
            "99999999999999999999d",
            "postgres.prune_after: \"99999999999999999999d\" is longer than",
        ),
    ] {
        let env = [(var.to_owned(), value.to_owned())];
        let text = Config::load(f.path(), true, env).unwrap_err().to_string();
        assert!(text.contains(expected), "{var}={value}: {text}");
    }
    // A sink's own section is checked too (when that sink is built in).
    #[cfg(feature = "redis")]
    {
        let env = [(
            "OUTBOXD_SINK__REDIS__TIMEOUT_MS".to_owned(),
            "9223372036854775807".to_owned(),
        )];
        let text = Config::load(f.path(), true, env).unwrap_err().to_string();
        assert!(
            text.contains("sink.redis.timeout_ms must be between 1 and 2147483647"),
            "{text}"
        );
    }
    assert!(parse_duration("36500d").is_ok());
    assert!(parse_duration("1e400").is_err());
}

#[test]
fn a_wal_sender_timeout_shorter_than_three_status_intervals_is_refused() {
    let f = write("[postgres]\nurl = \"postgres://u@h/d\"\nstatus_interval_ms = 5000\n");
    let env = [(
        "OUTBOXD_POSTGRES__WAL_SENDER_TIMEOUT_MS".to_owned(),
        "10000".to_owned(),
    )];
    let text = Config::load(f.path(), true, env).unwrap_err().to_string();
    assert!(
        text.contains("postgres.wal_sender_timeout_ms = 10000 must be at least three times"),
        "{text}"
    );
    // 0 keeps the server's setting, whatever the interval.
    let env = [(
        "OUTBOXD_POSTGRES__WAL_SENDER_TIMEOUT_MS".to_owned(),
        "0".to_owned(),
    )];
    assert!(Config::load(f.path(), true, env).is_ok());
}
