//! External programs some tests run (promtool, testssl.sh): found on PATH, or the test is skipped, unless
//! PORTCULLIS_REQUIRE_ALL=1 (as in CI), which turns a missing program into a failure.

use std::path::PathBuf;

/// Finds the first of `names` on PATH. Without any of them, the calling test should return at once (it is
/// skipped, with a message naming the Debian `package`), unless PORTCULLIS_REQUIRE_ALL=1, where this panics: CI
/// installs every tool, so a missing one there is a broken install, not a reason to skip.
pub fn require_tool(names: &[&str], package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH")
        .and_then(|path| std::env::split_paths(&path).flat_map(|dir| names.iter().map(move |n| dir.join(n))).find(|p| is_executable(p)));
    if found.is_none() {
        let wanted = names.join(" or ");
        if std::env::var("PORTCULLIS_REQUIRE_ALL").as_deref() == Ok("1") {
            panic!("{wanted} is not installed and PORTCULLIS_REQUIRE_ALL=1: install the Debian package `{package}`");
        }
        eprintln!("SKIPPED: {wanted} is not installed (Debian package `{package}`); set PORTCULLIS_REQUIRE_ALL=1 to fail instead");
    }
    found
}

fn is_executable(p: &std::path::Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}
