//! The conformance suite (`support::conformance`) against a real NATS server with JetStream
//! (`nats-server -js`, from Debian's packages): per-key order, an outage, poison, kill -9 and
//! effectively-once (JetStream's duplicate window on `Nats-Msg-Id`).
//!
//! Each test starts its own server on a free port, with its JetStream store in the test's
//! scratch directory, so that the server killed for an outage (SIGKILL) keeps what it stored.
//! outboxd creates the stream of the test topic and the dead-letter subject
//! (`create_stream`); the topic the broker refuses has a stream of its own whose
//! `max_msg_size` is 2,000 bytes.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "nats")] // the sink this file tests: built in, or nothing to run

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream::{self, consumer, stream};
use futures::StreamExt;
use support::conformance::{Arrived, BrokerUnderTest, Refusal, conformance_tests};
use support::{free_port, scratch_dir, wait_until};

/// A NATS server of one test.
struct NatsServer {
    port: u16,
    store: PathBuf,
    child: Option<Child>,
    /// What the server asks of clients.
    auth: Auth,
}

/// How clients authenticate to a [`NatsServer`].
#[derive(Clone)]
enum Auth {
    None,
    User(&'static str, &'static str),
    Token(&'static str),
}

impl NatsServer {
    fn start() -> NatsServer {
        Self::start_with(Auth::None)
    }

    /// A server that lets in only clients with `auth` (a user and password, or a token).
    fn start_with(auth: Auth) -> NatsServer {
        let mut server = NatsServer {
            port: free_port(),
            store: scratch_dir("nats-js"),
            child: None,
            auth,
        };
        server.spawn();
        server
    }

    /// A client's options for this server's authentication.
    fn options(&self) -> async_nats::ConnectOptions {
        let options = async_nats::ConnectOptions::new();
        match self.auth {
            Auth::None => options,
            Auth::User(user, password) => options.user_and_password(user.into(), password.into()),
            Auth::Token(token) => options.token(token.into()),
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.store.join("nats-server.log"))
            .unwrap();
        let conf = self.store.join("nats-server.conf");
        let authorization = match self.auth {
            Auth::None => String::new(),
            Auth::User(user, password) => format!(
                "authorization {{\n  users = [ {{ user: {user:?}, password: {password:?} }} ]\n}}\n"
            ),
            Auth::Token(token) => format!("authorization {{\n  token: {token:?}\n}}\n"),
        };
        std::fs::write(&conf, authorization).unwrap();
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&conf)
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(&self.store)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("nats-server (apt-get install nats-server)");
        self.child = Some(child);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    async fn jetstream(&self) -> jetstream::Context {
        let client = self
            .options()
            .connect(self.url())
            .await
            .expect("connect to NATS");
        jetstream::new(client)
    }

    /// Waits until the server takes clients and its JetStream answers.
    async fn ready(&self) {
        let url = self.url();
        wait_until("NATS JetStream to answer", Duration::from_secs(30), || {
            let (url, options) = (url.clone(), self.options());
            async move {
                // JetStream's account information (read as JSON: every server version).
                match options.connect(url).await {
                    Ok(client) => client
                        .request("$JS.API.INFO", bytes::Bytes::new())
                        .await
                        .is_ok_and(|reply| !reply.payload.is_empty()),
                    Err(_) => false,
                }
            }
        })
        .await;
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

impl BrokerUnderTest for NatsServer {
    const KIND: &'static str = "nats";
    const EFFECTIVELY_ONCE: bool = true;

    fn section(&self) -> String {
        format!(
            "[sink.nats]\nurl = \"{}\"\ncreate_stream = true\nstream = \"outbox\"\n\
             subjects = [\"outbox.order\", \"outboxd.>\"]\ntimeout_ms = 5000\n",
            self.url()
        )
    }

    async fn down(&mut self) {
        self.kill();
    }

    async fn up(&mut self) {
        self.spawn();
        self.ready().await;
    }

    async fn read(&self, topic: &str) -> Vec<Arrived> {
        let js = self.jetstream().await;
        let Ok(name) = js.stream_by_subject(topic).await else {
            return Vec::new();
        };
        let stream = js.get_stream(&name).await.unwrap();
        let mut reader: consumer::PullConsumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: topic.to_owned(),
                deliver_policy: consumer::DeliverPolicy::All,
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await
            .unwrap();
        let pending = reader.info().await.unwrap().num_pending;
        let mut out = Vec::new();
        while (out.len() as u64) < pending {
            let want = usize::try_from(pending).unwrap() - out.len();
            let mut batch = reader
                .fetch()
                .max_messages(want.min(5000))
                .expires(Duration::from_secs(2))
                .messages()
                .await
                .unwrap();
            while let Some(message) = batch.next().await {
                out.push(arrived(&message.unwrap()));
            }
        }
        let consumer_name = reader.cached_info().name.clone();
        let _ = stream.delete_consumer(&consumer_name).await;
        out
    }

    async fn refuse(&self, topic: &str) -> Option<Refusal> {
        // A stream of its own for the topic, taking messages of 2,000 bytes at most, which
        // outboxd cannot know: JetStream refuses larger ones when it acknowledges them.
        self.jetstream()
            .await
            .create_stream(stream::Config {
                name: "refusing".into(),
                subjects: vec![topic.to_owned()],
                max_message_size: 2000,
                ..Default::default()
            })
            .await
            .unwrap();
        Some(Refusal {
            pad: 5000,
            reason: "too_large",
            detail: "maximum",
        })
    }
}

/// A message as the suite sees events: `key` and the payload apart; the `headers` header of a
/// dead letter (the row's headers as one JSON object) becomes one header per member; every
/// other header as it is.
fn arrived(message: &jetstream::Message) -> Arrived {
    let mut out = Arrived {
        key: String::new(),
        payload: String::from_utf8_lossy(&message.payload).into_owned(),
        headers: Vec::new(),
        shard: None,
    };
    let Some(headers) = &message.headers else {
        return out;
    };
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        for value in values {
            let value = value.as_str().to_owned();
            match name {
                "key" => out.key = value,
                "headers" => match serde_json::from_str::<serde_json::Map<_, _>>(&value) {
                    Ok(members) => out.headers.extend(members.into_iter().map(|(n, v)| {
                        let text = match v {
                            serde_json::Value::String(s) => s,
                            other => other.to_string(),
                        };
                        (n, text)
                    })),
                    Err(_) => out.headers.push((name.to_owned(), value)),
                },
                _ => out.headers.push((name.to_owned(), value)),
            }
        }
    }
    out
}

conformance_tests!(NatsServer::start());

/// `sink.nats.url` with a user and password, and with a token, against servers that let in
/// only those: events arrive; a wrong password stops outboxd with one line that does not show
/// it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_in_the_url_authenticate() {
    for (auth, userinfo) in [
        (Auth::User("outboxd", "nats-Pa55"), "outboxd:nats-Pa55@"),
        (Auth::Token("nats-T0ken"), "nats-T0ken@"),
    ] {
        let server = NatsServer::start_with(auth);
        server.ready().await;
        let url = format!("nats://{userinfo}127.0.0.1:{}", server.port);
        let section = format!(
            "[sink]\nkind = \"nats\"\n[sink.nats]\nurl = \"{url}\"\ncreate_stream = true\n\
             stream = \"outbox\"\nsubjects = [\"outbox.order\", \"outboxd.>\"]\ntimeout_ms = 5000\n"
        );
        let env = support::SinkEnv::start(&section).await;
        let mut run = env.run();
        let db = env.db().await;
        support::emit_txn(&db, 0, 20, 4).await;
        wait_until("the events in NATS", Duration::from_secs(30), || async {
            server.read(support::conformance::TOPIC).await.len() == 20
        })
        .await;
        run.sigterm();
        assert!(run.wait(Duration::from_secs(30)).success());

        // The wrong secret: refused, said once, not shown.
        let wrong = url.replace("nats-", "wrong-");
        let config = std::fs::read_to_string(&env.config)
            .unwrap()
            .replace(&url, &wrong);
        std::fs::write(&env.config, config).unwrap();
        let mut run = env.run();
        let status = run.wait(Duration::from_secs(30));
        let log = run.log_text();
        assert!(!status.success(), "{log}");
        assert!(log.contains("NATS refused outboxd"), "{log}");
        assert!(!log.contains("wrong-"), "the secret shows: {log}");
    }
}

/// A subject no JetStream stream takes is the broker refusing the events, not poison: nothing
/// is forwarded past it and nothing dead-lettered, outboxd says so (ERROR line, `/readyz`,
/// `outboxd_sink_refused`), and once a stream takes the subject the events arrive in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_no_stream_takes_stops_forwarding_and_dead_letters_nothing() {
    let server = NatsServer::start();
    server.ready().await;
    let js = server.jetstream().await;
    // A stream for the dead letters only: outboxd creates none (create_stream = false).
    js.create_stream(stream::Config {
        name: "dead".into(),
        subjects: vec!["outboxd.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let section = format!(
        "[sink]\nkind = \"nats\"\n[sink.nats]\nurl = \"{}\"\ntimeout_ms = 5000\n",
        server.url()
    );
    let env = support::SinkEnv::start(&section).await;
    let mut run = env.run();
    let db = env.db().await;
    let before = support::wal_insert_lsn(&db).await;
    support::emit_txn(&db, 0, 20, 4).await;
    support::wait_refusal(env.http_port, true).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        support::confirmed_flush(&db, "outboxd").await <= before,
        "the slot passed events no stream took"
    );
    assert!(server.read("outboxd.dlq").await.is_empty());
    let log = run.log_text();
    assert!(
        log.contains("ERROR") && log.contains("no JetStream stream stores this subject"),
        "{log}"
    );

    js.create_stream(stream::Config {
        name: "outbox".into(),
        subjects: vec![support::conformance::TOPIC.to_owned()],
        ..Default::default()
    })
    .await
    .unwrap();
    wait_until("the events in NATS", Duration::from_secs(60), || async {
        server.read(support::conformance::TOPIC).await.len() >= 20
    })
    .await;
    support::wait_refusal(env.http_port, false).await;
    let arrived = server.read(support::conformance::TOPIC).await;
    let seqs: Vec<u64> = arrived
        .iter()
        .map(|a| {
            serde_json::from_str::<serde_json::Value>(&a.payload).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        seqs,
        (0..20).collect::<Vec<_>>(),
        "each once, in commit order"
    );
    assert!(server.read("outboxd.dlq").await.is_empty());
    run.sigterm();
    assert!(run.wait(Duration::from_secs(30)).success());
}
