//! NetworkPolicy validation with the API server's own field paths and messages
//! (`pkg/apis/networking/validation`, apimachinery's label and field validation), so a policy
//! refused by weft reads exactly as `kubectl apply` would print it, e.g.
//! `spec.ingress[0].from[0]: Required value: must specify a peer`.
//!
//! CIDRs are checked as Kubernetes 1.33 does by default (`StrictIPCIDRValidation` off): a
//! value with host bits set (`10.0.0.1/8`) is accepted as its network; one that does not parse
//! at all is refused.
use std::{fmt, net::IpAddr};

use ipnet::IpNet;
use k8s_openapi::{
    api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort},
    apimachinery::pkg::{apis::meta::v1::LabelSelector, util::intstr::IntOrString},
};

/// One field error, printed as apimachinery's `field.Error` prints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    pub field: String,
    pub body: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.body)
    }
}

/// Every error of one object, in the order the API server reports them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidationErrors {
    /// `NetworkPolicy "name"`.
    pub object: String,
    pub errors: Vec<FieldError>,
}

impl fmt::Display for ValidationErrors {
    /// As the API server's Invalid status message: `The NetworkPolicy "n" is invalid: <err>`,
    /// several errors in brackets, comma-separated.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "The {} is invalid: ", self.object)?;
        if self.errors.len() == 1 {
            write!(f, "{}", self.errors[0])
        } else {
            let all: Vec<String> = self.errors.iter().map(|e| e.to_string()).collect();
            write!(f, "[{}]", all.join(", "))
        }
    }
}

impl std::error::Error for ValidationErrors {}

/// A field path (`field.Path`).
#[derive(Clone)]
struct Path(String);

impl Path {
    fn root(name: &str) -> Self {
        Self(name.into())
    }
    fn child(&self, name: &str) -> Self {
        Self(format!("{}.{}", self.0, name))
    }
    fn index(&self, i: usize) -> Self {
        Self(format!("{}[{}]", self.0, i))
    }
}

/// The bad value as `field.Error.ErrorBody` prints it.
enum Value<'a> {
    /// A Go `string` (quoted with %q).
    Str(&'a str),
    /// A Go integer.
    Int(i64),
    /// A named string type (Protocol, PolicyType, LabelSelectorOperator): printed with %#v,
    /// which also quotes.
    Named(&'a str),
    /// Anything else, already formatted.
    Raw(String),
}

#[derive(Default)]
struct Errors(Vec<FieldError>);

impl Errors {
    fn required(&mut self, p: &Path, detail: &str) {
        self.push(p, "Required value".into(), detail);
    }
    fn forbidden(&mut self, p: &Path, detail: &str) {
        self.push(p, "Forbidden".into(), detail);
    }
    fn invalid(&mut self, p: &Path, v: Value, detail: &str) {
        self.push(p, format!("Invalid value: {}", show(v)), detail);
    }
    fn not_supported(&mut self, p: &Path, v: Value, supported: &[&str]) {
        let quoted: Vec<String> = supported.iter().map(|s| go_quote(s)).collect();
        let detail = format!("supported values: {}", quoted.join(", "));
        self.push(p, format!("Unsupported value: {}", show(v)), &detail);
    }
    fn push(&mut self, p: &Path, head: String, detail: &str) {
        let body = if detail.is_empty() {
            head
        } else {
            format!("{head}: {detail}")
        };
        self.0.push(FieldError {
            field: p.0.clone(),
            body,
        });
    }
}

fn show(v: Value) -> String {
    match v {
        Value::Str(s) | Value::Named(s) => go_quote(s),
        Value::Int(n) => n.to_string(),
        Value::Raw(s) => s,
    }
}

/// Go's `%q` for the strings that can appear here.
fn go_quote(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Validates a NetworkPolicy as `ValidateNetworkPolicy` does on create.
pub fn validate_network_policy(np: &NetworkPolicy) -> Result<(), ValidationErrors> {
    let mut errs = Errors::default();
    let name = np.metadata.name.clone().unwrap_or_default();
    let meta = Path::root("metadata");
    if name.is_empty() && np.metadata.generate_name.is_none() {
        errs.required(&meta.child("name"), "name or generateName is required");
    } else if !name.is_empty() {
        for msg in dns1123_subdomain(&name) {
            errs.invalid(&meta.child("name"), Value::Str(&name), &msg);
        }
    }
    if let Some(ns) = &np.metadata.namespace {
        for msg in dns1123_label(ns) {
            errs.invalid(&meta.child("namespace"), Value::Str(ns), &msg);
        }
    }
    let spec_path = Path::root("spec");
    let spec = np.spec.clone().unwrap_or_default();
    label_selector(
        &mut errs,
        spec.pod_selector.as_ref().unwrap_or(&Default::default()),
        &spec_path.child("podSelector"),
    );
    for (i, rule) in spec.ingress.iter().flatten().enumerate() {
        let rp = spec_path.child("ingress").index(i);
        for (j, port) in rule.ports.iter().flatten().enumerate() {
            policy_port(&mut errs, port, &rp.child("ports").index(j));
        }
        for (j, peer) in rule.from.iter().flatten().enumerate() {
            policy_peer(&mut errs, peer, &rp.child("from").index(j));
        }
    }
    for (i, rule) in spec.egress.iter().flatten().enumerate() {
        let rp = spec_path.child("egress").index(i);
        for (j, port) in rule.ports.iter().flatten().enumerate() {
            policy_port(&mut errs, port, &rp.child("ports").index(j));
        }
        for (j, peer) in rule.to.iter().flatten().enumerate() {
            policy_peer(&mut errs, peer, &rp.child("to").index(j));
        }
    }
    let types = spec.policy_types.clone().unwrap_or_default();
    if types.len() > 2 {
        let shown: Vec<String> = types.iter().map(|t| go_quote(t)).collect();
        errs.invalid(
            &spec_path.child("policyTypes"),
            Value::Raw(format!("[]networking.PolicyType{{{}}}", shown.join(", "))),
            "may not specify more than two policyTypes",
        );
    } else {
        for (i, t) in types.iter().enumerate() {
            if t != "Ingress" && t != "Egress" {
                errs.not_supported(
                    &spec_path.child("policyTypes").index(i),
                    Value::Named(t),
                    &["Ingress", "Egress"],
                );
            }
        }
    }
    if errs.0.is_empty() {
        Ok(())
    } else {
        Err(ValidationErrors {
            object: format!("NetworkPolicy {}", go_quote(&name)),
            errors: errs.0,
        })
    }
}

fn policy_port(errs: &mut Errors, port: &NetworkPolicyPort, p: &Path) {
    if let Some(proto) = &port.protocol
        && !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP")
    {
        errs.not_supported(
            &p.child("protocol"),
            Value::Named(proto),
            &["TCP", "UDP", "SCTP"],
        );
    }
    match &port.port {
        Some(IntOrString::Int(n)) => {
            if !(1..=65535).contains(n) {
                errs.invalid(
                    &p.child("port"),
                    Value::Int(*n as i64),
                    "must be between 1 and 65535, inclusive",
                );
            }
            if let Some(end) = port.end_port {
                if end < *n {
                    errs.invalid(
                        &p.child("endPort"),
                        Value::Int(end as i64),
                        "must be greater than or equal to `port`",
                    );
                }
                if !(1..=65535).contains(&end) {
                    errs.invalid(
                        &p.child("endPort"),
                        Value::Int(end as i64),
                        "must be between 1 and 65535, inclusive",
                    );
                }
            }
        }
        Some(IntOrString::String(name)) => {
            if let Some(end) = port.end_port {
                errs.invalid(
                    &p.child("endPort"),
                    Value::Int(end as i64),
                    "may not be specified when `port` is non-numeric",
                );
            }
            for msg in port_name(name) {
                errs.invalid(&p.child("port"), Value::Str(name), msg);
            }
        }
        None => {
            if let Some(end) = port.end_port {
                errs.invalid(
                    &p.child("endPort"),
                    Value::Int(end as i64),
                    "may not be specified when `port` is not specified",
                );
            }
        }
    }
}

fn policy_peer(errs: &mut Errors, peer: &NetworkPolicyPeer, p: &Path) {
    let mut n = 0;
    if let Some(s) = &peer.pod_selector {
        n += 1;
        label_selector(errs, s, &p.child("podSelector"));
    }
    if let Some(s) = &peer.namespace_selector {
        n += 1;
        label_selector(errs, s, &p.child("namespaceSelector"));
    }
    if let Some(b) = &peer.ip_block {
        n += 1;
        let bp = p.child("ipBlock");
        if b.cidr.is_empty() {
            errs.required(&bp.child("cidr"), "");
        } else {
            let cidr = parse_cidr(&b.cidr);
            if cidr.is_none() {
                errs.invalid(&bp.child("cidr"), Value::Str(&b.cidr), CIDR_MSG);
            }
            if let Some(cidr) = cidr {
                for (i, e) in b.except.iter().flatten().enumerate() {
                    let ep = bp.child("except").index(i);
                    match parse_cidr(e) {
                        None => errs.invalid(&ep, Value::Str(e), CIDR_MSG),
                        Some(ex) => {
                            if !cidr.contains(&ex.network()) || cidr.prefix_len() >= ex.prefix_len()
                            {
                                errs.invalid(
                                    &ep,
                                    Value::Str(e),
                                    "must be a strict subset of `cidr`",
                                );
                            }
                        }
                    }
                }
            }
        }
    }
    if n == 0 {
        errs.required(p, "must specify a peer");
    } else if n > 1 && peer.ip_block.is_some() {
        errs.forbidden(p, "may not specify both ipBlock and another peer");
    }
}

const CIDR_MSG: &str = "must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)";

/// Parses a CIDR as Go's `net.ParseCIDR` (host bits allowed, masked off; IPv4 octets without
/// leading zeros; prefix length in range).
pub fn parse_cidr(s: &str) -> Option<IpNet> {
    let (addr, len) = s.split_once('/')?;
    if len.is_empty() || len.len() > 3 || !len.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let len: u8 = len.parse().ok()?;
    let addr: IpAddr = addr.parse().ok()?;
    IpNet::new(addr, len).ok().map(|n| n.trunc())
}

fn label_selector(errs: &mut Errors, s: &LabelSelector, p: &Path) {
    let ml = p.child("matchLabels");
    for (k, v) in s.match_labels.iter().flatten() {
        for msg in label_key(k) {
            errs.invalid(&ml, Value::Str(k), &msg);
        }
        for msg in label_value(v) {
            errs.invalid(&ml, Value::Str(v), &msg);
        }
    }
    for (i, e) in s.match_expressions.iter().flatten().enumerate() {
        let ep = p.child("matchExpressions").index(i);
        let values = e.values.as_deref().unwrap_or(&[]);
        match e.operator.as_str() {
            "In" | "NotIn" => {
                if values.is_empty() {
                    errs.required(
                        &ep.child("values"),
                        "must be specified when `operator` is 'In' or 'NotIn'",
                    );
                }
            }
            "Exists" | "DoesNotExist" => {
                if !values.is_empty() {
                    errs.forbidden(
                        &ep.child("values"),
                        "may not be specified when `operator` is 'Exists' or 'DoesNotExist'",
                    );
                }
            }
            op => errs.invalid(
                &ep.child("operator"),
                Value::Named(op),
                "not a valid selector operator",
            ),
        }
        for msg in label_key(&e.key) {
            errs.invalid(&ep.child("key"), Value::Str(&e.key), &msg);
        }
        for (j, v) in values.iter().enumerate() {
            for msg in label_value(v) {
                errs.invalid(&ep.child("values").index(j), Value::Str(v), &msg);
            }
        }
    }
}

fn regex_error(msg: &str, re: &str, examples: &[&str]) -> String {
    let ex: Vec<String> = examples.iter().map(|e| format!("'{e}', ")).collect();
    format!(
        "{msg} (e.g. {}regex used for validation is '{re}')",
        ex.join(" or ")
    )
}

const LABEL_KEY_FMT: &str = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]";
const LABEL_KEY_MSG: &str = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character";

fn is_label_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
}

/// `IsQualifiedName` / `IsLabelKey`.
fn label_key(key: &str) -> Vec<String> {
    let mut errs = Vec::new();
    let parts: Vec<&str> = key.split('/').collect();
    let name = match parts.len() {
        1 => parts[0],
        2 => {
            if parts[0].is_empty() {
                errs.push("prefix part must be non-empty".into());
            } else {
                errs.extend(
                    dns1123_subdomain(parts[0])
                        .into_iter()
                        .map(|m| format!("prefix part {m}")),
                );
            }
            parts[1]
        }
        _ => {
            return vec![format!(
                "a valid label key {} with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')",
                regex_error(
                    LABEL_KEY_MSG,
                    LABEL_KEY_FMT,
                    &["MyName", "my.name", "123-abc"]
                )
            )];
        }
    };
    if name.is_empty() {
        errs.push("name part must be non-empty".into());
    } else if name.len() > 63 {
        errs.push("name part must be no more than 63 bytes".into());
    }
    if !is_label_name(name) {
        errs.push(format!(
            "name part {}",
            regex_error(
                LABEL_KEY_MSG,
                LABEL_KEY_FMT,
                &["MyName", "my.name", "123-abc"]
            )
        ));
    }
    errs
}

/// `IsValidLabelValue`.
fn label_value(v: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if v.len() > 63 {
        errs.push("must be no more than 63 bytes".into());
    }
    if !v.is_empty() && !is_label_name(v) {
        errs.push(regex_error(
            "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
            "(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?",
            &["MyValue", "my_value", "12345"],
        ));
    }
    errs
}

fn is_dns_label(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

const DNS1123_LABEL_FMT: &str = "[a-z0-9]([-a-z0-9]*[a-z0-9])?";

fn dns1123_subdomain(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > 253 {
        errs.push("must be no more than 253 bytes".into());
    }
    if !s.split('.').all(is_dns_label) {
        errs.push(regex_error(
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
            &format!("{DNS1123_LABEL_FMT}(\\.{DNS1123_LABEL_FMT})*"),
            &["example.com"],
        ));
    }
    errs
}

fn dns1123_label(s: &str) -> Vec<String> {
    let mut errs = Vec::new();
    if s.len() > 63 {
        errs.push("must be no more than 63 bytes".into());
    }
    if !is_dns_label(s) {
        if s.split('.').all(is_dns_label) {
            errs.push("must not contain dots".into());
        } else {
            errs.push(regex_error(
                "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
                DNS1123_LABEL_FMT,
                &["my-name", "123-abc"],
            ));
        }
    }
    errs
}

/// `IsValidPortName`.
fn port_name(s: &str) -> Vec<&'static str> {
    let mut errs = Vec::new();
    if s.len() > 15 {
        errs.push("must be no more than 15 characters");
    }
    if s.is_empty()
        || !s
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
    {
        errs.push("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)");
    }
    if !s.bytes().any(|c| c.is_ascii_lowercase()) {
        errs.push("must contain at least one letter (a-z)");
    }
    if s.contains("--") {
        errs.push("must not contain consecutive hyphens");
    }
    if s.starts_with('-') || s.ends_with('-') {
        errs.push("must not begin or end with a hyphen");
    }
    errs
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn errors(spec: serde_json::Value) -> Vec<String> {
        let np: NetworkPolicy = serde_json::from_value(json!({
            "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": "p", "namespace": "x"}, "spec": spec}))
        .unwrap();
        match validate_network_policy(&np) {
            Ok(()) => vec![],
            Err(e) => e.errors.iter().map(|e| e.to_string()).collect(),
        }
    }

    #[test]
    fn valid_policies_pass() {
        assert!(errors(json!({"podSelector": {}})).is_empty());
        assert!(errors(json!({"podSelector": {"matchLabels": {"pod": "a"}},
            "ingress": [{"from": [{"podSelector": {}, "namespaceSelector": {"matchLabels": {"ns": "y"}}},
                                   {"ipBlock": {"cidr": "10.0.0.0/8", "except": ["10.1.0.0/16"]}}],
                         "ports": [{"port": 80}, {"port": "serve-80-tcp"}, {"protocol": "UDP", "port": 81, "endPort": 90}, {"protocol": "SCTP"}]}],
            "egress": [{}], "policyTypes": ["Ingress", "Egress"]})).is_empty());
    }

    #[test]
    fn empty_peer() {
        assert_eq!(
            errors(json!({"podSelector": {}, "ingress": [{"from": [{}]}]})),
            ["spec.ingress[0].from[0]: Required value: must specify a peer"]
        );
        assert_eq!(
            errors(json!({"podSelector": {}, "egress": [{}, {"to": [{"podSelector": {}}, {}]}]})),
            ["spec.egress[1].to[1]: Required value: must specify a peer"]
        );
    }

    #[test]
    fn ip_block_with_selector() {
        assert_eq!(
            errors(
                json!({"podSelector": {}, "ingress": [{"from": [{"podSelector": {}, "ipBlock": {"cidr": "10.0.0.0/8"}}]}]})
            ),
            ["spec.ingress[0].from[0]: Forbidden: may not specify both ipBlock and another peer"]
        );
    }

    #[test]
    fn except_outside_cidr_and_bad_cidrs() {
        assert_eq!(
            errors(
                json!({"podSelector": {}, "ingress": [{"from": [{"ipBlock": {"cidr": "10.244.1.0/24", "except": ["10.244.2.0/24", "10.244.1.0/24", "10.244.1.2/32"]}}]}]})
            ),
            [
                "spec.ingress[0].from[0].ipBlock.except[0]: Invalid value: \"10.244.2.0/24\": must be a strict subset of `cidr`",
                "spec.ingress[0].from[0].ipBlock.except[1]: Invalid value: \"10.244.1.0/24\": must be a strict subset of `cidr`",
            ]
        );
        assert_eq!(
            errors(
                json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/33"}}]}]})
            ),
            [
                "spec.egress[0].to[0].ipBlock.cidr: Invalid value: \"10.0.0.0/33\": must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"
            ]
        );
        assert_eq!(
            errors(
                json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8", "except": ["banana"]}}]}]})
            ),
            [
                "spec.egress[0].to[0].ipBlock.except[0]: Invalid value: \"banana\": must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"
            ]
        );
        assert_eq!(
            errors(json!({"podSelector": {}, "egress": [{"to": [{"ipBlock": {"cidr": ""}}]}]})),
            ["spec.egress[0].to[0].ipBlock.cidr: Required value"]
        );
        assert!(
            parse_cidr("10.0.0.1/8").is_some(),
            "host bits are masked (1.33 default)"
        );
        assert!(parse_cidr("10.0.0.0").is_none());
    }

    #[test]
    fn ports() {
        assert_eq!(
            errors(
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": "serve-80-tcp", "endPort": 90}]}]})
            ),
            [
                "spec.ingress[0].ports[0].endPort: Invalid value: 90: may not be specified when `port` is non-numeric"
            ]
        );
        assert_eq!(
            errors(json!({"podSelector": {}, "ingress": [{"ports": [{"endPort": 90}]}]})),
            [
                "spec.ingress[0].ports[0].endPort: Invalid value: 90: may not be specified when `port` is not specified"
            ]
        );
        assert_eq!(
            errors(
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 81, "endPort": 80}]}]})
            ),
            [
                "spec.ingress[0].ports[0].endPort: Invalid value: 80: must be greater than or equal to `port`"
            ]
        );
        assert_eq!(
            errors(
                json!({"podSelector": {}, "ingress": [{"ports": [{"port": 0}, {"port": 70000}, {"port": 80, "endPort": 65536}]}]})
            ),
            [
                "spec.ingress[0].ports[0].port: Invalid value: 0: must be between 1 and 65535, inclusive",
                "spec.ingress[0].ports[1].port: Invalid value: 70000: must be between 1 and 65535, inclusive",
                "spec.ingress[0].ports[2].endPort: Invalid value: 65536: must be between 1 and 65535, inclusive",
            ]
        );
        assert_eq!(
            errors(
                json!({"podSelector": {}, "ingress": [{"ports": [{"protocol": "ICMP", "port": 80}]}]})
            ),
            [
                "spec.ingress[0].ports[0].protocol: Unsupported value: \"ICMP\": supported values: \"TCP\", \"UDP\", \"SCTP\""
            ]
        );
        assert_eq!(
            errors(json!({"podSelector": {}, "ingress": [{"ports": [{"port": "Serve_80"}]}]})),
            [
                "spec.ingress[0].ports[0].port: Invalid value: \"Serve_80\": must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)"
            ]
        );
        assert_eq!(
            errors(json!({"podSelector": {}, "ingress": [{"ports": [{"port": "8080"}]}]})),
            [
                "spec.ingress[0].ports[0].port: Invalid value: \"8080\": must contain at least one letter (a-z)"
            ]
        );
    }

    #[test]
    fn selectors() {
        assert_eq!(
            errors(
                json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "In"}]}})
            ),
            [
                "spec.podSelector.matchExpressions[0].values: Required value: must be specified when `operator` is 'In' or 'NotIn'"
            ]
        );
        assert_eq!(
            errors(
                json!({"podSelector": {"matchExpressions": [{"key": "pod", "operator": "Exists", "values": ["a"]}]}})
            ),
            [
                "spec.podSelector.matchExpressions[0].values: Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'"
            ]
        );
        assert_eq!(
            errors(
                json!({"podSelector": {}, "ingress": [{"from": [{"namespaceSelector": {"matchExpressions": [{"key": "ns", "operator": "Like", "values": ["x"]}]}}]}]})
            ),
            [
                "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].operator: Invalid value: \"Like\": not a valid selector operator"
            ]
        );
        assert_eq!(
            errors(json!({"podSelector": {"matchLabels": {"pod": "a b"}}})),
            [
                "spec.podSelector.matchLabels: Invalid value: \"a b\": a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
            ]
        );
        assert_eq!(
            errors(json!({"podSelector": {"matchLabels": {"-bad": "a"}}})),
            [
                "spec.podSelector.matchLabels: Invalid value: \"-bad\": name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
            ]
        );
    }

    #[test]
    fn policy_types() {
        assert_eq!(
            errors(json!({"podSelector": {}, "policyTypes": ["Ingress", "Sideways"]})),
            [
                "spec.policyTypes[1]: Unsupported value: \"Sideways\": supported values: \"Ingress\", \"Egress\""
            ]
        );
        assert_eq!(
            errors(json!({"podSelector": {}, "policyTypes": ["Ingress", "Egress", "Ingress"]})),
            [
                "spec.policyTypes: Invalid value: []networking.PolicyType{\"Ingress\", \"Egress\", \"Ingress\"}: may not specify more than two policyTypes"
            ]
        );
    }

    #[test]
    fn aggregate_message() {
        let np: NetworkPolicy = serde_json::from_value(json!({
            "metadata": {"name": "deny"}, "spec": {"podSelector": {}, "ingress": [{"from": [{}, {}]}]}})).unwrap();
        let e = validate_network_policy(&np).unwrap_err();
        assert_eq!(
            e.to_string(),
            "The NetworkPolicy \"deny\" is invalid: [spec.ingress[0].from[0]: Required value: must specify a peer, spec.ingress[0].from[1]: Required value: must specify a peer]"
        );
    }
}
