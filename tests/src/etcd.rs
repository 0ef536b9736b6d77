//! An etcd server (Debian's `etcd-server`) for the harness, listening on an address inside a
//! namespace of the harness, with its data in a temporary directory. Stoppable and restartable
//! (datastore outage tests); killed by pid and cleaned up on drop.
use std::{
    net::{Ipv4Addr, SocketAddr, TcpStream},
    path::PathBuf,
    time::Duration,
};

use crate::{
    netns::{Netns, unique_name},
    process::{NsProcess, wait_until},
};

/// Server TLS for etcd: its certificate and key, and the CA its clients' certificates must
/// chain to (client-certificate authentication).
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

pub struct Etcd {
    pub ip: Ipv4Addr,
    pub port: u16,
    pub tls: Option<EtcdTls>,
    ns_path: String,
    ns_name: String,
    data_dir: PathBuf,
    process: Option<NsProcess>,
}

impl Etcd {
    /// Starts etcd in `ns`, serving clients on `ip:port` (an address of `ns`).
    pub fn start(ns: &Netns, ip: Ipv4Addr, port: u16) -> Self {
        Self::start_with(ns, ip, port, None)
    }

    /// Starts etcd serving HTTPS (`tls`) and requiring client certificates.
    pub fn start_with(ns: &Netns, ip: Ipv4Addr, port: u16, tls: Option<EtcdTls>) -> Self {
        // On tmpfs when there is one: etcd fsyncs every write, and a test run that loads the
        // disk must not stall etcd long enough for leases to expire.
        let base = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let data_dir = base.join(unique_name("weft-etcd-"));
        std::fs::create_dir_all(&data_dir).unwrap();
        let mut etcd = Self {
            ip,
            port,
            tls,
            ns_path: ns.path(),
            ns_name: ns.name.clone(),
            data_dir,
            process: None,
        };
        etcd.resume();
        etcd
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(NsProcess::pid)
    }

    /// The files it keeps: its data directory and its log.
    pub fn files(&self) -> Vec<PathBuf> {
        vec![self.data_dir.clone(), self.data_dir.with_extension("log")]
    }

    /// Client URL for agents.
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.ip, self.port)
    }

    /// Stops the server (SIGKILL): a datastore outage. Data is kept.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }

    /// Starts the server again on the same data.
    pub fn resume(&mut self) {
        let ns = Netns {
            name: self.ns_name.clone(),
        };
        let url = self.endpoint();
        let mut args: Vec<String> = [
            "--name",
            "weft-test",
            "--data-dir",
            self.data_dir.to_str().unwrap(),
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
            "--listen-peer-urls",
            &format!("http://{}:{}", self.ip, self.port + 1),
            "--initial-advertise-peer-urls",
            &format!("http://{}:{}", self.ip, self.port + 1),
            "--initial-cluster",
            &format!("weft-test=http://{}:{}", self.ip, self.port + 1),
            "--log-level",
            "warn",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(tls) = &self.tls {
            for (flag, path) in [
                ("--cert-file", &tls.cert),
                ("--key-file", &tls.key),
                ("--trusted-ca-file", &tls.client_ca),
            ] {
                args.push(flag.into());
                args.push(path.display().to_string());
            }
            args.push("--client-cert-auth".into());
        }
        let log = self.data_dir.with_extension("log");
        let process = NsProcess::spawn(&ns, &etcd_binary(), &args, &[], &log);
        // `ns` is a borrowed handle: it must not delete the namespace when dropped.
        std::mem::forget(ns);
        let addr = SocketAddr::from((self.ip, self.port));
        let ns_path = self.ns_path.clone();
        wait_until(
            "etcd to accept connections",
            Duration::from_secs(20),
            || {
                let ns_path = ns_path.clone();
                std::thread::spawn(move || {
                    crate::netns::enter(&ns_path);
                    TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
                })
                .join()
                .unwrap_or(false)
            },
        );
        self.process = Some(process);
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.data_dir);
        let _ = std::fs::remove_file(self.data_dir.with_extension("log"));
    }
}

/// Debian installs the server as `/usr/bin/etcd`.
pub fn etcd_binary() -> PathBuf {
    for candidate in ["/usr/bin/etcd", "/usr/local/bin/etcd"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    panic!("etcd not found: `cargo xtask test` installs Debian's etcd-server")
}

impl Etcd {
    /// Calls etcd's v3 JSON gateway from inside the etcd namespace.
    fn gateway(&self, path: &str, body: serde_json::Value) -> serde_json::Value {
        use std::io::{Read, Write};
        let addr = SocketAddr::from((self.ip, self.port));
        let body = body.to_string();
        let request = format!(
            "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let ns_path = self.ns_path.clone();
        let response = std::thread::spawn(move || {
            crate::netns::enter(&ns_path);
            let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                .expect("connecting to etcd");
            s.write_all(request.as_bytes()).unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).unwrap();
            out
        })
        .join()
        .unwrap();
        let json = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or("");
        serde_json::from_str(json).unwrap_or_else(|e| panic!("etcd {path}: {e}: {response}"))
    }

    /// Writes `key` = `value` (no lease).
    pub fn put(&self, key: &str, value: &str) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        self.gateway(
            "/v3/kv/put",
            serde_json::json!({"key": b64.encode(key), "value": b64.encode(value)}),
        );
    }

    /// Deletes `key`.
    pub fn delete(&self, key: &str) {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        self.gateway(
            "/v3/kv/deleterange",
            serde_json::json!({"key": b64.encode(key)}),
        );
    }

    /// Every key under `prefix` with its value.
    pub fn get_prefix(&self, prefix: &str) -> Vec<(String, String)> {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut end = prefix.as_bytes().to_vec();
        *end.last_mut().expect("non-empty prefix") += 1;
        let out = self.gateway(
            "/v3/kv/range",
            serde_json::json!({"key": b64.encode(prefix), "range_end": b64.encode(&end)}),
        );
        let decode = |v: &serde_json::Value| {
            String::from_utf8(
                b64.decode(v.as_str().unwrap_or_default())
                    .unwrap_or_default(),
            )
            .unwrap_or_default()
        };
        out["kvs"]
            .as_array()
            .map(|kvs| {
                kvs.iter()
                    .map(|kv| (decode(&kv["key"]), decode(&kv["value"])))
                    .collect()
            })
            .unwrap_or_default()
    }
}
