//! Fixed JSON formats read with serde derive, with errors that name the offending field by its
//! path (`nodes[0].publicIP`, `cni.dev/valid-attachments[0].ifname`).
use std::fmt;

use serde::de::DeserializeOwned;

/// A field that could not be read: where and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Dotted path of the field (empty: the document itself).
    pub path: String,
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}", self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

impl std::error::Error for FieldError {}

fn field_error(e: serde_path_to_error::Error<serde_json::Error>) -> FieldError {
    let mut path = e.path().to_string();
    if path == "." {
        path.clear();
    }
    let inner = e.into_inner();
    // serde_json appends the position; the path says more.
    let mut message = inner.to_string();
    if let Some(cut) = message.find(" at line ") {
        message.truncate(cut);
    }
    // A missing field is reported at its parent: name the field itself.
    if let Some(field) = message
        .strip_prefix("missing field `")
        .and_then(|r| r.split('`').next())
    {
        path = if path.is_empty() {
            field.to_string()
        } else {
            format!("{path}.{field}")
        };
        message = "missing".into();
    }
    FieldError { path, message }
}

pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_slice(bytes))
        .map_err(field_error)
}

pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, FieldError> {
    from_slice(text.as_bytes())
}

pub fn from_value<T: DeserializeOwned>(value: serde_json::Value) -> Result<T, FieldError> {
    serde_path_to_error::deserialize(value).map_err(field_error)
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Doc {
        items: Vec<Item>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Item {
        name: String,
        port: u16,
    }

    #[test]
    fn errors_name_the_field() {
        let e =
            from_str::<Doc>(r#"{"items": [{"name": "a", "port": 1}, {"name": "b"}]}"#).unwrap_err();
        assert_eq!(e.to_string(), "items[1].port: missing");
        let e = from_str::<Doc>(r#"{"items": [{"name": "a", "port": 70000}]}"#).unwrap_err();
        assert_eq!(e.path, "items[0].port");
        let e =
            from_value::<Doc>(serde_json::json!({"items": [{"name": 3, "port": 1}]})).unwrap_err();
        assert_eq!(e.path, "items[0].name");
        assert_eq!(from_str::<Doc>("{}").unwrap_err().path, "items");
    }
}
