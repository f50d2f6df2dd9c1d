//! The conformance suite (`support::conformance`) against a real Redis server: per-key order,
//! an outage, poison, kill -9 and effectively-once (entry ids from WAL positions).
//!
//! Each test starts its own `redis-server` with an append-only file fsynced at every write, so
//! that the server stopped for an outage (SIGKILL) keeps what it acknowledged.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test
#![cfg(feature = "redis")] // the sink this file tests: built in, or nothing to run

mod support;

use support::conformance::{Arrived, BrokerUnderTest, Refusal, conformance_tests};
use support::{Entry, Redis, read_stream, scratch_dir};

/// A Redis server of one test.
struct RedisServer(Redis);

impl RedisServer {
    fn start() -> RedisServer {
        RedisServer(Redis::start_persistent(&scratch_dir("redis-aof")))
    }
}

impl BrokerUnderTest for RedisServer {
    const KIND: &'static str = "redis";
    const EFFECTIVELY_ONCE: bool = true;

    fn section(&self) -> String {
        format!("[sink.redis]\nurl = \"{}\"\n", self.0.url())
    }

    fn limited_section(&self) -> String {
        format!("{}max_event_bytes = 1048576\n", self.section())
    }

    async fn down(&mut self) {
        self.0.stop();
    }

    async fn up(&mut self) {
        self.0.start_again();
    }

    async fn read(&self, topic: &str) -> Vec<Arrived> {
        let mut conn = self.0.connect().await;
        read_stream(&mut conn, topic)
            .await
            .into_iter()
            .map(arrived)
            .collect()
    }

    async fn refuse(&self, topic: &str) -> Option<Refusal> {
        // A key that holds a string: XADD answers WRONGTYPE.
        let mut conn = self.0.connect().await;
        let () = redis::cmd("SET")
            .arg(topic)
            .arg("not a stream")
            .query_async(&mut conn)
            .await
            .unwrap();
        Some(Refusal {
            pad: 0,
            reason: "rejected",
            detail: "WRONGTYPE",
        })
    }
}

/// A stream entry as the suite sees events: the `headers` field's JSON object becomes one
/// header per member (kept whole when it is not an object); the other fields but `key` and
/// `payload` are headers as they are.
fn arrived(entry: Entry) -> Arrived {
    let mut out = Arrived {
        key: String::new(),
        payload: String::new(),
        headers: Vec::new(),
        shard: None,
    };
    for (name, value) in entry.fields {
        match name.as_str() {
            "key" => out.key = value,
            "payload" => out.payload = value,
            "headers" => match serde_json::from_str::<serde_json::Map<_, _>>(&value) {
                Ok(members) => out.headers.extend(members.into_iter().map(|(n, v)| {
                    let text = match v {
                        serde_json::Value::String(s) => s,
                        other => other.to_string(),
                    };
                    (n, text)
                })),
                Err(_) => out.headers.push((name, value)),
            },
            _ => out.headers.push((name, value)),
        }
    }
    out
}

conformance_tests!(RedisServer::start());
