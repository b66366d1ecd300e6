//! The layout's rules, checked on the source: no import circle between top-level modules of `src/`, and the
//! gateway core (`gateway.rs`, `auth/`, `router/`, `edge/`) names nothing of the own HTTP/1 codec (`h1/`).
//! Unit-test modules (after a file's first `#[cfg(test)]`, and `tests.rs` files) may import anything.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src folder") {
        let p = entry.expect("a folder entry").path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The file's text without its unit-test module, or None for a `tests.rs` file.
fn non_test_text(p: &Path) -> Option<String> {
    if p.file_name().is_some_and(|n| n == "tests.rs") {
        return None;
    }
    let text = std::fs::read_to_string(p).expect("readable source");
    let code = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => &text,
    };
    // Comments may name any module.
    Some(code.lines().filter(|l| !l.trim_start().starts_with("//")).collect::<Vec<_>>().join("\n"))
}

/// The top-level modules of `src/`, each with the files it holds.
fn modules() -> BTreeMap<String, Vec<PathBuf>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut mods = BTreeMap::new();
    for entry in std::fs::read_dir(&src).expect("src/") {
        let p = entry.expect("an entry").path();
        let name = p.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
        if name == "main" || name == "lib" {
            continue;
        }
        let mut files = Vec::new();
        if p.is_dir() {
            rust_files(&p, &mut files);
        } else if p.extension().is_some_and(|e| e == "rs") {
            files.push(p);
        } else {
            continue;
        }
        mods.insert(name, files);
    }
    mods
}

/// The crate-level names a text refers to: `crate::x` and the heads inside `crate::{x, y::z}`.
fn crate_refs(text: &str) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let ident = |s: &str| s.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect::<String>();
    for (i, _) in text.match_indices("crate::") {
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let inner = &group[..group.find('}').unwrap_or(group.len())];
            refs.extend(inner.split(',').map(|part| ident(part.trim())).filter(|s| !s.is_empty()));
        } else {
            refs.insert(ident(rest));
        }
    }
    refs
}

#[test]
fn no_import_circle_between_top_level_modules() {
    let mods = modules();
    assert!(mods.contains_key("gateway") && mods.contains_key("h1"), "the layout this test knows: {:?}", mods.keys());
    let mut edges: BTreeMap<&str, BTreeSet<String>> = BTreeMap::new();
    for (m, files) in &mods {
        let e = edges.entry(m).or_default();
        for f in files {
            if let Some(text) = non_test_text(f) {
                e.extend(crate_refs(&text).into_iter().filter(|r| r != m && mods.contains_key(r)));
            }
        }
    }
    // A circle exists if some module reaches itself.
    let mut circles = Vec::new();
    for start in edges.keys() {
        let mut seen = BTreeSet::new();
        let mut todo: Vec<&str> = edges[start].iter().map(String::as_str).collect();
        while let Some(m) = todo.pop() {
            if m == *start {
                circles.push(start.to_string());
                break;
            }
            if seen.insert(m) {
                todo.extend(edges.get(m).into_iter().flatten().map(String::as_str));
            }
        }
    }
    assert!(circles.is_empty(), "these top-level modules import themselves through others: {circles:?}\nedges: {edges:#?}");
}

#[test]
fn the_gateway_core_names_nothing_of_the_http1_codec() {
    let mods = modules();
    let mut offenders = Vec::new();
    for core in ["gateway", "auth", "router", "edge"] {
        for f in &mods[core] {
            let Some(text) = non_test_text(f) else { continue };
            if crate_refs(&text).contains("h1") || text.contains("h1::") {
                offenders.push(f.display().to_string());
            }
        }
    }
    assert!(offenders.is_empty(), "the core names h1/ in {offenders:?}");
}

#[test]
fn the_checks_see_a_circle_and_an_h1_name_when_there_is_one() {
    // The parser the two tests above rely on finds both spellings of an import.
    let refs = crate_refs("use crate::h1::server::Conn;\nuse crate::{gateway::Gateway, body};\n");
    assert_eq!(refs, ["body", "gateway", "h1"].into_iter().map(String::from).collect());
}
