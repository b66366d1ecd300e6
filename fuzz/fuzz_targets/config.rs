//! `gateway.toml` validation (`Config::parse` as `portcullis check` runs it: nothing is generated or written),
//! read as if the file sat where the shipped one does, so its relative paths resolve to the repository's files.
//!
//! Oracles: nothing panics; every error and warning is located inside the text: line ≥ 1 and at most the text's
//! line count, column ≥ 1 and at most one past that line's last character.
#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::config::{ConfigError, Problem};

fn check_located(text: &str, problems: &[Problem]) {
    let lines: Vec<&str> = text.split('\n').collect();
    for p in problems {
        assert!(p.line >= 1 && p.line <= lines.len(), "line {} of {}: {}", p.line, lines.len(), p.message);
        let width = lines[p.line - 1].chars().count();
        assert!(p.column >= 1 && p.column <= width + 1, "{}:{} (line of {width} chars): {}", p.line, p.column, p.message);
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../gateway.toml");
    match portcullis::fuzzing::check_config_text(&path, text) {
        Ok(config) => check_located(text, &config.warnings),
        Err(e @ ConfigError::Invalid { .. }) => {
            assert!(!e.problems().is_empty(), "invalid without a problem");
            check_located(text, e.problems());
        }
        Err(e) => panic!("{e}"),
    }
});
