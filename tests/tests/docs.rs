//! The operator docs against the code, both ways, so that neither can drift:
//!
//! - docs/configuration.md's tables list every `weft-agent` flag (from the binary's own
//!   `--help`, with clap's defaults), every net-conf.json key and every CNI config field (the
//!   fields of the parsers' serde types, listed by tracing their `Deserialize` impls with
//!   serde-reflection, then confirmed by feeding each one a bad value: the error must name
//!   it), and nothing else; literal defaults are checked by parsing
//!   a config that sets the key to its documented default, which must change nothing.
//! - docs/troubleshooting.md lists every drop reason and every datapath counter.
//! - Relative links in README.md and docs/ point at files that exist.
//!
//! A failure says which row to add, remove or change.
use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
};

use serde_json::{Map, Value, json};
use weft_tests::cluster::bin_dir;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

/// The rows of the first table under the heading `## {heading}`: cells, trimmed.
fn table(doc: &str, heading: &str) -> Vec<Vec<String>> {
    let mut lines = doc
        .lines()
        .skip_while(|l| l.trim() != format!("## {heading}"))
        .skip(1)
        .take_while(|l| !l.starts_with("## "))
        .skip_while(|l| !l.starts_with('|'))
        .take_while(|l| l.starts_with('|'));
    assert!(
        lines.next().is_some() && lines.next().is_some(),
        "no table under `## {heading}`"
    );
    lines
        .map(|l| {
            l.replace("\\|", "\u{1}")
                .trim()
                .trim_matches('|')
                .split('|')
                .map(|c| c.trim().replace('\u{1}', "|"))
                .collect()
        })
        .collect()
}

/// The first `code` span of a cell.
fn code(cell: &str) -> Option<String> {
    let rest = cell.split_once('`')?.1;
    Some(rest.split_once('`')?.0.to_string())
}

/// Rows keyed by the first cell's code span.
fn keyed(rows: Vec<Vec<String>>, what: &str) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for row in rows {
        let key = code(&row[0]).unwrap_or_else(|| panic!("{what} row {row:?}: no `key`"));
        assert!(
            out.insert(key.clone(), row).is_none(),
            "{what}: two rows for {key}"
        );
    }
    out
}

fn fail_on(problems: Vec<String>) {
    assert!(
        problems.is_empty(),
        "docs/configuration.md does not match the code:\n  {}",
        problems.join("\n  ")
    );
}

/// What `--help` says of a flag.
#[derive(Debug)]
struct Flag {
    default: Option<String>,
    help: String,
    values: Vec<String>,
    takes_value: bool,
}

/// `weft-agent --help`, by long flag.
fn agent_flags() -> BTreeMap<String, Flag> {
    let out = std::process::Command::new(bin_dir().join("weft-agent"))
        .arg("--help")
        .output()
        .expect("running weft-agent --help");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut flags = BTreeMap::new();
    // (flag, takes a value, text after the header)
    let mut current: Option<(String, bool, String)> = None;
    let finish = |cur: Option<(String, bool, String)>, flags: &mut BTreeMap<String, Flag>| {
        let Some((flag, takes_value, body)) = cur else {
            return;
        };
        let bracket = |tag: &str| {
            body.split_once(&format!("[{tag}: "))
                .and_then(|(_, r)| r.split_once(']'))
                .map(|(v, _)| v.to_string())
        };
        let default = bracket("default");
        let values = bracket("possible values")
            .map(|v| v.split(", ").map(str::to_string).collect())
            .unwrap_or_default();
        let help = body
            .split(" [")
            .next()
            .unwrap_or("")
            .trim()
            .trim_start_matches('[')
            .to_string();
        flags.insert(
            flag,
            Flag {
                default,
                help,
                values,
                takes_value,
            },
        );
    };
    for line in text.lines() {
        let t = line.trim_start();
        let header = line.starts_with(' ') && t.starts_with('-');
        if header {
            finish(current.take(), &mut flags);
            let long = t
                .split(|c: char| c == ',' || c.is_whitespace())
                .find(|w| w.starts_with("--"))
                .unwrap_or_else(|| panic!("no long flag in {line:?}"));
            let (head, rest) = t.split_once("  ").unwrap_or((t, ""));
            current = Some((
                long.to_string(),
                head.contains('<'),
                rest.trim().to_string(),
            ));
        } else if let Some((_, _, body)) = current.as_mut() {
            body.push(' ');
            body.push_str(t);
        }
    }
    finish(current.take(), &mut flags);
    flags.remove("--help");
    flags.remove("--version");
    assert!(
        flags.len() >= 10,
        "parsed too few flags from --help: {flags:?}"
    );
    flags
}

#[test]
fn configuration_reference_lists_every_agent_flag() {
    let flags = agent_flags();
    let doc = read("docs/configuration.md");
    let rows = keyed(table(&doc, "weft-agent flags"), "weft-agent flags");
    let mut problems = Vec::new();
    for (flag, f) in &flags {
        let Flag {
            default,
            help,
            values,
            takes_value,
        } = f;
        let Some(row) = rows.get(flag) else {
            let default = match (default, takes_value) {
                (Some(d), _) => format!("`{d}`"),
                (None, true) => "none".into(),
                (None, false) => "off".into(),
            };
            problems.push(format!(
                "table \"weft-agent flags\": add the row | `{flag}` | {default} | {help} |"
            ));
            continue;
        };
        let cell = &row[1];
        match default {
            Some(d) if !cell.contains(&format!("`{d}`")) => problems.push(format!(
                "table \"weft-agent flags\", row `{flag}`: the default is `{d}` (weft-agent --help), the doc says {cell:?}"
            )),
            None if cell.starts_with('`') => problems.push(format!(
                "table \"weft-agent flags\", row `{flag}`: weft-agent has no literal default for it, the doc says {cell:?}: describe it instead"
            )),
            _ => {}
        }
        for v in values {
            if !row[2].contains(&format!("`{v}`")) {
                problems.push(format!(
                    "table \"weft-agent flags\", row `{flag}`: the meaning does not mention the value `{v}`"
                ));
            }
        }
    }
    for flag in rows.keys() {
        if !flags.contains_key(flag) {
            problems.push(format!(
                "table \"weft-agent flags\": remove the row for `{flag}`: weft-agent has no such flag"
            ));
        }
    }
    fail_on(problems);
}

/// The field names a serde struct's `Deserialize` impl declares (renames applied): what the
/// derive hands `deserialize_struct`, caught by a deserializer that stops right there.
fn serde_fields<T: for<'de> serde::Deserialize<'de>>() -> BTreeSet<String> {
    use serde::de::{self, Visitor};
    #[derive(Debug)]
    struct Caught(Vec<&'static str>);
    impl std::fmt::Display for Caught {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "fields {:?}", self.0)
        }
    }
    impl std::error::Error for Caught {}
    impl de::Error for Caught {
        fn custom<M: std::fmt::Display>(_: M) -> Self {
            Caught(Vec::new())
        }
    }
    struct FieldCatcher;
    impl<'de> de::Deserializer<'de> for FieldCatcher {
        type Error = Caught;
        fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Caught> {
            Err(Caught(Vec::new()))
        }
        fn deserialize_struct<V: Visitor<'de>>(
            self,
            _name: &'static str,
            fields: &'static [&'static str],
            _: V,
        ) -> Result<V::Value, Caught> {
            Err(Caught(fields.to_vec()))
        }
        serde::forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes
            byte_buf option unit unit_struct newtype_struct seq tuple tuple_struct map enum
            identifier ignored_any
        }
    }
    match T::deserialize(FieldCatcher) {
        Err(Caught(fields)) if !fields.is_empty() => {
            fields.into_iter().map(str::to_string).collect()
        }
        _ => panic!("{} is not a struct", std::any::type_name::<T>()),
    }
}

/// Sets the dotted `path` in a JSON object.
fn set_path(obj: &mut Value, path: &str, value: Value) {
    let mut cur = obj;
    let parts: Vec<&str> = path.split('.').collect();
    for p in &parts[..parts.len() - 1] {
        if !cur[*p].is_object() {
            cur[*p] = json!({});
        }
        cur = &mut cur[*p];
    }
    cur[parts[parts.len() - 1]] = value;
}

/// A documented default in backticks as JSON (a bare word is a string).
fn literal(cell: &str) -> Option<Value> {
    if !cell.starts_with('`') {
        return None;
    }
    let text = code(cell)?;
    Some(serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

const NET_CONF_BASE: &str = "10.244.0.0/16";

fn parse_net_conf(v: &Value) -> Result<weft_agent::config::FlannelNetConf, String> {
    weft_agent::config::FlannelNetConf::parse(&v.to_string()).map_err(|e| format!("{e:#}"))
}

/// flannel's spelling of a key the parser reads (keys are matched case-insensitively): the
/// dotted path the error names when the key gets a bad value.
fn net_conf_path(key: &str) -> Option<String> {
    // A string no key accepts (an array would be read as a struct's fields in order).
    let mut conf = json!({"Network": NET_CONF_BASE});
    set_path(&mut conf, key, json!("?"));
    let error = parse_net_conf(&conf).err()?;
    let (path, _) = error.split_once(':')?;
    path.eq_ignore_ascii_case(key).then(|| path.to_string())
}

/// The `Backend.Peers` entry fields (bgp backend): the path an error names when `field` of the
/// first peer gets a bad value, as the reference spells it (`Backend.Peers[].AS`).
fn peer_field_path(field: &str) -> Option<String> {
    let mut peer = json!({"Address": "10.0.0.1"});
    peer[field] = json!("?");
    let conf = json!({"Network": NET_CONF_BASE, "Backend": {"Peers": [peer]}});
    let error = parse_net_conf(&conf).err()?;
    let (path, _) = error.split_once(':')?;
    let name = path.strip_prefix("Backend.Peers[0].")?;
    name.eq_ignore_ascii_case(field)
        .then(|| format!("Backend.Peers[].{name}"))
}

/// Whether setting the documented default of `path` changes nothing: with the default backend
/// and, unless the row is `Backend.Type` itself, with `Type: "bgp"` (whose keys only count
/// there). Peer fields are set on a peer that has only an `Address`.
fn default_problem(path: &str, default: &Value) -> Option<String> {
    let bases: Vec<Value> = if path.starts_with("Backend.Peers[].") {
        vec![
            json!({"Network": NET_CONF_BASE, "Backend": {"Type": "bgp", "Peers": [{"Address": "10.0.0.1"}]}}),
        ]
    } else if path == "Backend.Type" || !path.starts_with("Backend.") {
        vec![json!({"Network": NET_CONF_BASE})]
    } else {
        vec![
            json!({"Network": NET_CONF_BASE}),
            json!({"Network": NET_CONF_BASE, "Backend": {"Type": "bgp"}}),
        ]
    };
    for base in bases {
        let want = parse_net_conf(&base).unwrap();
        let mut conf = base.clone();
        match path.strip_prefix("Backend.Peers[].") {
            Some(field) => conf["Backend"]["Peers"][0][field] = default.clone(),
            None => set_path(&mut conf, path, default.clone()),
        }
        match parse_net_conf(&conf) {
            Ok(c) if c == want => {}
            Ok(c) => {
                return Some(format!(
                    "table \"net-conf.json\", row `{path}`: {default} is not the default ({c:?} differs from {want:?})"
                ));
            }
            Err(e) => {
                return Some(format!(
                    "table \"net-conf.json\", row `{path}`: the documented default {default} is refused: {e}"
                ));
            }
        }
    }
    None
}

#[test]
fn configuration_reference_lists_every_net_conf_key() {
    let mut keys = serde_fields::<weft_agent::config::RawNetConf>();
    keys.extend(
        serde_fields::<weft_agent::config::RawBackend>()
            .into_iter()
            .map(|k| format!("backend.{k}")),
    );
    assert!(keys.len() >= 8, "found only {keys:?} in the net-conf types");
    let doc = read("docs/configuration.md");
    let rows = keyed(table(&doc, "net-conf.json"), "net-conf.json");
    let mut problems = Vec::new();
    let mut code_paths = BTreeSet::new();
    for key in &keys {
        match net_conf_path(key) {
            Some(path) => {
                if !rows.contains_key(&path) {
                    problems.push(format!(
                        "table \"net-conf.json\": add a row for `{path}` (read by agent/src/config.rs)"
                    ));
                }
                code_paths.insert(path);
            }
            None => problems.push(format!(
                "agent/src/config.rs reads {key:?} but a bad value for it is not refused naming it"
            )),
        }
    }
    let peer_fields = serde_fields::<weft_agent::bgp::config::RawPeer>();
    assert!(
        peer_fields.len() >= 5,
        "found only {peer_fields:?} in a bgp peer"
    );
    for field in &peer_fields {
        match peer_field_path(field) {
            Some(path) => {
                if !rows.contains_key(&path) {
                    problems.push(format!(
                        "table \"net-conf.json\": add a row for `{path}` (read by agent/src/bgp/config.rs)"
                    ));
                }
                code_paths.insert(path);
            }
            None => problems.push(format!(
                "agent/src/bgp/config.rs reads the peer field {field:?} but a bad value for it is not refused naming it"
            )),
        }
    }
    for (path, row) in &rows {
        if !code_paths.contains(path) {
            problems.push(format!(
                "table \"net-conf.json\": remove the row for `{path}`: the agent does not read it"
            ));
            continue;
        }
        if let Some(default) = literal(&row[1]) {
            problems.extend(default_problem(path, &default));
        }
    }
    fail_on(problems);
}

fn parse_cni(v: &Value) -> Result<String, String> {
    let map: Map<String, Value> = v.as_object().unwrap().clone();
    weft_agent::cni::spec::NetworkConfig::parse(Value::Object(map))
        .map(|c| format!("{c:?}"))
        .map_err(|e| e.msg)
}

#[test]
fn configuration_reference_lists_every_cni_field() {
    let fields = serde_fields::<weft_agent::cni::spec::RawConfig>();
    assert!(
        fields.len() >= 8,
        "found only {fields:?} in the CNI config type"
    );
    let doc = read("docs/configuration.md");
    let rows = keyed(
        table(&doc, "CNI network configuration"),
        "CNI network configuration",
    );
    let base = json!({"cniVersion": "1.1.0", "name": "weft", "type": "weft-cni"});
    let parsed_base = parse_cni(&base).unwrap();
    let mut problems = Vec::new();
    for field in &fields {
        if !rows.contains_key(field) {
            problems.push(format!(
                "table \"CNI network configuration\": add a row for `{field}` (read by node/src/cni/spec.rs)"
            ));
        }
    }
    for (field, row) in &rows {
        // The plugin knows the field: a bad value is refused, naming it.
        let mut bad = base.clone();
        bad[field] = json!([[]]);
        match parse_cni(&bad) {
            Err(e) if e.contains(&format!("`{field}")) => {}
            other => problems.push(format!(
                "table \"CNI network configuration\": remove the row for `{field}`: weft-cni does not read it ({other:?})"
            )),
        }
        if let Some(default) = literal(&row[1]) {
            let mut conf = base.clone();
            conf[field] = default.clone();
            match parse_cni(&conf) {
                Ok(c) if c == parsed_base => {}
                other => problems.push(format!(
                    "table \"CNI network configuration\", row `{field}`: {default} is not the default ({other:?})"
                )),
            }
        }
    }
    fail_on(problems);
}

#[test]
fn troubleshooting_lists_every_drop_reason_and_counter() {
    let doc = read("docs/troubleshooting.md");
    let mut problems = Vec::new();
    for (heading, names) in [
        (
            "Drops by reason",
            weft_common::DropReason::ALL
                .iter()
                .map(|r| r.name())
                .collect::<Vec<_>>(),
        ),
        (
            "What the datapath did with the rest",
            weft_common::Stat::ALL.iter().map(|s| s.name()).collect(),
        ),
    ] {
        let rows = keyed(table(&doc, heading), heading);
        for name in &names {
            if !rows.contains_key(*name) {
                problems.push(format!(
                    "docs/troubleshooting.md, table \"{heading}\": add a row for `{name}` (its doc comment in common/src/lib.rs says what it means)"
                ));
            }
        }
        for name in rows.keys() {
            if !names.contains(&name.as_str()) {
                problems.push(format!(
                    "docs/troubleshooting.md, table \"{heading}\": remove the row for `{name}`: the datapath has no such counter"
                ));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn relative_links_resolve() {
    let mut files = vec![root().join("README.md")];
    for e in std::fs::read_dir(root().join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            files.push(p);
        }
    }
    let mut broken = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).unwrap();
        for (i, _) in text.match_indices("](") {
            let target = text[i + 2..].split(')').next().unwrap();
            let target = target.split('#').next().unwrap();
            if target.is_empty() || target.contains("://") || target.starts_with("mailto:") {
                continue;
            }
            if !file.parent().unwrap().join(target).exists() {
                broken.push(format!("{}: {target}", file.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links: {broken:?}");
    let readme = read("README.md");
    for doc in [
        "docs/configuration.md",
        "docs/deploying.md",
        "docs/architecture.md",
        "docs/troubleshooting.md",
        "docs/migrating-from-flannel.md",
        "docs/bgp.md",
    ] {
        assert!(
            readme.contains(&format!("]({doc})")),
            "README.md does not link {doc}"
        );
    }
}
