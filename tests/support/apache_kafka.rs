//! Real Apache Kafka brokers for the tests, from the official jars (`scripts/kafka/pom.xml`,
//! installed by `ensure_kafka` in `scripts/lib.sh`).
//!
//! A [`Kafka`] is one cluster in KRaft mode: every node is broker and controller at once, the
//! controllers are the static voters of the metadata quorum. One node, or three with
//! replication factor 3 and `min.insync.replicas = 2` for every topic (the internal ones
//! included). Each node is a `java` process with its own ports (from [`free_port`]), data
//! directory and log under the test's scratch directory. The test can kill (SIGKILL), stop
//! (SIGTERM, a controlled shutdown) and start each node again; every JVM still running is
//! killed by its PID when the cluster is dropped, also when the test panics.
//!
//! The jars: `OUTBOXD_TEST_KAFKA_JARS` (a directory of jars), else `.local/kafka/*/jars` in the
//! repository (the newest version there).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::metadata::Metadata;

use super::{free_port, scratch_dir};

/// The SCRAM user a [`Security::SaslSsl`] cluster knows.
pub const SCRAM_USER: &str = "outboxd";

/// The directory of Kafka's jars, or a panic that says how to install them.
pub fn jars_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("OUTBOXD_TEST_KAFKA_JARS") {
        return PathBuf::from(dir);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.local/kafka");
    let mut found: Vec<PathBuf> = fs::read_dir(&root)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("jars"))
        .filter(|jars| jars.is_dir())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!(
            "Apache Kafka's jars are not installed: run scripts/test.sh (it fetches them from \
             Maven Central), or `source scripts/lib.sh && ensure_kafka`, or set \
             OUTBOXD_TEST_KAFKA_JARS to a directory of Kafka's jars"
        )
    })
}

/// How clients reach the brokers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// Plaintext only.
    Plaintext,
    /// A SASL_SSL listener (SCRAM-SHA-512 over TLS, with the certificate and key of a PEM
    /// file) for the client under test, beside the plaintext one that the brokers and the
    /// test's own consumers use.
    SaslSsl {
        /// PEM file with the broker's private key (PKCS#8) and certificate.
        keystore: PathBuf,
        /// The password of [`SCRAM_USER`].
        password: String,
    },
}

struct Node {
    id: u32,
    /// The plaintext listener: the brokers' own traffic and the tests' consumers.
    port: u16,
    controller_port: u16,
    /// The SASL_SSL listener, when the cluster has one.
    secure_port: Option<u16>,
    dir: PathBuf,
    child: Option<Child>,
}

/// A running Kafka cluster; see the module documentation.
pub struct Kafka {
    nodes: Vec<Node>,
    jars: PathBuf,
    dir: PathBuf,
}

impl Kafka {
    /// One node.
    pub fn single() -> Kafka {
        Self::start(1, Security::Plaintext)
    }

    /// Three nodes: replication factor 3, `min.insync.replicas = 2`.
    pub fn three_nodes() -> Kafka {
        Self::start(3, Security::Plaintext)
    }

    /// `count` nodes (1 or 3), formatted and started; returns once every broker is in the
    /// cluster's metadata.
    pub fn start(count: u32, security: Security) -> Kafka {
        Self::start_with(count, security, "")
    }

    /// Like [`start`](Self::start), with more `server.properties` lines.
    pub fn start_with(count: u32, security: Security, extra_properties: &str) -> Kafka {
        assert!(count == 1 || count == 3, "1 or 3 nodes");
        let jars = jars_dir();
        assert!(
            has_jar(&jars, "kafka_2.13-"),
            "no Kafka jars in {}",
            jars.display()
        );
        let dir = scratch_dir("kafka");
        let nodes: Vec<Node> = (1..=count)
            .map(|id| Node {
                id,
                port: free_port(),
                controller_port: free_port(),
                secure_port: matches!(security, Security::SaslSsl { .. }).then(free_port),
                dir: dir.join(format!("node-{id}")),
                child: None,
            })
            .collect();
        let voters = nodes
            .iter()
            .map(|n| format!("{}@127.0.0.1:{}", n.id, n.controller_port))
            .collect::<Vec<_>>()
            .join(",");
        let cluster_id = cluster_id();
        let mut cluster = Kafka { nodes, jars, dir };
        let mut formats = Vec::new();
        for i in 0..cluster.nodes.len() {
            let node = &cluster.nodes[i];
            fs::create_dir_all(&node.dir).expect("node dir");
            let props = node.dir.join("server.properties");
            fs::write(
                &props,
                properties(node, count, &voters, &security) + extra_properties,
            )
            .expect("write server.properties");
            fs::write(node.dir.join("log4j2.properties"), log4j(&node.dir))
                .expect("write log4j2.properties");
            let mut format = cluster.java(&node.dir);
            format
                .arg("kafka.tools.StorageTool")
                .args(["format", "--ignore-formatted", "-t", &cluster_id, "-c"])
                .arg(&props);
            if let Security::SaslSsl { password, .. } = &security {
                format.arg("--add-scram").arg(format!(
                    "SCRAM-SHA-512=[name={SCRAM_USER},password={password}]"
                ));
            }
            formats.push(
                format
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("start Kafka's storage tool (is Java 17 installed?)"),
            );
        }
        for f in formats {
            let out = f.wait_with_output().expect("storage tool");
            assert!(
                out.status.success(),
                "formatting Kafka's storage failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i);
        }
        cluster.wait_ready(&(0..cluster.nodes.len()).collect::<Vec<_>>());
        cluster
    }

    fn java(&self, node_dir: &Path) -> Command {
        let mut c = Command::new("java");
        c.args([
            "-Xms128m",
            "-Xmx448m",
            "-XX:+UseSerialGC",
            "-Djava.awt.headless=true",
        ])
        .arg(format!(
            "-Dlog4j2.configurationFile={}",
            node_dir.join("log4j2.properties").display()
        ))
        .arg("-cp")
        .arg(format!("{}/*", self.jars.display()))
        .current_dir(node_dir)
        .stdin(Stdio::null());
        c
    }

    fn spawn(&mut self, i: usize) {
        assert!(self.nodes[i].child.is_none(), "node {i} is running");
        let dir = self.nodes[i].dir.clone();
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("stdout.log"))
            .expect("node stdout log");
        let err = out.try_clone().expect("clone log handle");
        let child = self
            .java(&dir)
            .arg("kafka.Kafka")
            .arg(dir.join("server.properties"))
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("start Kafka (is Java 17 installed?)");
        self.nodes[i].child = Some(child);
    }

    /// Waits until the brokers of `nodes` are in the metadata every one of them answers.
    fn wait_ready(&mut self, nodes: &[usize]) {
        let deadline = Instant::now() + Duration::from_secs(120);
        for &i in nodes {
            loop {
                if let Some(Ok(Some(status))) = self.nodes[i].child.as_mut().map(Child::try_wait) {
                    panic!(
                        "Kafka node {} exited with {status}:\n{}",
                        self.nodes[i].id,
                        self.log(i)
                    );
                }
                let want: Vec<i32> = nodes.iter().map(|&j| self.nodes[j].id as i32).collect();
                let ready = metadata(&format!("127.0.0.1:{}", self.nodes[i].port), None)
                    .is_some_and(|m| {
                        want.iter()
                            .all(|id| m.brokers().iter().any(|b| b.id() == *id))
                    });
                if ready {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "Kafka node {} did not start within 120 s:\n{}",
                    self.nodes[i].id,
                    self.log(i)
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// The bootstrap servers of the plaintext listeners, `127.0.0.1:P1,127.0.0.1:P2,…`.
    pub fn brokers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The bootstrap servers of the SASL_SSL listeners.
    pub fn secure_brokers(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.secure_port.expect("a SASL_SSL cluster")))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The process ids of the running nodes' JVMs.
    pub fn pids(&self) -> Vec<u32> {
        self.nodes
            .iter()
            .filter_map(|n| n.child.as_ref().map(Child::id))
            .collect()
    }

    /// How many nodes the cluster has.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether node `i` (0-based) is running.
    pub fn is_running(&self, i: usize) -> bool {
        self.nodes[i].child.is_some()
    }

    /// SIGKILL to node `i`: no controlled shutdown, nothing flushed.
    pub fn kill_node(&mut self, i: usize) {
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM to node `i` and a wait for its exit: a controlled shutdown, which moves the
    /// leadership of its partitions to other replicas first.
    pub fn stop_node(&mut self, i: usize) {
        let Some(mut child) = self.nodes[i].child.take() else {
            return;
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .expect("kill -TERM");
        assert!(status.success());
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                return;
            }
            if Instant::now() > deadline {
                eprintln!("Kafka node {} ignored SIGTERM for 60 s: SIGKILL", i + 1);
                let _ = child.kill();
                let _ = child.wait();
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts node `i` again (after [`kill_node`](Self::kill_node) or
    /// [`stop_node`](Self::stop_node)) on its ports and data, and waits until the cluster's
    /// metadata has every running broker.
    pub fn start_node(&mut self, i: usize) {
        self.spawn(i);
        let running: Vec<usize> = (0..self.nodes.len())
            .filter(|&j| self.nodes[j].child.is_some())
            .collect();
        self.wait_ready(&running);
    }

    /// Metadata from any running node, for `topic` (or all topics).
    pub fn metadata(&self, topic: Option<&str>) -> Option<Metadata> {
        self.nodes
            .iter()
            .filter(|n| n.child.is_some())
            .find_map(|n| metadata(&format!("127.0.0.1:{}", n.port), topic))
    }

    /// The node (0-based) that leads `topic`'s `partition`, per the metadata of a running node.
    pub fn leader(&self, topic: &str, partition: i32) -> Option<usize> {
        let m = self.metadata(Some(topic))?;
        let t = m.topics().iter().find(|t| t.name() == topic)?;
        let p = t.partitions().iter().find(|p| p.id() == partition)?;
        self.nodes.iter().position(|n| n.id as i32 == p.leader())
    }

    /// Whether every partition of `topic` has `replicas` in-sync replicas and a leader.
    pub fn fully_replicated(&self, topic: &str, replicas: usize) -> bool {
        let Some(m) = self.metadata(Some(topic)) else {
            return false;
        };
        m.topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .is_some_and(|t| {
                !t.partitions().is_empty()
                    && t.partitions()
                        .iter()
                        .all(|p| p.leader() >= 0 && p.isr().len() >= replicas)
            })
    }

    /// Waits until [`fully_replicated`](Self::fully_replicated) holds for every one of
    /// `topics`.
    pub fn wait_fully_replicated(&self, topics: &[&str], timeout: Duration) {
        let replicas = self.nodes.len();
        let deadline = Instant::now() + timeout;
        while !topics.iter().all(|t| self.fully_replicated(t, replicas)) {
            assert!(
                Instant::now() < deadline,
                "{topics:?} not back to {replicas} in-sync replicas within {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Limits what clients with `client.id` = `client_id` may produce, in bytes per second
    /// (a Kafka client quota, through Kafka's own ConfigCommand); `None` removes the limit.
    /// The broker then delays its answers, so a transaction stays open for seconds.
    pub fn throttle_producer(&self, client_id: &str, bytes_per_second: Option<u64>) {
        let node = self
            .nodes
            .iter()
            .find(|n| n.child.is_some())
            .expect("a running node");
        let mut c = self.java(&node.dir);
        c.arg("kafka.admin.ConfigCommand")
            .args(["--bootstrap-server", &format!("127.0.0.1:{}", node.port)])
            .args([
                "--alter",
                "--entity-type",
                "clients",
                "--entity-name",
                client_id,
            ]);
        match bytes_per_second {
            Some(rate) => c.args(["--add-config", &format!("producer_byte_rate={rate}")]),
            None => c.args(["--delete-config", "producer_byte_rate"]),
        };
        let out = c.output().expect("run Kafka's ConfigCommand");
        assert!(
            out.status.success(),
            "setting the client quota failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Node `i`'s broker log so far.
    pub fn log(&self, i: usize) -> String {
        let dir = &self.nodes[i].dir;
        let mut text = fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        text.push_str(&fs::read_to_string(dir.join("stdout.log")).unwrap_or_default());
        text
    }

    /// The cluster's scratch directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for Kafka {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill_node(i);
        }
        if !std::thread::panicking() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

fn has_jar(dir: &Path, prefix: &str) -> bool {
    fs::read_dir(dir).into_iter().flatten().flatten().any(|e| {
        e.file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(prefix) && n.ends_with(".jar"))
    })
}

/// A Kafka cluster id: 16 random bytes in URL-safe base64 without padding, as
/// `kafka-storage.sh random-uuid` prints.
fn cluster_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    let mut bytes = Vec::with_capacity(16);
    for i in 0..2u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i);
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        bytes.extend_from_slice(&h.finish().to_be_bytes());
    }
    // Never the all-zero id or a reserved one (they start with zero bytes), and a letter first
    // (an id that starts with '-' reads as an option to the storage tool).
    bytes[0] = (bytes[0] & 0x3f) | 0x40;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    let mut bits = 0u32;
    let mut acc = 0u32;
    for b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(ALPHABET[((acc >> bits) & 63) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (6 - bits)) & 63) as usize] as char);
    }
    out
}

fn properties(node: &Node, count: u32, voters: &str, security: &Security) -> String {
    let replicas = count.min(3);
    let min_isr = if count >= 3 { 2 } else { 1 };
    let mut listeners = format!(
        "PLAINTEXT://127.0.0.1:{},CONTROLLER://127.0.0.1:{}",
        node.port, node.controller_port
    );
    let mut advertised = format!("PLAINTEXT://127.0.0.1:{}", node.port);
    let mut protocols = "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT".to_owned();
    let mut extra = String::new();
    if let (Security::SaslSsl { keystore, .. }, Some(port)) = (security, node.secure_port) {
        listeners.push_str(&format!(",SASL_SSL://127.0.0.1:{port}"));
        advertised.push_str(&format!(",SASL_SSL://127.0.0.1:{port}"));
        protocols.push_str(",SASL_SSL:SASL_SSL");
        extra = format!(
            "sasl.enabled.mechanisms=SCRAM-SHA-512\n\
             listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;\n\
             listener.name.sasl_ssl.ssl.keystore.type=PEM\n\
             listener.name.sasl_ssl.ssl.keystore.location={}\n",
            keystore.display()
        );
    }
    format!(
        "process.roles=broker,controller\n\
         node.id={id}\n\
         controller.quorum.voters={voters}\n\
         listeners={listeners}\n\
         advertised.listeners={advertised}\n\
         listener.security.protocol.map={protocols}\n\
         controller.listener.names=CONTROLLER\n\
         inter.broker.listener.name=PLAINTEXT\n\
         log.dirs={data}\n\
         num.partitions=1\n\
         default.replication.factor={replicas}\n\
         min.insync.replicas={min_isr}\n\
         offsets.topic.replication.factor={replicas}\n\
         offsets.topic.num.partitions=3\n\
         transaction.state.log.replication.factor={replicas}\n\
         transaction.state.log.min.isr={min_isr}\n\
         transaction.state.log.num.partitions=3\n\
         share.coordinator.state.topic.replication.factor={replicas}\n\
         share.coordinator.state.topic.min.isr={min_isr}\n\
         auto.create.topics.enable=false\n\
         unclean.leader.election.enable=false\n\
         group.initial.rebalance.delay.ms=0\n\
         log.cleaner.dedupe.buffer.size=2097152\n\
         log.segment.bytes=16777216\n\
         broker.heartbeat.interval.ms=500\n\
         broker.session.timeout.ms=4000\n\
         transaction.abort.timed.out.transaction.cleanup.interval.ms=1000\n\
         {extra}",
        id = node.id,
        data = node.dir.join("data").display(),
    )
}

fn log4j(dir: &Path) -> String {
    format!(
        "status = warn\n\
         appender.file.type = File\n\
         appender.file.name = file\n\
         appender.file.fileName = {}\n\
         appender.file.layout.type = PatternLayout\n\
         appender.file.layout.pattern = [%d] %p %m (%c)%n\n\
         rootLogger.level = INFO\n\
         rootLogger.appenderRef.file.ref = file\n\
         logger.state.name = state.change.logger\n\
         logger.state.level = WARN\n",
        dir.join("server.log").display()
    )
}

fn metadata(bootstrap: &str, topic: Option<&str>) -> Option<Metadata> {
    let client: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("log_level", "2")
        .create()
        .ok()?;
    client.fetch_metadata(topic, Duration::from_secs(3)).ok()
}

/// For each partition of `topic`: the high watermark (what `read_uncommitted` consumers can
/// read up to) and the last stable offset (what `read_committed` consumers can read up to;
/// below the first record of a transaction still open). Empty when the topic is unknown.
pub fn watermarks(brokers: &str, topic: &str) -> Vec<(i64, i64)> {
    let client = |isolation: &str| -> Option<BaseConsumer> {
        ClientConfig::new()
            .set("bootstrap.servers", brokers)
            .set("isolation.level", isolation)
            .set("log_level", "2")
            .create()
            .ok()
    };
    let (Some(uncommitted), Some(committed)) =
        (client("read_uncommitted"), client("read_committed"))
    else {
        return Vec::new();
    };
    let Some(partitions) = super::kafka::partitions(&uncommitted, topic) else {
        return Vec::new();
    };
    (0..partitions)
        .filter_map(|p| {
            let (_, high) = uncommitted
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .ok()?;
            let (_, stable) = committed
                .fetch_watermarks(topic, p, Duration::from_secs(5))
                .ok()?;
            Some((high, stable))
        })
        .collect()
}

/// Whether a transaction is open on `topic`: some partition's last stable offset is below
/// its high watermark.
pub fn transaction_open(brokers: &str, topic: &str) -> bool {
    watermarks(brokers, topic)
        .iter()
        .any(|(high, stable)| stable < high)
}

/// Creates `topic` with `partitions` and topic-level `configs` through the Admin API.
pub async fn create_topic(brokers: &str, topic: &str, partitions: i32, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let mut new = NewTopic::new(topic, partitions, TopicReplication::Fixed(-1));
    for (name, value) in configs {
        new = new.set(name, value);
    }
    let results = admin
        .create_topics([&new], &AdminOptions::new())
        .await
        .expect("create topic");
    for r in results {
        r.unwrap_or_else(|(name, code)| panic!("creating topic {name}: {code}"));
    }
}

/// Deletes `topic` through the Admin API.
pub async fn delete_topic(brokers: &str, topic: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::client::DefaultClientContext;
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .create()
        .expect("admin client");
    let results = admin
        .delete_topics(&[topic], &AdminOptions::new())
        .await
        .expect("delete topic");
    for r in results {
        r.unwrap_or_else(|(name, code)| panic!("deleting topic {name}: {code}"));
    }
}

/// `server.properties` lines for an authorizer: ACLs decide, nothing is allowed without one,
/// and the plaintext listener's clients (the brokers, the tests' own consumers: `ANONYMOUS`)
/// are super users. The client under test, on the SASL_SSL listener, needs ACLs.
pub const AUTHORIZER: &str = "\nauthorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer\n\
     super.users=User:ANONYMOUS\nallow.everyone.if.no.acl.found=false\n";

/// Grants (`grant`) or revokes `principal`'s WRITE, DESCRIBE and CREATE on `topics`, through
/// the Admin API (tests/support/java/KafkaAcl.java, run by Java's source-file mode) as a super
/// user on the plaintext listener `brokers`. Returns once the brokers apply it.
pub fn set_acls(brokers: &str, grant: bool, principal: &str, topics: &[&str]) {
    let source =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/support/java/KafkaAcl.java");
    let out = Command::new("java")
        .arg("-cp")
        .arg(format!("{}/*", jars_dir().display()))
        .arg(source)
        .arg(brokers)
        .arg(if grant { "grant" } else { "revoke" })
        .arg(principal)
        .args(topics)
        .output()
        .expect("run java");
    assert!(
        out.status.success(),
        "KafkaAcl.java: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
