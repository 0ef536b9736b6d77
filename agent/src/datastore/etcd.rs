//! etcd datastore with flannel's layout, so weft and flanneld nodes share one cluster:
//! `<prefix>/config` holds net-conf.json, `<prefix>/subnets/10.244.1.0-24` one lease per node
//! (`{"PublicIP":..,"BackendType":..,"BackendData":{"VNI":1,"VtepMAC":..}}`) attached to an etcd
//! lease with a TTL that the agent keeps alive.
//!
//! The client speaks etcd's v3 JSON gateway (`/v3/kv/range`, `/v3/kv/txn`, `/v3/lease/*`,
//! `/v3/watch`) over plain HTTP: no gRPC/protobuf toolchain, a small dependency (`ureq`), and
//! the same API the etcd v3 gRPC clients use. Allocation is a transaction that creates the key
//! only if it does not exist (`create_revision == 0`), so two racing nodes never share a subnet.
use std::{
    collections::hash_map::RandomState,
    hash::BuildHasher,
    io::{BufRead, BufReader},
    sync::mpsc::Sender,
    time::Duration,
};

use anyhow::{Context as _, Result, anyhow, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use ipnet::Ipv4Net;
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
    pub mod_revision: i64,
    pub lease: i64,
}

/// A watch event.
#[derive(Clone, Debug)]
pub enum WatchEvent {
    Put(Kv),
    Delete(String),
}

/// Minimal etcd v3 client over the JSON gateway.
#[derive(Clone)]
pub struct EtcdClient {
    endpoints: Vec<String>,
    agent: ureq::Agent,
    watch_agent: ureq::Agent,
}

fn num(v: &Value) -> i64 {
    // The gateway renders int64 as strings.
    match v {
        Value::String(s) => s.parse().unwrap_or(0),
        Value::Number(n) => n.as_i64().unwrap_or(0),
        _ => 0,
    }
}

fn decode(v: &Value) -> Vec<u8> {
    v.as_str()
        .and_then(|s| B64.decode(s).ok())
        .unwrap_or_default()
}

fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    if let Some(last) = end.last_mut() {
        *last += 1;
    }
    end
}

fn parse_kv(kv: &Value) -> Kv {
    Kv {
        key: String::from_utf8_lossy(&decode(&kv["key"])).into_owned(),
        value: decode(&kv["value"]),
        mod_revision: num(&kv["mod_revision"]),
        lease: num(&kv["lease"]),
    }
}

impl EtcdClient {
    pub fn new(endpoints: &[String]) -> Result<Self> {
        if endpoints.is_empty() {
            bail!("--etcd-endpoints: at least one endpoint is needed");
        }
        let endpoints = endpoints
            .iter()
            .map(|e| e.trim_end_matches('/').to_string())
            .collect::<Vec<_>>();
        for e in &endpoints {
            if !e.starts_with("http://") {
                bail!("--etcd-endpoints: {e:?} must be an http:// URL");
            }
        }
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(1))
            .timeout(Duration::from_secs(3))
            .build();
        // A watch is idle for as long as nothing changes; a dead server resets the connection.
        // The read timeout only bounds a silent network partition (then the watch is renewed).
        let watch_agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(1))
            .timeout_read(Duration::from_secs(120))
            .build();
        Ok(Self {
            endpoints,
            agent,
            watch_agent,
        })
    }

    /// POSTs `body` to `path` on the first endpoint that answers.
    pub fn call(&self, path: &str, body: Value) -> Result<Value> {
        let mut last = None;
        for e in &self.endpoints {
            match self.agent.post(&format!("{e}{path}")).send_json(&body) {
                Ok(resp) => {
                    return resp
                        .into_json()
                        .with_context(|| format!("etcd {path}: invalid response"));
                }
                Err(ureq::Error::Status(code, resp)) => {
                    let text = resp.into_string().unwrap_or_default();
                    bail!("etcd {path}: HTTP {code}: {text}");
                }
                Err(err) => last = Some(anyhow!("etcd {e}{path}: {err}")),
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no etcd endpoint")))
    }

    pub fn get(&self, key: &str) -> Result<Option<Kv>> {
        let out = self.call("/v3/kv/range", json!({"key": B64.encode(key)}))?;
        Ok(out["kvs"].as_array().and_then(|a| a.first()).map(parse_kv))
    }

    /// Every key under `prefix` and the store's revision at that moment.
    pub fn range_prefix(&self, prefix: &str) -> Result<(i64, Vec<Kv>)> {
        let out = self.call(
            "/v3/kv/range",
            json!({"key": B64.encode(prefix), "range_end": B64.encode(prefix_end(prefix))}),
        )?;
        let rev = num(&out["header"]["revision"]);
        let kvs = out["kvs"]
            .as_array()
            .map(|a| a.iter().map(parse_kv).collect())
            .unwrap_or_default();
        Ok((rev, kvs))
    }

    pub fn put(&self, key: &str, value: &[u8], lease: i64) -> Result<()> {
        self.call(
            "/v3/kv/put",
            json!({"key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string()}),
        )?;
        Ok(())
    }

    /// Writes every pair in one transaction (etcd allows 128 operations per transaction by
    /// default).
    pub fn put_all(&self, kvs: &[(String, Vec<u8>)]) -> Result<()> {
        let ops: Vec<Value> = kvs
            .iter()
            .map(|(k, v)| json!({"request_put": {"key": B64.encode(k), "value": B64.encode(v)}}))
            .collect();
        self.call("/v3/kv/txn", json!({"success": ops}))?;
        Ok(())
    }

    pub fn delete(&self, key: &str) -> Result<()> {
        self.call("/v3/kv/deleterange", json!({"key": B64.encode(key)}))?;
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
            None => {
                json!({"key": B64.encode(key), "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
            }
            Some(r) => {
                json!({"key": B64.encode(key), "target": "MOD", "result": "EQUAL", "mod_revision": r.to_string()})
            }
        };
        let out = self.call(
            "/v3/kv/txn",
            json!({
                "compare": [compare],
                "success": [{"request_put": {"key": B64.encode(key), "value": B64.encode(value), "lease": lease.to_string()}}],
            }),
        )?;
        Ok(out["succeeded"].as_bool().unwrap_or(false))
    }

    pub fn lease_grant(&self, ttl: u64) -> Result<i64> {
        let out = self.call("/v3/lease/grant", json!({"TTL": ttl.to_string()}))?;
        let id = num(&out["ID"]);
        if id == 0 {
            bail!("etcd granted no lease: {out}");
        }
        Ok(id)
    }

    /// Renews a lease; returns its new TTL (0: the lease no longer exists).
    pub fn lease_keepalive(&self, id: i64) -> Result<i64> {
        let out = self.call("/v3/lease/keepalive", json!({"ID": id.to_string()}))?;
        Ok(num(&out["result"]["TTL"]))
    }

    pub fn lease_revoke(&self, id: i64) -> Result<()> {
        self.call("/v3/lease/revoke", json!({"ID": id.to_string()}))?;
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
        let body = json!({"create_request": {
            "key": B64.encode(prefix),
            "range_end": B64.encode(prefix_end(prefix)),
            "start_revision": start_revision.to_string(),
        }});
        let mut last = anyhow!("no etcd endpoint");
        for e in &self.endpoints {
            let resp = match self
                .watch_agent
                .post(&format!("{e}/v3/watch"))
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
                let Ok(msg) = serde_json::from_str::<Value>(&line) else {
                    return anyhow!("etcd watch: unparsable message {line}");
                };
                let result = &msg["result"];
                if result["canceled"].as_bool().unwrap_or(false)
                    || num(&result["compact_revision"]) != 0
                {
                    return anyhow!("etcd watch canceled: {line}");
                }
                if msg.get("error").is_some() {
                    return anyhow!("etcd watch error: {line}");
                }
                for ev in result["events"].as_array().into_iter().flatten() {
                    let kv = parse_kv(&ev["kv"]);
                    if ev["type"].as_str() == Some("DELETE") {
                        on_event(WatchEvent::Delete(kv.key));
                    } else {
                        on_event(WatchEvent::Put(kv));
                    }
                }
            }
            return anyhow!("etcd watch stream ended");
        }
        last
    }
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
        if ttl < 2 {
            bail!("--lease-ttl: {ttl} s is too short (at least 2)");
        }
        Ok(Self {
            client: EtcdClient::new(endpoints)?,
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
        }
        .to_flannel_json(vni)
        .to_string()
        .into_bytes()
    }

    /// One allocation attempt: reuse this node's record (same PublicIP), else its previous
    /// subnet if free, else a free subnet picked at random. `Ok(None)`: lost a race, try again.
    fn try_allocate(&mut self, local: &LocalNode, conf: &FlannelNetConf) -> Result<Option<Ipv4Net>> {
        let (_, kvs) = self.client.range_prefix(&self.subnets_prefix())?;
        let mut taken = std::collections::HashSet::new();
        for kv in &kvs {
            let Some(subnet) = parse_subnet_key(&kv.key) else {
                continue;
            };
            taken.insert(subnet);
            let Ok(lease) = NodeLease::from_flannel_json(subnet, &kv.value) else {
                continue;
            };
            if lease.public_ip == local.public_ip && conf.is_leasable(subnet) {
                let value = self.record(local, subnet, conf.backend.vni);
                return Ok(self
                    .client
                    .put_if(&kv.key, &value, self.lease_id, Some(kv.mod_revision))?
                    .then_some(subnet));
            }
        }
        let candidate = match local.previous_subnet {
            Some(prev) if conf.is_leasable(prev) && !taken.contains(&prev) => prev,
            _ => {
                let free: Vec<Ipv4Net> = conf.subnets().filter(|s| !taken.contains(s)).collect();
                if free.is_empty() {
                    bail!(
                        "no free subnet left in {} between SubnetMin {} and SubnetMax {}",
                        conf.network,
                        conf.subnet_min,
                        conf.subnet_max
                    );
                }
                // Random choice, so that racing nodes rarely pick the same one.
                let r = RandomState::new().hash_one((local.public_ip, std::process::id()));
                free[(r % free.len() as u64) as usize]
            }
        };
        let value = self.record(local, candidate, conf.backend.vni);
        Ok(self
            .client
            .put_if(&self.key(candidate), &value, self.lease_id, None)?
            .then_some(candidate))
    }

    fn allocate(&mut self, local: &LocalNode, conf: &FlannelNetConf) -> Result<Ipv4Net> {
        self.lease_id = self
            .client
            .lease_grant(self.ttl)
            .context("granting the subnet lease")?;
        for _ in 0..50 {
            if let Some(subnet) = self.try_allocate(local, conf)? {
                self.subnet = Some(subnet);
                return Ok(subnet);
            }
        }
        bail!("lost 50 subnet allocation races in a row")
    }

    /// Keeps the lease alive; re-acquires (same subnet when free) when it was lost.
    fn renew_loop(mut self, events: Sender<Event>) {
        let period = Duration::from_millis(self.ttl * 1000 / 3);
        let mut backoff = Backoff::new(Duration::from_secs(2));
        let (Some(local), Some(conf)) = (self.local.clone(), self.conf.clone()) else {
            return;
        };
        loop {
            let result: Result<()> = (|| {
                let ttl = self.client.lease_keepalive(self.lease_id)?;
                let subnet = self.subnet.expect("acquired");
                let ours = self
                    .client
                    .get(&self.key(subnet))?
                    .is_some_and(|kv| kv.lease == self.lease_id);
                if ttl <= 0 || !ours {
                    tracing::warn!(%subnet, "subnet lease lost; acquiring again");
                    let mut again = local.clone();
                    again.previous_subnet = Some(subnet);
                    let new = self.allocate(&again, &conf)?;
                    if new != subnet {
                        let _ = events.send(Event::LocalSubnet(new));
                    }
                }
                Ok(())
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
        let leases = kvs
            .iter()
            .filter_map(|kv| {
                let subnet = parse_subnet_key(&kv.key)?;
                NodeLease::from_flannel_json(subnet, &kv.value)
                    .map_err(|e| tracing::warn!("ignoring {}: {e:#}", kv.key))
                    .ok()
            })
            .collect();
        if events.send(Event::Snapshot(leases)).is_err() {
            return;
        }
        let mut sent = false;
        let err = client.watch_prefix(&prefix, rev + 1, |ev| {
            sent = true;
            let event = match ev {
                WatchEvent::Put(kv) => {
                    let Some(subnet) = parse_subnet_key(&kv.key) else {
                        return;
                    };
                    match NodeLease::from_flannel_json(subnet, &kv.value) {
                        Ok(lease) => Event::Upsert(lease),
                        Err(e) => {
                            tracing::warn!("ignoring {}: {e:#}", kv.key);
                            // An unreadable record is no route.
                            Event::Remove(subnet)
                        }
                    }
                }
                WatchEvent::Delete(key) => match parse_subnet_key(&key) {
                    Some(subnet) => Event::Remove(subnet),
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

/// The etcd key of `subnet`'s lease under `prefix` (flannel's layout).
pub fn lease_key(prefix: &str, subnet: Ipv4Net) -> String {
    format!(
        "{}/subnets/{}",
        prefix.trim_end_matches('/'),
        subnet_key(subnet)
    )
}
