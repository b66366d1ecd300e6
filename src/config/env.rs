//! `${VAR}` and `${VAR:-default}` in the string values of gateway.toml, expanded once when the file is read, so
//! one file serves every environment (a Kubernetes ConfigMap with the pod's values in its environment).
//!
//! Only string values are expanded, never keys or comments. `$${` writes a literal `${`; a `$` not followed by
//! `{` is kept as written (password hashes and patterns contain them).

use std::borrow::Cow;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::file::Found;

/// Expands every string value in `doc`, reporting each unset variable or malformed reference at its value.
pub(super) fn expand(doc: &mut DeTable<'_>, lookup: &dyn Fn(&str) -> Option<String>, found: &mut Vec<Found>) {
    for (_, value) in doc.iter_mut() {
        expand_value(value, lookup, found);
    }
}

fn expand_value(value: &mut Spanned<DeValue<'_>>, lookup: &dyn Fn(&str) -> Option<String>, found: &mut Vec<Found>) {
    let span = value.span();
    match value.get_mut() {
        DeValue::String(s) => {
            if !s.contains('$') {
                return;
            }
            match expand_str(s, lookup) {
                Ok(Some(expanded)) => *s = Cow::Owned(expanded),
                Ok(None) => {}
                Err(message) => found.push((span, message)),
            }
        }
        DeValue::Array(items) => {
            for item in items.iter_mut() {
                expand_value(item, lookup, found);
            }
        }
        DeValue::Table(table) => expand(table, lookup, found),
        _ => {}
    }
}

/// The string with its references replaced; None when it has none.
fn expand_str(s: &str, lookup: &dyn Fn(&str) -> Option<String>) -> Result<Option<String>, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    let mut changed = false;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let after = &rest[at + 1..];
        if let Some(escaped) = after.strip_prefix("${") {
            out.push_str("${");
            rest = escaped;
            changed = true;
            continue;
        }
        let Some(inner) = after.strip_prefix('{') else {
            out.push('$');
            rest = after;
            continue;
        };
        let Some(end) = inner.find('}') else {
            return Err("`${` without a closing `}` (write `$${` for a literal `${`)".to_string());
        };
        let reference = &inner[..end];
        let (name, default) = match reference.split_once(":-") {
            Some((name, default)) => (name, Some(default)),
            None => (reference, None),
        };
        if !is_name(name) {
            return Err(format!("`${{{reference}}}`: {name:?} is not an environment variable name (letters, digits, `_`)"));
        }
        match (lookup(name).filter(|v| !v.is_empty() || default.is_none()), default) {
            (Some(v), _) => out.push_str(&v),
            (None, Some(d)) => out.push_str(d),
            (None, None) => return Err(format!("environment variable {name} is not set (write `${{{name}:-default}}` to give a default)")),
        }
        rest = &inner[end + 1..];
        changed = true;
    }
    out.push_str(rest);
    Ok(changed.then_some(out))
}

fn is_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_alphabetic() || b == b'_') && bytes.all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "HOST" => Some("api.internal".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    #[test]
    fn expands_set_defaulted_and_escaped_references() {
        let e = |s| expand_str(s, &env);
        assert_eq!(e("http://${HOST}:8000").unwrap(), Some("http://api.internal:8000".into()));
        assert_eq!(e("${MISSING:-fallback}/x").unwrap(), Some("fallback/x".into()));
        assert_eq!(e("${EMPTY:-fallback}").unwrap(), Some("fallback".into()));
        assert_eq!(e("${EMPTY}").unwrap(), Some(String::new()));
        assert_eq!(e("${HOST:-}").unwrap(), Some("api.internal".into()));
        assert_eq!(e("$${HOST}").unwrap(), Some("${HOST}".into()));
        assert_eq!(e("$argon2id$v=19$m=19456").unwrap(), None);
        assert_eq!(e("no references").unwrap(), None);
    }

    #[test]
    fn reports_unset_and_malformed_references() {
        let e = |s| expand_str(s, &env).unwrap_err();
        assert!(e("${MISSING}").contains("MISSING is not set"));
        assert!(e("${HOST").contains("closing"));
        assert!(e("${9X}").contains("not an environment variable name"));
        assert!(e("${}").contains("not an environment variable name"));
    }

    #[test]
    fn expands_strings_in_nested_tables_and_arrays_and_locates_errors() {
        let text = "a = \"${HOST}\"\n[t]\nlist = [\"x\", \"${NOPE}\"]\nn = 3\n";
        let mut doc = DeTable::parse(text).unwrap();
        let mut found = Vec::new();
        expand(doc.get_mut(), &env, &mut found);
        assert_eq!(doc.get_ref().get("a").and_then(|v| v.get_ref().as_str()), Some("api.internal"));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(&text[found[0].0.clone()], "\"${NOPE}\"");
    }
}
