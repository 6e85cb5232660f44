//! The deployment files, checked offline on every run: docker-compose.yml with Compose's Go code,
//! the Helm chart linted and rendered with Helm's Go SDK (default and production-like values),
//! the manifests against the Kubernetes schemas, and the wiring against this binary's settings
//! (`tests/python/validate_deploy.py`; its Python packages are installed by `./scripts/test`).

use std::process::Command;

#[test]
fn compose_file_and_helm_chart_validate_and_wire_every_service() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("python3")
        .arg(root.join("tests/python/validate_deploy.py"))
        .arg(&root)
        .arg(env!("CARGO_BIN_EXE_ecars"))
        .output()
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
