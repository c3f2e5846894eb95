//! The gRPC API from a client that is not Palisade's: Python stubs generated
//! from the shipped .proto (tests/python/admin_client.py, docs/api.md).

use std::process::Command;

use palisade_tests::{ControlPlane, repo_root, skip};

#[tokio::test]
async fn python_grpc_client_drives_the_admin_api() {
    let have = Command::new("python3")
        .args(["-c", "import grpc, grpc_tools, grpc_reflection, cryptography"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        skip(
            "python_grpc_client_drives_the_admin_api",
            "python3 lacks grpcio, grpcio-tools, grpcio-reflection or cryptography (pip install them)",
        );
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), tmp.path(), &[]).await.unwrap();
    let out = Command::new("python3")
        .arg(repo_root().join("tests/python/admin_client.py"))
        .arg(&cp.addr)
        .arg(cp.admin_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n--- control plane\n{}",
        String::from_utf8_lossy(&out.stderr),
        cp.proc.logs()
    );
    for step in [
        "CreateJoinToken",
        "ApplyPolicy",
        "ListPolicies",
        "DeletePolicy",
        "Simulate GET: allow",
        "PERMISSION_DENIED",
        "server reflection",
        "all checks passed",
    ] {
        assert!(stdout.contains(step), "{step} missing:\n{stdout}");
    }
    // The refusal of the workload certificate is an audit event.
    assert!(cp.proc.logs().contains("admin_denied"), "{}", cp.proc.logs());
}
