//! etcd datastore with flannel's layout, so weft and flanneld nodes share one cluster:
//! `<prefix>/config` holds net-conf.json, `<prefix>/subnets/10.244.1.0-24` one lease per node
//! (`{"PublicIP":..,"BackendType":..,"BackendData":{"VNI":1,"VtepMAC":..}}`) attached to an etcd
//! lease with a TTL that the agent keeps alive.
//!
//! The client speaks etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/kv/txn`, `/v3/lease/*`,
//! `/v3/watch`, `/v3/auth/authenticate`) over HTTP or HTTPS (rustls: the cluster's CA, a client
//! certificate, and/or a username and password, with flannel's flag names): the same v3 API as
//! the gRPC clients without a protobuf toolchain in the build (the measured trade-off is in
//! agent/README.md). Responses are serde types. Allocation is a transaction that creates the
//! key only if it does not exist (`create_revision == 0`), so two racing nodes never share a
//! subnet.
use std::{
    collections::hash_map::RandomState,
    hash::BuildHasher,
    io::{BufRead, BufReader},
    path::PathBuf,
    sync::{Arc, Mutex, mpsc::Sender},
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use ipnet::Ipv4Net;
use serde::{Deserialize, Deserializer, de::DeserializeOwned};
use serde_json::{Value, json};

use super::{Backoff, Datastore, Event, LocalNode, NodeLease, parse_subnet_key, subnet_key};
use crate::config::FlannelNetConf;

/// flannel's default prefix.
pub const DEFAULT_PREFIX: &str = "/coreos.com/network";

/// A key-value pair as etcd returns it.
#[derive(Clone, Debug)]
pub struct Kv {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub lease: i64,
}

/// A watch event.
#[derive(Clone, Debug)]
pub enum WatchEvent {
    Put(Kv),
    /// The deleted key (its `mod_revision` is the deletion's).
    Delete(Kv),
}

/// How to reach etcd: flannel's `--etcd-cafile`, `--etcd-certfile`, `--etcd-keyfile`,
/// `--etcd-username`, `--etcd-password`.
#[derive(Clone, Debug, Default)]
pub struct EtcdOptions {
    /// CA bundle the server's certificate must chain to (default: the web PKI roots).
    pub ca_file: Option<PathBuf>,
    /// Client certificate and key (client-certificate authentication).
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// The etcd flags of `weft-agent` and `weft policy`: flannel's names, one declaration for both
/// (`#[command(flatten)]`).
#[derive(clap::Args, Clone, Debug)]
pub struct EtcdArgs {
    /// etcd client URLs, comma-separated (http:// or https://).
    #[arg(long, value_delimiter = ',', default_value = "http://127.0.0.1:2379")]
    pub etcd_endpoints: Vec<String>,
    /// CA bundle for etcd's server certificate (https:// endpoints).
    #[arg(long)]
    pub etcd_cafile: Option<PathBuf>,
    /// Client certificate for etcd (client-certificate authentication).
    #[arg(long, requires = "etcd_keyfile")]
    pub etcd_certfile: Option<PathBuf>,
    /// Key of --etcd-certfile.
    #[arg(long, requires = "etcd_certfile")]
    pub etcd_keyfile: Option<PathBuf>,
    /// etcd user (etcd's own authentication).
    #[arg(long, requires = "etcd_password")]
    pub etcd_username: Option<String>,
    /// Password of --etcd-username.
    #[arg(
        long,
        requires = "etcd_username",
        env = "WEFT_ETCD_PASSWORD",
        hide_env_values = true
    )]
    pub etcd_password: Option<String>,
    /// etcd key prefix (flannel's layout).
    #[arg(long, default_value = DEFAULT_PREFIX)]
    pub etcd_prefix: String,
}

impl EtcdArgs {
    pub fn options(&self) -> EtcdOptions {
        EtcdOptions {
            ca_file: self.etcd_cafile.clone(),
            cert_file: self.etcd_certfile.clone(),
            key_file: self.etcd_keyfile.clone(),
            username: self.etcd_username.clone(),
            password: self.etcd_password.clone(),
        }
    }

    pub fn client(&self) -> Result<EtcdClient> {
        EtcdClient::with_options(&self.etcd_endpoints, &self.options())
    }
}

// --- the gateway's JSON, as serde types (int64 fields come as strings) -------------------

fn de_i64<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Int {
        Text(String),
        Number(i64),
    }
    Ok(match Int::deserialize(d)? {
        Int::Text(s) => s.parse().map_err(serde::de::Error::custom)?,
        Int::Number(n) => n,
    })
}

fn de_b64<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    let s = String::deserialize(d)?;
    B64.decode(s).map_err(serde::de::Error::custom)
}

#[derive(Debug, Default, Deserialize)]
struct ResponseHeader {
    #[serde(default, deserialize_with = "de_i64")]
    revision: i64,
}

#[derive(Debug, Deserialize)]
struct KeyValue {
    #[serde(default, deserialize_with = "de_b64")]
    key: Vec<u8>,
    #[serde(default, deserialize_with = "de_b64")]
    value: Vec<u8>,
    #[serde(default, deserialize_with = "de_i64")]
    create_revision: i64,
    #[serde(default, deserialize_with = "de_i64")]
    mod_revision: i64,
    #[serde(default, deserialize_with = "de_i64")]
    lease: i64,
}

impl From<KeyValue> for Kv {
    fn from(kv: KeyValue) -> Self {
        Kv {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            lease: kv.lease,
        }
    }
}

#[derive(Debug, Deserialize)]
struct RangeResponse {
    #[serde(default)]
    header: ResponseHeader,
    #[serde(default)]
    kvs: Vec<KeyValue>,
}

#[derive(Debug, Deserialize)]
struct TxnResponse {
    #[serde(default)]
    succeeded: bool,
}

#[derive(Debug, Deserialize)]
struct LeaseGrantResponse {
    #[serde(rename = "ID", default, deserialize_with = "de_i64")]
    id: i64,
}

#[derive(Debug, Deserialize)]
struct LeaseKeepAliveResult {
    #[serde(rename = "TTL", default, deserialize_with = "de_i64")]
    ttl: i64,
}

#[derive(Debug, Deserialize)]
struct LeaseKeepAliveResponse {
    result: Option<LeaseKeepAliveResult>,
}

#[derive(Debug, Deserialize)]
struct AuthenticateResponse {
    token: String,
}

#[derive(Debug, Deserialize)]
struct WatchedEvent {
    /// Absent for PUT (the gateway leaves out enum defaults).
    #[serde(rename = "type", default)]
    kind: Option<String>,
    kv: KeyValue,
}

#[derive(Debug, Default, Deserialize)]
struct WatchResult {
    #[serde(default)]
    header: ResponseHeader,
    #[serde(default)]
    events: Vec<WatchedEvent>,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "de_i64")]
    compact_revision: i64,
}

#[derive(Debug, Deserialize)]
struct WatchMessage {
    #[serde(default)]
    result: WatchResult,
    /// The gateway nests the header in `result`; kept for either shape.
    #[serde(default)]
    header: Option<ResponseHeader>,
    #[serde(default)]
    error: Option<Value>,
}

/// An error body of the gateway (`{"error": .., "code": .., "message": ..}`).
#[derive(Debug, Deserialize)]
struct GatewayError {
    #[serde(default)]
    message: String,
}

fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

/// TLS toward etcd: the given CA (else the web PKI roots), and a client certificate if given.
fn tls_config(options: &EtcdOptions) -> Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
    let read = |flag: &str, path: &PathBuf| {
        std::fs::read(path).with_context(|| format!("{flag}: reading {}", path.display()))
    };
    let mut roots = rustls::RootCertStore::empty();
    match &options.ca_file {
        Some(path) => {
            let pem = read("--etcd-cafile", path)?;
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert
                    .map_err(|e| anyhow!("--etcd-cafile {}: invalid PEM: {e:?}", path.display()))?;
                roots.add(cert).map_err(|e| {
                    anyhow!(
                        "--etcd-cafile {}: unusable certificate: {e}",
                        path.display()
                    )
                })?;
            }
            if roots.is_empty() {
                bail!("--etcd-cafile {}: no certificate in it", path.display());
            }
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots);
    let config = match (&options.cert_file, &options.key_file) {
        (Some(cert), Some(key)) => {
            let certs = CertificateDer::pem_slice_iter(&read("--etcd-certfile", cert)?)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| anyhow!("--etcd-certfile {}: invalid PEM: {e:?}", cert.display()))?;
            let key = PrivateKeyDer::from_pem_slice(&read("--etcd-keyfile", key)?)
                .map_err(|e| anyhow!("--etcd-keyfile {}: no private key: {e:?}", key.display()))?;
            builder
                .with_client_auth_cert(certs, key)
                .context("--etcd-certfile/--etcd-keyfile: the key does not fit the certificate")?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => bail!("--etcd-certfile and --etcd-keyfile go together"),
    };
    Ok(Arc::new(config))
}

/// etcd v3 client over the JSON gateway.
#[derive(Clone)]
pub struct EtcdClient {
    endpoints: Vec<String>,
    agent: ureq::Agent,
    watch_agent: ureq::Agent,
    credentials: Option<(String, String)>,
    /// The auth token of `credentials` (simple tokens expire: renewed on refusal).
    token: Arc<Mutex<Option<String>>>,
}

impl EtcdClient {
    pub fn new(endpoints: &[String]) -> Result<Self> {
        Self::with_options(endpoints, &EtcdOptions::default())
    }

    pub fn with_options(endpoints: &[String], options: &EtcdOptions) -> Result<Self> {
        if endpoints.is_empty() {
            bail!("--etcd-endpoints: at least one endpoint is needed");
        }
        let endpoints = endpoints
            .iter()
            .map(|e| e.trim_end_matches('/').to_string())
            .collect::<Vec<_>>();
        let https = endpoints.iter().any(|e| e.starts_with("https://"));
        for e in &endpoints {
            if !e.starts_with("http://") && !e.starts_with("https://") {
                bail!("--etcd-endpoints: {e:?} must be an http:// or https:// URL");
            }
        }
        let tls_flags = options.ca_file.is_some() || options.cert_file.is_some();
        if tls_flags && !https {
            bail!("--etcd-cafile/--etcd-certfile need https:// endpoints");
        }
        let credentials = match (&options.username, &options.password) {
            (Some(u), Some(p)) => Some((u.clone(), p.clone())),
            (None, None) => None,
            _ => bail!("--etcd-username and --etcd-password go together"),
        };
        let mut agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(1))
            .timeout(Duration::from_secs(3));
        // A watch is idle for as long as nothing changes; a dead server resets the connection.
        // The read timeout only bounds a silent network partition (then the watch is renewed).
        let mut watch_agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(1))
            .timeout_read(Duration::from_secs(120));
        if https {
            let tls = tls_config(options)?;
            agent = agent.tls_config(tls.clone());
            watch_agent = watch_agent.tls_config(tls);
        }
        Ok(Self {
            endpoints,
            agent: agent.build(),
            watch_agent: watch_agent.build(),
            credentials,
            token: Arc::new(Mutex::new(None)),
        })
    }

    fn post(&self, agent: &ureq::Agent, url: &str, token: Option<&str>) -> ureq::Request {
        let req = agent.post(url);
        match token {
            Some(t) => req.set("Authorization", t),
            None => req,
        }
    }

    /// The auth token, authenticating first when there is none.
    fn auth_token(&self, refresh: bool) -> Result<Option<String>> {
        let Some((user, password)) = &self.credentials else {
            return Ok(None);
        };
        let mut token = self.token.lock().expect("token lock");
        if refresh || token.is_none() {
            let out: AuthenticateResponse = self.call_raw(
                "/v3/auth/authenticate",
                &json!({"name": user, "password": password}),
                None,
            )?;
            *token = Some(out.token);
        }
        Ok(token.clone())
    }

    /// POSTs `body` to `path` on the first endpoint that answers.
    fn call_raw<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &Value,
        token: Option<&str>,
    ) -> Result<T> {
        let mut last = None;
        for e in &self.endpoints {
            match self
                .post(&self.agent, &format!("{e}{path}"), token)
                .send_json(body)
            {
                Ok(resp) => {
                    return resp
                        .into_json()
                        .with_context(|| format!("etcd {path}: unexpected response"));
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    let mut message = serde_json::from_str::<GatewayError>(&text)
                        .map(|e| e.message)
                        .unwrap_or(text);
                    if message.contains("CommonName of client") {
                        message += " (etcd's JSON gateway takes no client certificate with a \
                                     common name once etcd users are on: use one without CN)";
                    }
                    bail!(EtcdRefused {
                        path: path.into(),
                        code,
                        message
                    });
                }
                Err(err) => last = Some(anyhow!("etcd {e}{path}: {err}")),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no etcd endpoint")))
    }

    /// POSTs `body` to `path`, authenticating (again, when the token expired) as needed.
    pub fn call<T: DeserializeOwned>(&self, path: &str, body: Value) -> Result<T> {
        let token = self.auth_token(false)?;
        match self.call_raw(path, &body, token.as_deref()) {
            Err(e) if self.credentials.is_some() && is_auth_refusal(&e) => {
                let token = self.auth_token(true)?;
                self.call_raw(path, &body, token.as_deref())
            }
            other => other,
        }
    }

    pub fn get(&self, key: &str) -> Result<Option<Kv>> {
        let out: RangeResponse = self.call("/v3/kv/range", json!({"key": B64.encode(key)}))?;
        Ok(out.kvs.into_iter().next().map(Kv::from))
    }

    /// Every key under `prefix` and the store's revision at that moment.
    pub fn range_prefix(&self, prefix: &str) -> Result<(i64, Vec<Kv>)> {
        let out: RangeResponse = self.call(
            "/v3/kv/range",
            json!({"key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix))}),
        )?;
        Ok((
            out.header.revision,
            out.kvs.into_iter().map(Kv::from).collect(),
        ))
    }

    pub fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<()> {
        self.call::<Value>(
            "/v3/kv/put",
            json!({"key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string()}),
        )?;
        Ok(())
    }

    /// Writes every pair in one transaction (etcd allows 128 operations per transaction by
    /// default).
    pub fn put_all(&self, kvs: &[(String, Vec<u8>)]) -> Result<()> {
        let ops: Vec<TxnOp> = kvs
            .iter()
            .map(|(key, value)| TxnOp::Put {
                key,
                value,
                lease: 0,
            })
            .collect();
        self.txn(&[], &ops)?;
        Ok(())
    }

    /// One transaction: `success` runs when every condition in `compare` holds. Returns whether
    /// they held (and so whether the operations ran).
    pub fn txn(&self, compare: &[Compare], success: &[TxnOp]) -> Result<bool> {
        let compare: Vec<Value> = compare.iter().map(|c| c.to_json()).collect();
        let success: Vec<Value> = success.iter().map(|o| o.to_json()).collect();
        let out: TxnResponse = self.call(
            "/v3/kv/txn",
            json!({"compare": compare, "success": success}),
        )?;
        Ok(out.succeeded)
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        self.call::<Value>("/v3/kv/deleterange", json!({"key": B64.encode(key)}))?;
        Ok(())
    }

    /// Writes `key` only if it does not exist (`mod_revision == None`) or was last modified at
    /// `mod_revision`. Returns whether the write happened.
    pub fn put_if(
        &self,
        key: &str,
        value: &[u8],
        lease: i64,
        mod_revision: Option<i64>,
    ) -> Result<bool> {
        let compare = match mod_revision {
            None => Compare::Absent(key),
            Some(r) => Compare::ModRevision(key, r),
        };
        self.txn(&[compare], &[TxnOp::Put { key, value, lease }])
    }

    pub fn lease_grant(&self, ttl: u64) -> Result<i64> {
        let out: LeaseGrantResponse =
            self.call("/v3/lease/grant", json!({"TTL": ttl.to_string()}))?;
        if out.id == 0 {
            bail!("etcd granted no lease");
        }
        Ok(out.id)
    }

    /// Renews a lease; returns its new TTL (0: the lease no longer exists).
    pub fn lease_keepalive(&self, id: i64) -> Result<i64> {
        let out: LeaseKeepAliveResponse =
            self.call("/v3/lease/keepalive", json!({"ID": id.to_string()}))?;
        Ok(out.result.map_or(0, |r| r.ttl))
    }

    pub fn lease_revoke(&self, id: i64) -> Result<()> {
        self.call::<Value>("/v3/lease/revoke", json!({"ID": id.to_string()}))?;
        Ok(())
    }

    /// Watches `prefix` from `start_revision`, calling `on_event` for every change, until the
    /// stream ends (server gone, compaction): returns the error that ended it.
    pub fn watch_prefix(
        &self,
        prefix: &str,
        start_revision: i64,
        mut on_event: impl FnMut(WatchEvent),
    ) -> anyhow::Error {
        self.watch_prefix_revisions(prefix, start_revision, |events, _| {
            for ev in events {
                on_event(ev);
            }
        })
    }

    /// [`Self::watch_prefix`], a message at a time: its events and the store revision they
    /// bring the watcher to (every change up to it was delivered).
    pub fn watch_prefix_revisions(
        &self,
        prefix: &str,
        start_revision: i64,
        mut on_batch: impl FnMut(Vec<WatchEvent>, i64),
    ) -> anyhow::Error {
        let body = json!({"create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
        }});
        let token = match self.auth_token(false) {
            Ok(t) => t,
            Err(e) => return e,
        };
        let mut last = anyhow!("no etcd endpoint");
        for e in &self.endpoints {
            let resp = match self
                .post(
                    &self.watch_agent,
                    &format!("{e}/v3/watch"),
                    token.as_deref(),
                )
                .send_json(&body)
            {
                Ok(r) => r,
                Err(err) => {
                    last = anyhow!("etcd watch on {e}: {err}");
                    continue;
                }
            };
            let reader = BufReader::new(resp.into_reader());
            for line in reader.lines() {
                let line = match line {
                    Ok(l) => l,
                    Err(err) => return anyhow!("etcd watch stream: {err}"),
                };
                if line.trim().is_empty() {
                    continue;
                }
                let msg: WatchMessage = match serde_json::from_str(&line) {
                    Ok(m) => m,
                    Err(err) => return anyhow!("etcd watch: unparsable message ({err}): {line}"),
                };
                if let Some(error) = msg.error {
                    // An expired token ends the stream too: the next watch authenticates again.
                    if let Ok(mut t) = self.token.lock() {
                        *t = None;
                    }
                    return anyhow!("etcd watch error: {error}");
                }
                if msg.result.canceled || msg.result.compact_revision != 0 {
                    return anyhow!("etcd watch canceled: {line}");
                }
                let mut revision = msg.header.map_or(msg.result.header.revision, |h| {
                    h.revision.max(msg.result.header.revision)
                });
                let mut batch = Vec::with_capacity(msg.result.events.len());
                for ev in msg.result.events {
                    let kv = Kv::from(ev.kv);
                    revision = revision.max(kv.mod_revision);
                    if ev.kind.as_deref() == Some("DELETE") {
                        batch.push(WatchEvent::Delete(kv));
                    } else {
                        batch.push(WatchEvent::Put(kv));
                    }
                }
                if !batch.is_empty() {
                    on_batch(batch, revision);
                }
            }
            return anyhow!("etcd watch stream ended");
        }
        last
    }
}

/// A condition of a transaction ([`EtcdClient::txn`]).
#[derive(Clone, Copy, Debug)]
pub enum Compare<'a> {
    /// The key does not exist.
    Absent(&'a str),
    /// The key exists and was last modified at this revision.
    ModRevision(&'a str, i64),
    /// The key exists and holds exactly this value (etcd fails a value comparison on a missing
    /// key).
    Value(&'a str, &'a [u8]),
}

impl Compare<'_> {
    fn to_json(self) -> Value {
        match self {
            Self::Absent(key) => {
                json!({"key": B64.encode(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
            }
            Self::ModRevision(key, r) => {
                json!({"key": B64.encode(key), "target": "MOD", "result": "EQUAL", "mod_revision": r.to_string()})
            }
            Self::Value(key, v) => {
                json!({"key": B64.encode(key), "target": "VALUE", "result": "EQUAL", "value": B64.encode(v)})
            }
        }
    }
}

/// An operation of a transaction ([`EtcdClient::txn`]).
#[derive(Clone, Copy, Debug)]
pub enum TxnOp<'a> {
    /// Writes `key` attached to `lease` (0: none).
    Put {
        key: &'a str,
        value: &'a [u8],
        lease: i64,
    },
    Delete(&'a str),
}

impl TxnOp<'_> {
    fn to_json(self) -> Value {
        match self {
            Self::Put { key, value, lease } => json!({"request_put": {
                "key": B64.encode(key),
                "value": B64.encode(value),
                "lease": lease.to_string(),
            }}),
            Self::Delete(key) => json!({"request_delete_range": {"key": B64.encode(key)}}),
        }
    }
}

/// etcd answered with an HTTP error.
#[derive(Debug, thiserror::Error)]
#[error("etcd {path}: HTTP {code}: {message}")]
pub struct EtcdRefused {
    pub path: String,
    pub code: u16,
    pub message: String,
}

/// Whether `e` is etcd refusing the auth token (expired or revoked).
fn is_auth_refusal(e: &anyhow::Error) -> bool {
    e.downcast_ref::<EtcdRefused>().is_some_and(|r| {
        r.code == 401 || r.message.contains("invalid auth token") || r.message.contains("token")
    })
}

pub struct EtcdDatastore {
    client: EtcdClient,
    prefix: String,
    ttl: u64,
    conf: Option<FlannelNetConf>,
    lease_id: i64,
    local: Option<LocalNode>,
    subnet: Option<Ipv4Net>,
}

impl EtcdDatastore {
    pub fn new(endpoints: &[String], prefix: &str, ttl: u64) -> Result<Self> {
        Self::with_options(endpoints, &EtcdOptions::default(), prefix, ttl)
    }

    pub fn with_options(
        endpoints: &[String],
        options: &EtcdOptions,
        prefix: &str,
        ttl: u64,
    ) -> Result<Self> {
        if ttl < 2 {
            bail!("--lease-ttl: {ttl} s is too short (at least 2)");
        }
        Ok(Self {
            client: EtcdClient::with_options(endpoints, options)?,
            prefix: prefix.trim_end_matches('/').to_string(),
            ttl,
            conf: None,
            lease_id: 0,
            local: None,
            subnet: None,
        })
    }

    pub fn client(&self) -> &EtcdClient {
        &self.client
    }

    fn subnets_prefix(&self) -> String {
        format!("{}/subnets/", self.prefix)
    }

    fn key(&self, subnet: Ipv4Net) -> String {
        format!("{}{}", self.subnets_prefix(), subnet_key(subnet))
    }

    fn record(&self, local: &LocalNode, subnet: Ipv4Net, vni: u32) -> Vec<u8> {
        NodeLease {
            subnet,
            public_ip: local.public_ip,
            backend: Some(local.backend),
            vtep_mac: Some(local.vtep_mac),
            name: subnet_key(subnet),
            node_name: Some(local.name.clone()),
            seniority: 0,
            unknown_backend: None,
        }
        .to_flannel_json(vni)
        .into_bytes()
    }

    fn holders_prefix(&self) -> String {
        format!("{}/{HOLDERS_DIR}", self.prefix)
    }

    fn holder_key(&self, subnet: Ipv4Net) -> String {
        format!("{}{}", self.holders_prefix(), subnet_key(subnet))
    }

    /// Records that this node holds `subnet` now (see [`HOLDERS_DIR`]).
    fn note_holder(&self, local: &LocalNode, subnet: Ipv4Net) -> Result<()> {
        let value = serde_json::to_vec(&json!({"PublicIP": local.public_ip}))?;
        self.client.put(&self.holder_key(subnet), &value, 0)
    }

    /// One allocation attempt (`Ok(None)`: lost a race, try again), in this order:
    /// 1. the lease that carries this node's address (an agent restarted within the TTL);
    /// 2. its previous subnet (from the subnet file), if nobody holds it;
    /// 3. a free subnet this node was the last to hold (the subnet file was lost);
    /// 4. a free subnet nobody ever held, picked at random (racing nodes rarely collide);
    /// 5. the free subnet whose last holder was seen longest ago: a subnet whose lease just
    ///    expired is handed out last, as its node (and its pods) may well come back.
    ///
    /// When the previous subnet is held by another node and nothing is free, the error is
    /// [`SubnetTaken`]: this node's pods still use addresses another node now hands out.
    fn try_allocate(
        &mut self,
        local: &LocalNode,
        conf: &FlannelNetConf,
    ) -> Result<Option<Ipv4Net>> {
        let (_, kvs) = self.client.range_prefix(&self.subnets_prefix())?;
        let mut taken = std::collections::HashMap::new();
        for kv in &kvs {
            let Some(subnet) = parse_subnet_key(&kv.key) else {
                continue;
            };
            let lease = NodeLease::from_flannel_json(subnet, &kv.value).ok();
            if let Some(lease) = &lease
                && lease.public_ip == local.public_ip
                && conf.is_leasable(subnet)
            {
                let value = self.record(local, subnet, conf.backend.vni);
                return Ok(self
                    .client
                    .put_if(&kv.key, &value, self.lease_id, Some(kv.mod_revision))?
                    .then_some(subnet));
            }
            taken.insert(subnet, lease.map(|l| l.public_ip));
        }
        let (_, history) = self.client.range_prefix(&self.holders_prefix())?;
        let holders: std::collections::HashMap<Ipv4Net, (Option<std::net::Ipv4Addr>, i64)> =
            history
                .iter()
                .filter_map(|kv| {
                    let subnet = parse_subnet_key(&kv.key)?;
                    let ip = serde_json::from_slice::<Value>(&kv.value)
                        .ok()
                        .and_then(|v| v["PublicIP"].as_str()?.parse().ok());
                    Some((subnet, (ip, kv.mod_revision)))
                })
                .collect();
        let free: Vec<Ipv4Net> = conf.subnets().filter(|s| !taken.contains_key(s)).collect();
        let choice = pick_subnet(local, &free, &holders);
        let Some(candidate) = choice else {
            let error = anyhow!(
                "no free subnet left in {} between SubnetMin {} and SubnetMax {}",
                conf.network,
                conf.subnet_min,
                conf.subnet_max
            );
            if let Some(prev) = local.previous_subnet
                && let Some(holder) = taken.get(&prev)
            {
                return Err(anyhow::Error::new(SubnetTaken {
                    subnet: prev,
                    holder: holder.map_or_else(|| "another node".into(), |ip| ip.to_string()),
                })
                .context(error));
            }
            return Err(error);
        };
        if let Some(prev) = local.previous_subnet
            && prev != candidate
            && let Some(holder) = taken.get(&prev)
        {
            tracing::warn!(
                previous = %prev,
                holder = ?holder,
                "this node's previous subnet is held by another node now"
            );
        }
        let value = self.record(local, candidate, conf.backend.vni);
        Ok(self
            .client
            .put_if(&self.key(candidate), &value, self.lease_id, None)?
            .then_some(candidate))
    }

    fn allocate(&mut self, local: &LocalNode, conf: &FlannelNetConf) -> Result<Ipv4Net> {
        // A lease granted by an earlier attempt that is still alive is reused: an agent that
        // retries for a long time (no subnet free) does not pile up leases of a day each.
        let alive = self.lease_id != 0
            && self
                .client
                .lease_keepalive(self.lease_id)
                .is_ok_and(|ttl| ttl > 0);
        if !alive {
            self.lease_id = self
                .client
                .lease_grant(self.ttl)
                .context("granting the subnet lease")?;
        }
        for _ in 0..50 {
            if let Some(subnet) = self.try_allocate(local, conf)? {
                self.subnet = Some(subnet);
                if let Err(e) = self.note_holder(local, subnet) {
                    tracing::warn!("recording this node as the holder of {subnet}: {e:#}");
                }
                return Ok(subnet);
            }
        }
        bail!("lost 50 subnet allocation races in a row")
    }

    /// Keeps the lease alive; re-acquires (same subnet when free) when it was lost.
    ///
    /// The lease is renewed every third of its TTL and checked every minute at most (a lease
    /// deleted by hand is noticed within a minute). When it is gone (this node was away longer
    /// than the TTL), the same subnet is taken again if nobody else holds it; otherwise another
    /// one ([`Event::LocalSubnet`]), and while none is free [`Event::SubnetLost`]: either way the
    /// agent stops serving the old subnet's addresses, which are another node's now.
    fn renew_loop(mut self, events: Sender<Event>) {
        let renew_every = Duration::from_millis(self.ttl * 1000 / 3);
        let period = renew_every.min(Duration::from_secs(60));
        let mut backoff = Backoff::new(Duration::from_secs(2));
        let (Some(local), Some(conf)) = (self.local.clone(), self.conf.clone()) else {
            return;
        };
        let mut renewed = std::time::Instant::now();
        let mut lost_reported = None;
        loop {
            let result: Result<()> = (|| {
                let subnet = self.subnet.expect("acquired");
                let ttl = self.client.lease_keepalive(self.lease_id)?;
                let ours = self
                    .client
                    .get(&self.key(subnet))?
                    .is_some_and(|kv| kv.lease == self.lease_id);
                if ttl > 0 && ours {
                    if renewed.elapsed() >= renew_every {
                        self.note_holder(&local, subnet)?;
                        renewed = std::time::Instant::now();
                    }
                    return Ok(());
                }
                tracing::warn!(%subnet, "subnet lease lost; acquiring again");
                let mut again = local.clone();
                again.previous_subnet = Some(subnet);
                match self.allocate(&again, &conf) {
                    Ok(new) => {
                        renewed = std::time::Instant::now();
                        lost_reported = None;
                        if new != subnet {
                            let _ = events.send(Event::LocalSubnet(new));
                        }
                        Ok(())
                    }
                    Err(e) => {
                        if let Some(taken) = e.downcast_ref::<SubnetTaken>()
                            && lost_reported != Some(taken.subnet)
                        {
                            lost_reported = Some(taken.subnet);
                            let _ = events.send(Event::SubnetLost(taken.subnet));
                        }
                        Err(e)
                    }
                }
            })();
            match result {
                Ok(()) => {
                    backoff.reset();
                    std::thread::sleep(period);
                }
                Err(err) => {
                    tracing::warn!("renewing the subnet lease: {err:#}");
                    std::thread::sleep(backoff.next_delay().max(Duration::from_millis(500)));
                }
            }
        }
    }
}

/// The name of the lease at `key`: its last component as written (`10.244.1.0-24`).
fn lease_name(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// The record a lease key holds (None: not a lease key), named by its key and as old as the
/// key's creation.
fn lease_of(kv: &Kv) -> Option<Result<NodeLease>> {
    let subnet = parse_subnet_key(&kv.key)?;
    Some(
        NodeLease::from_flannel_json(subnet, &kv.value).map(|lease| NodeLease {
            name: lease_name(&kv.key).to_string(),
            seniority: kv.create_revision,
            ..lease
        }),
    )
}

/// Lists and watches every lease, forever: a list (snapshot) then a watch from the next
/// revision; when the watch ends (etcd gone, compaction), back off and list again.
fn watch_loop(client: EtcdClient, prefix: String, events: Sender<Event>) {
    let mut backoff = Backoff::new(Duration::from_secs(2));
    let mut connected = None;
    loop {
        let listed = client.range_prefix(&prefix);
        let (rev, kvs) = match listed {
            Ok(x) => x,
            Err(err) => {
                if connected != Some(false) {
                    tracing::warn!("etcd unreachable: {err:#}");
                    let _ = events.send(Event::Connected(false));
                    connected = Some(false);
                }
                std::thread::sleep(backoff.next_delay());
                continue;
            }
        };
        if connected != Some(true) {
            let _ = events.send(Event::Connected(true));
            connected = Some(true);
        }
        let mut leases = Vec::new();
        let mut unreadable = Vec::new();
        for kv in &kvs {
            match lease_of(kv) {
                None => {}
                Some(Ok(lease)) => leases.push(lease),
                Some(Err(e)) => unreadable.push(Event::Unreadable {
                    name: lease_name(&kv.key).to_string(),
                    error: format!("{e:#}"),
                }),
            }
        }
        if events.send(Event::Snapshot(leases)).is_err()
            || unreadable.into_iter().any(|ev| events.send(ev).is_err())
        {
            return;
        }
        let mut sent = false;
        let err = client.watch_prefix(&prefix, rev + 1, |ev| {
            sent = true;
            let event = match ev {
                WatchEvent::Put(kv) => match lease_of(&kv) {
                    None => return,
                    Some(Ok(lease)) => Event::Upsert(lease),
                    // An unreadable record is no route (and counted as refused).
                    Some(Err(e)) => Event::Unreadable {
                        name: lease_name(&kv.key).to_string(),
                        error: format!("{e:#}"),
                    },
                },
                WatchEvent::Delete(kv) => match parse_subnet_key(&kv.key) {
                    Some(_) => Event::Remove(lease_name(&kv.key).to_string()),
                    None => return,
                },
            };
            let _ = events.send(event);
        });
        tracing::info!("etcd watch ended: {err:#}");
        if sent {
            backoff.reset();
        }
        std::thread::sleep(backoff.next_delay());
    }
}

impl Datastore for EtcdDatastore {
    fn net_conf(&mut self) -> Result<Option<String>> {
        let key = format!("{}/config", self.prefix);
        Ok(self
            .client
            .get(&key)?
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }

    fn acquire(&mut self, local: &LocalNode, conf: &FlannelNetConf) -> Result<Ipv4Net> {
        self.conf = Some(conf.clone());
        self.local = Some(local.clone());
        self.allocate(local, conf)
    }

    fn run(self: Box<Self>, events: Sender<Event>) -> Result<()> {
        let client = self.client.clone();
        let prefix = self.subnets_prefix();
        let ev = events.clone();
        std::thread::Builder::new()
            .name("etcd-watch".into())
            .spawn(move || watch_loop(client, prefix, ev))?;
        std::thread::Builder::new()
            .name("etcd-lease".into())
            .spawn(move || self.renew_loop(events))?;
        Ok(())
    }
}

/// Where weft remembers, per subnet, the last node that held it (`<prefix>/weft/holders/
/// 10.244.1.0-24` = `{"PublicIP": ..}`, no TTL, rewritten at every renewal so that its
/// `mod_revision` says when that node was last seen). flannel neither reads nor writes these
/// keys. The allocator hands out subnets nobody ever held first and recently expired ones last
/// (see `EtcdDatastore::try_allocate`).
pub const HOLDERS_DIR: &str = "weft/holders/";

/// This node's previous subnet is leased to another node now, and no other subnet is free: the
/// node's pods still use addresses that are the other node's.
#[derive(Debug, Clone, thiserror::Error)]
#[error("subnet {subnet}, this node's before, is leased to {holder} now")]
pub struct SubnetTaken {
    pub subnet: Ipv4Net,
    pub holder: String,
}

/// Which free subnet this node takes (see `EtcdDatastore::try_allocate`): its previous one,
/// else one it was the last to hold, else one nobody ever held (at random), else the one whose
/// last holder was seen longest ago. `holders`: the last holder of a subnet and the etcd
/// revision it was last seen at.
pub fn pick_subnet(
    local: &LocalNode,
    free: &[Ipv4Net],
    holders: &std::collections::HashMap<Ipv4Net, (Option<std::net::Ipv4Addr>, i64)>,
) -> Option<Ipv4Net> {
    if let Some(prev) = local.previous_subnet
        && free.contains(&prev)
    {
        return Some(prev);
    }
    let mine = free
        .iter()
        .filter(|s| {
            holders
                .get(s)
                .is_some_and(|(ip, _)| *ip == Some(local.public_ip))
        })
        .max_by_key(|s| holders[s].1);
    if let Some(s) = mine {
        return Some(*s);
    }
    let never: Vec<Ipv4Net> = free
        .iter()
        .filter(|s| !holders.contains_key(s))
        .copied()
        .collect();
    if !never.is_empty() {
        // Random choice, so that racing nodes rarely pick the same one.
        let r = RandomState::new().hash_one((local.public_ip, std::process::id()));
        return Some(never[(r % never.len() as u64) as usize]);
    }
    free.iter().min_by_key(|s| (holders[s].1, **s)).copied()
}

/// The etcd key of `subnet`'s lease under `prefix` (flannel's layout).
pub fn lease_key(prefix: &str, subnet: Ipv4Net) -> String {
    format!(
        "{}/subnets/{}",
        prefix.trim_end_matches('/'),
        subnet_key(subnet)
    )
}

#[cfg(test)]
mod tests {
    use std::{collections::HashMap, net::Ipv4Addr};

    use super::*;
    use crate::config::BackendType;

    fn local(previous: Option<&str>) -> LocalNode {
        LocalNode {
            name: "a".into(),
            public_ip: Ipv4Addr::new(192, 168, 1, 1),
            backend: BackendType::Vxlan,
            vtep_mac: [2, 0x57, 192, 168, 1, 1],
            previous_subnet: previous.map(|p| p.parse().unwrap()),
        }
    }

    fn nets(list: &[&str]) -> Vec<Ipv4Net> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn transaction_conditions_and_operations_in_the_gateway_json() {
        let b64 = |s: &str| B64.encode(s);
        assert_eq!(
            Compare::Value("/k", b"v").to_json(),
            json!({"key": b64("/k"), "target": "VALUE", "result": "EQUAL", "value": b64("v")})
        );
        assert_eq!(
            Compare::ModRevision("/k", 42).to_json(),
            json!({"key": b64("/k"), "target": "MOD", "result": "EQUAL", "mod_revision": "42"})
        );
        assert_eq!(
            Compare::Absent("/k").to_json(),
            json!({"key": b64("/k"), "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
        );
        assert_eq!(
            TxnOp::Delete("/k").to_json(),
            json!({"request_delete_range": {"key": b64("/k")}})
        );
        assert_eq!(
            TxnOp::Put {
                key: "/k",
                value: b"v",
                lease: 7
            }
            .to_json(),
            json!({"request_put": {"key": b64("/k"), "value": b64("v"), "lease": "7"}})
        );
    }

    #[test]
    fn free_subnets_never_held_go_first_recently_expired_last() {
        let free = nets(&["10.0.1.0/24", "10.0.2.0/24", "10.0.3.0/24", "10.0.4.0/24"]);
        let other = |n: u8| Some(Ipv4Addr::new(192, 168, 1, n));
        // .1 expired recently (revision 90), .2 long ago (10), .4 is this node's old one (50);
        // .3 was never held.
        let holders: HashMap<Ipv4Net, (Option<Ipv4Addr>, i64)> = [
            ("10.0.1.0/24", (other(7), 90)),
            ("10.0.2.0/24", (other(8), 10)),
            ("10.0.4.0/24", (Some(Ipv4Addr::new(192, 168, 1, 1)), 50)),
        ]
        .into_iter()
        .map(|(s, h)| (s.parse().unwrap(), h))
        .collect();
        let pick = |prev: Option<&str>, free: &[Ipv4Net]| pick_subnet(&local(prev), free, &holders);
        // The previous subnet when free, whatever its history.
        assert_eq!(pick(Some("10.0.1.0/24"), &free), Some(free[0]));
        // Without one: the subnet this node held last.
        assert_eq!(pick(None, &free), Some(free[3]));
        // Then one nobody ever held.
        assert_eq!(pick(None, &free[..3]), Some(free[2]));
        // Then the one whose holder was seen longest ago; the one that just expired comes last.
        assert_eq!(pick(None, &free[..2]), Some(free[1]));
        assert_eq!(pick(None, &free[..1]), Some(free[0]));
        assert_eq!(pick(Some("10.0.9.0/24"), &[]), None);
    }
}
