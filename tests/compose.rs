//! docker-compose.yml, the Dockerfile and the container scripts, checked without a Docker
//! engine (there is none on CI): the YAML parses, the services, images, settings and files it
//! relies on are there, and the environment it gives outboxd is a valid outboxd configuration
//! for both sinks.
#![allow(clippy::unwrap_used, clippy::expect_used)]
// test code: a panic is a failed test
// The compose file runs both sinks: only a build with both can load its configuration.
#![cfg(all(feature = "redis", feature = "kafka"))]

use std::path::{Path, PathBuf};

use outboxd::config::Config;
use yaml_rust2::{Yaml, YamlLoader};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn read(path: &str) -> String {
    std::fs::read_to_string(root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn compose() -> Yaml {
    let docs = YamlLoader::load_from_str(&read("docker-compose.yml")).expect("valid YAML");
    assert_eq!(docs.len(), 1);
    docs.into_iter().next().unwrap()
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    let s = &compose["services"][name];
    assert!(!s.is_badvalue(), "no service {name:?}");
    s
}

fn text<'a>(y: &'a Yaml, what: &str) -> &'a str {
    y.as_str()
        .unwrap_or_else(|| panic!("{what} is not a string: {y:?}"))
}

/// A service's `environment` as (name, value) pairs; numbers and booleans as text.
fn environment(service: &Yaml) -> Vec<(String, String)> {
    let env = service["environment"]
        .as_hash()
        .expect("environment is a map");
    env.iter()
        .map(|(k, v)| {
            let value = match v {
                Yaml::String(s) => s.clone(),
                Yaml::Integer(i) => i.to_string(),
                Yaml::Boolean(b) => b.to_string(),
                other => panic!("unexpected value {other:?}"),
            };
            (text(k, "name").to_owned(), value)
        })
        .collect()
}

fn env_value(service: &Yaml, name: &str) -> String {
    environment(service)
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
        .unwrap_or_else(|| panic!("{name} is not set"))
}

fn strings(y: &Yaml) -> Vec<String> {
    y.as_vec()
        .expect("a list")
        .iter()
        .map(|v| text(v, "item").to_owned())
        .collect()
}

#[test]
fn postgres_is_17_with_logical_wal_and_the_schema_applied_at_init() {
    let c = compose();
    let pg = service(&c, "postgres");
    assert!(text(&pg["image"], "image").starts_with("postgres:17"));
    let command = strings(&pg["command"]).join(" ");
    assert!(command.contains("wal_level=logical"), "{command}");
    let volumes = strings(&pg["volumes"]);
    assert!(
        volumes.contains(&"./sql:/outboxd-sql:ro".to_owned()),
        "{volumes:?}"
    );
    let init = volumes
        .iter()
        .find(|v| v.contains(":/docker-entrypoint-initdb.d/"))
        .expect("an init script in /docker-entrypoint-initdb.d");
    let script_path = init.split(':').next().unwrap().trim_start_matches("./");
    let script = read(script_path);
    for needle in [
        "/outboxd-sql/outbox.sql",
        "/outboxd-sql/state.sql",
        "/outboxd-sql/role.sql",
        "ALTER ROLE outboxd PASSWORD",
        "OUTBOXD_PASSWORD",
    ] {
        assert!(script.contains(needle), "{script_path} lacks {needle}");
    }
    for file in ["outbox.sql", "state.sql", "role.sql"] {
        assert!(root().join("sql").join(file).exists(), "sql/{file}");
    }

    // The password the init script sets is the one outboxd connects with.
    let password = env_value(pg, "OUTBOXD_PASSWORD");
    let url = env_value(service(&c, "outboxd"), "OUTBOXD_POSTGRES__URL");
    assert!(
        url.starts_with(&format!("postgres://outboxd:{password}@postgres:5432/")),
        "{url}"
    );
    assert_eq!(
        url.rsplit('/').next(),
        Some(env_value(pg, "POSTGRES_DB").as_str())
    );
}

#[test]
fn kafka_is_the_official_image_in_kraft_mode_on_one_node() {
    let c = compose();
    let kafka = service(&c, "kafka");
    // The Kafka version the tests run: the one pinned in scripts/kafka/pom.xml.
    let pom = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/kafka/pom.xml"),
    )
    .expect("read scripts/kafka/pom.xml");
    let tested = pom
        .split("<kafka.version>")
        .nth(1)
        .and_then(|rest| rest.split("</kafka.version>").next())
        .expect("kafka.version in the POM");
    assert_eq!(
        text(&kafka["image"], "image"),
        format!("apache/kafka:{tested}"),
        "docker-compose.yml runs the Kafka version the tests run"
    );
    assert_eq!(env_value(kafka, "KAFKA_PROCESS_ROLES"), "broker,controller");
    // Transactions (effectively-once) need the internal topics' replication factor of 1 on
    // one node.
    for name in [
        "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
        "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
    ] {
        assert_eq!(env_value(kafka, name), "1", "{name}");
    }
    assert_eq!(
        env_value(kafka, "KAFKA_CONTROLLER_QUORUM_VOTERS"),
        "1@kafka:9093"
    );
    let advertised = env_value(kafka, "KAFKA_ADVERTISED_LISTENERS");
    let brokers = env_value(service(&c, "outboxd"), "OUTBOXD_SINK__KAFKA__BROKERS");
    assert!(
        advertised.contains(&format!("PLAINTEXT://{brokers}")),
        "{advertised}"
    );
    // Topics are not created on first use there: outboxd creates them.
    assert_eq!(env_value(kafka, "KAFKA_AUTO_CREATE_TOPICS_ENABLE"), "false");
    assert_eq!(
        env_value(service(&c, "outboxd"), "OUTBOXD_SINK__KAFKA__CREATE_TOPICS"),
        "true"
    );

    let redis = service(&c, "redis");
    assert!(text(&redis["image"], "image").starts_with("redis:"));
}

#[test]
fn outboxd_is_built_here_waits_for_healthy_services_and_runs_setup_then_run() {
    let c = compose();
    let o = service(&c, "outboxd");
    assert_eq!(text(&o["build"]["context"], "context"), ".");
    let dockerfile = read(text(&o["build"]["dockerfile"], "dockerfile"));
    assert!(dockerfile.contains("FROM rust:1"), "a rust:1 build stage");
    assert!(
        dockerfile.contains("FROM debian:bookworm-slim"),
        "a slim runtime stage"
    );
    assert!(dockerfile.contains("libssl3") && dockerfile.contains("zlib1g"));
    assert!(dockerfile.contains("--locked"));
    assert!(read(".dockerignore").contains("target/"));

    let entrypoint = strings(&o["entrypoint"]);
    assert_eq!(entrypoint, ["/usr/local/bin/outboxd-entrypoint"]);
    assert!(
        dockerfile.contains("COPY docker/outboxd-entrypoint.sh /usr/local/bin/outboxd-entrypoint")
    );
    let script = read("docker/outboxd-entrypoint.sh");
    let setup = script.find("outboxd setup").expect("runs outboxd setup");
    let run = script
        .find("exec outboxd run")
        .expect("then execs outboxd run");
    assert!(setup < run);

    for dependency in ["postgres", "kafka", "redis"] {
        assert_eq!(
            text(&o["depends_on"][dependency]["condition"], "condition"),
            "service_healthy",
            "outboxd waits for {dependency}"
        );
        assert!(
            !service(&c, dependency)["healthcheck"]["test"].is_badvalue(),
            "{dependency} has a healthcheck"
        );
    }

    #[cfg(unix)]
    for script in ["docker/outboxd-entrypoint.sh", "docker/postgres-init.sh"] {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(root().join(script))
            .unwrap()
            .permissions()
            .mode();
        assert!(mode & 0o111 != 0, "{script} is not executable");
        let status = std::process::Command::new("sh")
            .arg("-n")
            .arg(root().join(script))
            .status()
            .unwrap();
        assert!(status.success(), "{script} has a shell syntax error");
    }
}

/// The environment compose gives outboxd, with `${OUTBOXD_SINK:-kafka}` resolved as compose
/// would for `sink`.
fn outboxd_env(sink: Option<&str>) -> Vec<(String, String)> {
    environment(service(&compose(), "outboxd"))
        .into_iter()
        .map(|(k, v)| {
            let v = v.replace("${OUTBOXD_SINK:-kafka}", sink.unwrap_or("kafka"));
            assert!(!v.contains("${"), "unresolved variable in {k}={v}");
            (k, v)
        })
        .collect()
}

#[test]
fn the_environment_switch_chooses_the_sink_and_every_variable_is_a_known_key() {
    assert_eq!(
        env_value(service(&compose(), "outboxd"), "OUTBOXD_SINK__KIND"),
        "${OUTBOXD_SINK:-kafka}"
    );
    let nowhere = Path::new("/nonexistent/outboxd.toml");
    for (sink, kind) in [
        (None, "kafka"),
        (Some("kafka"), "kafka"),
        (Some("redis"), "redis"),
    ] {
        let config = Config::load(nowhere, false, outboxd_env(sink)).unwrap_or_else(|e| {
            panic!("the compose environment is not a valid configuration: {e}")
        });
        assert_eq!(config.sink.kind, kind);
        assert_eq!(config.sink.sections.kafka.brokers, "kafka:9092");
        assert!(config.sink.sections.kafka.create_topics);
        assert_eq!(config.sink.sections.kafka.topic_replication_factor, 1);
        assert_eq!(
            config.sink.sections.redis.url.expose(),
            "redis://redis:6379"
        );
        assert_eq!(config.http.listen, "0.0.0.0:9187");
    }
}
