//! Label selectors (`metav1.LabelSelector`) as Kubernetes evaluates them: `matchLabels` and
//! `matchExpressions` are ANDed; `{}` selects everything. Only validated selectors are built
//! (see [`super::validate`]), so an unknown operator never reaches matching.
use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Requirement {
    pub key: String,
    pub op: Operator,
    pub values: BTreeSet<String>,
}

/// A parsed label selector. Equal selectors compare equal whatever the order they were written
/// in, which lets the compiler share policy peers by content.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Selector {
    pub requirements: BTreeSet<Requirement>,
}

impl Selector {
    /// `{}`: matches every label set.
    pub fn everything() -> Self {
        Self::default()
    }

    /// Builds a selector from the API type. `matchLabels` entries become `In` requirements with
    /// one value, as in apimachinery's `LabelSelectorAsSelector`. Fails on an unknown operator
    /// (validation reports it first, with the API server's message).
    pub fn from_api(sel: &LabelSelector) -> Result<Self, String> {
        let mut requirements = BTreeSet::new();
        for (k, v) in sel.match_labels.iter().flatten() {
            requirements.insert(Requirement {
                key: k.clone(),
                op: Operator::In,
                values: [v.clone()].into(),
            });
        }
        for e in sel.match_expressions.iter().flatten() {
            let op = match e.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => return Err(format!("{other:?} is not a valid selector operator")),
            };
            requirements.insert(Requirement {
                key: e.key.clone(),
                op,
                values: e.values.iter().flatten().cloned().collect(),
            });
        }
        Ok(Self { requirements })
    }

    pub fn is_everything(&self) -> bool {
        self.requirements.is_empty()
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| {
            let v = labels.get(&r.key);
            match r.op {
                Operator::In => v.is_some_and(|v| r.values.contains(v)),
                Operator::NotIn => v.is_none_or(|v| !r.values.contains(v)),
                Operator::Exists => v.is_some(),
                Operator::DoesNotExist => v.is_none(),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sel(v: serde_json::Value) -> Selector {
        Selector::from_api(&serde_json::from_value(v).unwrap()).unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(sel(json!({})).matches(&labels(&[])));
        assert!(sel(json!({})).matches(&labels(&[("a", "b")])));
    }

    #[test]
    fn match_labels_are_anded() {
        let s = sel(json!({"matchLabels": {"pod": "a", "ns": "x"}}));
        assert!(s.matches(&labels(&[("pod", "a"), ("ns", "x"), ("z", "1")])));
        assert!(!s.matches(&labels(&[("pod", "a")])));
        assert!(!s.matches(&labels(&[("pod", "a"), ("ns", "y")])));
    }

    #[test]
    fn operators() {
        let s_in = sel(
            json!({"matchExpressions": [{"key": "pod", "operator": "In", "values": ["a", "b"]}]}),
        );
        assert!(s_in.matches(&labels(&[("pod", "b")])));
        assert!(!s_in.matches(&labels(&[("pod", "c")])));
        assert!(!s_in.matches(&labels(&[])));
        let s_notin = sel(
            json!({"matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a"]}]}),
        );
        assert!(s_notin.matches(&labels(&[("pod", "b")])));
        assert!(s_notin.matches(&labels(&[])), "NotIn matches a missing key");
        assert!(!s_notin.matches(&labels(&[("pod", "a")])));
        let s_ex = sel(json!({"matchExpressions": [{"key": "pod", "operator": "Exists"}]}));
        assert!(s_ex.matches(&labels(&[("pod", "")])));
        assert!(!s_ex.matches(&labels(&[("x", "pod")])));
        let s_dne = sel(json!({"matchExpressions": [{"key": "pod", "operator": "DoesNotExist"}]}));
        assert!(!s_dne.matches(&labels(&[("pod", "")])));
        assert!(s_dne.matches(&labels(&[("x", "pod")])));
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let s = sel(json!({"matchLabels": {"ns": "x"},
            "matchExpressions": [{"key": "pod", "operator": "NotIn", "values": ["a"]}]}));
        assert!(s.matches(&labels(&[("ns", "x"), ("pod", "b")])));
        assert!(!s.matches(&labels(&[("ns", "x"), ("pod", "a")])));
        assert!(!s.matches(&labels(&[("ns", "y"), ("pod", "b")])));
    }

    #[test]
    fn equal_content_is_equal() {
        let a = sel(json!({"matchLabels": {"a": "1", "b": "2"}}));
        let b = sel(
            json!({"matchExpressions": [{"key": "b", "operator": "In", "values": ["2"]}],
            "matchLabels": {"a": "1"}}),
        );
        assert_eq!(a, b);
    }

    #[test]
    fn unknown_operator_is_refused() {
        let api: LabelSelector = serde_json::from_value(
            json!({"matchExpressions": [{"key": "a", "operator": "Like", "values": ["x"]}]}),
        )
        .unwrap();
        assert!(Selector::from_api(&api).is_err());
    }
}
