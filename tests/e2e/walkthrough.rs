//! The walk-throughs (docs/walkthroughs/, in order, then README.md's taste),
//! run as a newcomer types them, with their outputs compared to what the docs show
//! (scripts/demo/walkthrough.py): the docs cannot drift from the binaries.

use std::process::Command;

use palisade_tests::{bin_dir, repo_root};

#[test]
fn the_docs_walkthroughs_run_as_written() {
    let root = repo_root();
    let runner = root.join("scripts/demo/walkthrough.py");
    // The comparison itself: loose where output varies, strict elsewhere.
    let selftest = Command::new("python3").arg(&runner).arg("--self-test").output().expect("python3 runs");
    assert!(selftest.status.success(), "{}", String::from_utf8_lossy(&selftest.stderr));

    // A scratch directory with the repository's scripts, so the user's own
    // ./demo-data is left alone.
    let scratch = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(root.join("scripts"), scratch.path().join("scripts")).unwrap();
    let walk = || {
        Command::new("python3")
            .arg(&runner)
            .args(["--check", "--cwd"])
            .arg(scratch.path())
            .arg(root.join("docs/walkthroughs"))
            .arg(root.join("README.md"))
            .env("PALISADE_BIN_DIR", bin_dir())
            .output()
            .expect("python3 runs")
    };

    // One of its ports taken (another demo still running): it says so and
    // fails before starting anything, instead of printing wrong answers.
    let taken = std::net::TcpListener::bind("127.0.0.1:9001").expect("port 9001 is free for the walk-through");
    let out = walk();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("needs 127.0.0.1 ports 9001, and something already listens there"), "{stderr}");
    assert!(!scratch.path().join("demo-data").exists(), "it started something");
    drop(taken);

    let out = walk();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "the walk-through does not run as written:\n{}\n--- output\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("outputs matched the docs"), "{stdout}");
}
