//! A Redis Cluster of the test's own: three masters and three replicas on
//! free loopback ports (each node also uses its port + 10000 for the
//! cluster bus), their files in a temporary directory. Nodes can be
//! killed, restarted, failed over and resharded; everything is stopped
//! when the cluster is dropped, a failing test's unwinding included.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long the cluster takes to call a silent node failed (ms): short,
/// so that a failover happens within a test.
const NODE_TIMEOUT_MS: &str = "1000";

struct ClusterNode {
    port: u16,
    child: Option<Child>,
}

pub struct LocalCluster {
    nodes: Vec<ClusterNode>,
    dir: PathBuf,
}

impl LocalCluster {
    /// Starts six nodes, joins them (a replica for each master) and waits
    /// until every node says the cluster is ok.
    pub fn start() -> LocalCluster {
        let dir = std::env::temp_dir().join(format!(
            "embgate-cluster-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let mut cluster = LocalCluster {
            nodes: Vec::new(),
            dir,
        };
        for port in free_ports(6) {
            cluster.nodes.push(ClusterNode { port, child: None });
            let i = cluster.nodes.len() - 1;
            cluster.restart(i);
        }
        let addresses: Vec<String> = cluster.addresses();
        let status = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli is installed");
        assert!(status.success(), "redis-cli --cluster create");
        cluster.wait_until_ok();
        cluster.wait_for_replicas();
        cluster
    }

    /// Waits until `CLUSTER SLOTS` lists the replicas: a node names a
    /// replica only once it has replicated something, so a few keys are
    /// written first (in every shard) and removed after.
    fn wait_for_replicas(&self) {
        let keys: Vec<String> = (0..30).map(|i| format!("harness-warm-{i}")).collect();
        for key in &keys {
            self.cli(0, &["-c", "SET", key, "x"]);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        let ports: Vec<String> = self.nodes.iter().map(|n| n.port.to_string()).collect();
        while !self.alive().all(|i| {
            let slots = self.cli(i, &["CLUSTER", "SLOTS"]);
            ports.iter().all(|p| slots.lines().any(|l| l.trim() == p))
        }) {
            assert!(Instant::now() < deadline, "the replicas were not listed");
            std::thread::sleep(Duration::from_millis(100));
        }
        for key in &keys {
            self.cli(0, &["-c", "DEL", key]);
        }
    }

    /// `host:port` of every node, in the order they were started.
    pub fn addresses(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect()
    }

    pub fn port(&self, node: usize) -> u16 {
        self.nodes[node].port
    }

    /// The seeds for `store.cluster_nodes`.
    pub fn seeds(&self) -> String {
        self.addresses()
            .iter()
            .map(|a| format!("redis://{a}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Runs redis-cli against `node` and returns its output.
    pub fn cli(&self, node: usize, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port(node).to_string()])
            .args(args)
            .output()
            .expect("redis-cli runs");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn alive(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|i| self.nodes[*i].child.is_some())
    }

    /// The index of a node that is a master now.
    pub fn master(&self) -> usize {
        self.alive()
            .find(|i| self.cli(*i, &["ROLE"]).starts_with("master"))
            .expect("a master")
    }

    /// Node id of `node`.
    pub fn id(&self, node: usize) -> String {
        self.cli(node, &["CLUSTER", "MYID"]).trim().to_owned()
    }

    /// Waits until every live node reports `cluster_state:ok` and agrees
    /// on who serves every slot (a node it knows as failed serves none).
    pub fn wait_until_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ok = self.alive().all(|i| {
                self.cli(i, &["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")
            }) && self.alive().all(|i| {
                let check = Command::new("redis-cli")
                    .args(["--cluster", "check", &format!("127.0.0.1:{}", self.port(i))])
                    .output()
                    .expect("redis-cli runs");
                let text = String::from_utf8_lossy(&check.stdout);
                check.status.success() && text.contains("[OK] All 16384 slots covered")
            });
            if ok {
                return;
            }
            assert!(Instant::now() < deadline, "the cluster did not settle");
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Kills `node` at once (SIGKILL), as a crash would.
    pub fn kill(&mut self, node: usize) {
        if let Some(mut child) = self.nodes[node].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts `node` (again) with its cluster configuration; a master that
    /// was failed over comes back as a replica.
    pub fn restart(&mut self, node: usize) {
        let port = self.nodes[node].port;
        let conf = self.dir.join(format!("nodes-{port}.conf"));
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes"])
            .arg("--cluster-config-file")
            .arg(&conf)
            .args(["--cluster-node-timeout", NODE_TIMEOUT_MS])
            // The other masters keep serving their slots while one is down.
            .args(["--cluster-require-full-coverage", "no"])
            .args(["--cluster-replica-validity-factor", "0"])
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.nodes[node].child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.cli(node, &["PING"]).contains("PONG") {
            assert!(Instant::now() < deadline, "node {port} did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until a replica of the killed `node` serves its slots.
    pub fn wait_for_failover(&self, killed: usize) {
        let port = self.port(killed).to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let any = self.alive().next().expect("a live node");
            let slots = self.cli(any, &["CLUSTER", "SLOTS"]);
            let shards = self.cli(any, &["CLUSTER", "INFO"]);
            // The killed node no longer appears as a slot owner.
            let owner = slots.lines().any(|l| l.trim() == port);
            if !owner && shards.contains("cluster_state:ok") {
                return;
            }
            assert!(Instant::now() < deadline, "no failover of node {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Moves `slots` slots from one master to another with
    /// `redis-cli --cluster reshard`, waiting until it is done.
    pub fn reshard(&self, from: usize, to: usize, slots: u32) {
        let status = Command::new("redis-cli")
            .args([
                "--cluster",
                "reshard",
                &format!("127.0.0.1:{}", self.port(from)),
            ])
            .args([
                "--cluster-from",
                &self.id(from),
                "--cluster-to",
                &self.id(to),
            ])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli runs");
        assert!(status.success(), "redis-cli --cluster reshard");
    }

    /// Every key of every master matching `pattern`.
    pub fn keys(&self, pattern: &str) -> Vec<String> {
        let mut keys = Vec::new();
        for i in self.alive().collect::<Vec<_>>() {
            if self.cli(i, &["ROLE"]).starts_with("master") {
                let out = self.cli(i, &["--scan", "--pattern", pattern]);
                keys.extend(out.lines().filter(|l| !l.is_empty()).map(str::to_owned));
            }
        }
        keys
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for i in 0..self.nodes.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `n` ports free on loopback, each with its bus port (+10000), both below
/// the range the system hands out to outgoing connections (32768 on), so
/// that no client connection takes one meanwhile.
fn free_ports(n: usize) -> Vec<u16> {
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < n {
        let port = rand::random_range(10000..22700u16);
        let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
        if !ports.contains(&port) && free(port) && free(port + 10000) {
            ports.push(port);
        }
    }
    ports
}
