//! Every file of tests/ runs: cargo finds the end-to-end tests through the symbolic link
//! `crates/outboxd/tests` (to this directory), so a new `tests/<name>.rs` is the test target
//! `<name>` without being registered anywhere. This fails if a file stops being one (say
//! `autotests = false` comes back, or the link goes).
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failed test

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

#[test]
fn every_file_of_tests_is_a_test_target() {
    let crate_dir = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new(env!("CARGO"))
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .arg("--manifest-path")
        .arg(crate_dir.join("Cargo.toml"))
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let package = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "outboxd")
        .expect("the outboxd package");
    let targets: BTreeSet<String> = package["targets"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["kind"].as_array().unwrap().iter().any(|k| k == "test"))
        .map(|t| t["name"].as_str().unwrap().to_owned())
        .collect();
    let files: BTreeSet<String> = std::fs::read_dir(crate_dir.join("../../tests"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    assert!(files.contains("test_targets"), "{files:?}");
    let missing: Vec<&String> = files.difference(&targets).collect();
    assert!(
        missing.is_empty(),
        "tests/ files that cargo does not run: {missing:?} (test targets: {targets:?})"
    );
    assert!(
        !targets.contains("support"),
        "tests/support/ is a module of the tests, not a test"
    );
}
