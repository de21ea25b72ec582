//! Records the commit the server is built from (`esserver --version`, `/healthz`, `status`,
//! `/metrics`): `ESSERVER_COMMIT` when set (a packager building from a tarball), else `git
//! rev-parse` of the checkout, else "unknown".

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=ESSERVER_COMMIT");
    // A new commit changes HEAD or the branch it names.
    let git = Path::new(".git");
    if git.is_dir() {
        println!("cargo:rerun-if-changed=.git/HEAD");
        if let Ok(head) = std::fs::read_to_string(git.join("HEAD")) {
            if let Some(reference) = head.strip_prefix("ref: ") {
                let path = git.join(reference.trim());
                if path.exists() {
                    println!("cargo:rerun-if-changed={}", path.display());
                } else {
                    println!("cargo:rerun-if-changed=.git/packed-refs");
                }
            }
        }
    }
    let commit = std::env::var("ESSERVER_COMMIT")
        .ok()
        .filter(|c| !c.trim().is_empty())
        .or_else(|| {
            let output = Command::new("git")
                .args(["rev-parse", "--short=12", "HEAD"])
                .output()
                .ok()?;
            output
                .status
                .success()
                .then(|| String::from_utf8_lossy(&output.stdout).trim().to_string())
        })
        .filter(|c| {
            !c.is_empty()
                && c.len() <= 64
                && c.chars()
                    .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '.')
        })
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=ESSERVER_COMMIT={commit}");
}
