//! What ships beside the binary: man pages and completions generated from
//! the clap definitions, and the systemd units (checked by systemd-analyze).

use std::process::Command;

use super::util::*;

#[test]
fn man_pages_and_completions_are_generated() {
    let env = Env::new();
    let man = env.path("man");
    env.ok(&["generate", "man", s(&man)]);
    for page in [
        "dsync.1",
        "dsync-backup.1",
        "dsync-restore.1",
        "dsync-mount.1",
        "dsync-prune.1",
    ] {
        let text =
            std::fs::read_to_string(man.join(page)).unwrap_or_else(|_| panic!("{page} missing"));
        assert!(text.contains(".TH"), "{page} is not a man page");
    }
    for shell in ["bash", "zsh", "fish"] {
        let out = env.ok(&["generate", "completions", shell]);
        assert!(
            out.contains("backup") && out.contains("restore"),
            "{shell} completions incomplete"
        );
    }
}

#[test]
fn systemd_units_verify() {
    let have = Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !have {
        // Not every machine has systemd; CI's does. Say so loudly.
        eprintln!("systemd-analyze not found: the systemd units were NOT verified");
        return;
    }
    let env = Env::new();
    // systemd-analyze verifies instances: copy the templates under instance names.
    let dir = env.path("units");
    std::fs::create_dir(&dir).unwrap();
    for (src, dst) in [
        ("dsync-backup@.service", "dsync-backup@vm.img.service"),
        ("dsync-backup@.timer", "dsync-backup@vm.img.timer"),
    ] {
        let text = std::fs::read_to_string(format!(
            "{}/contrib/systemd/{src}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        // The ExecStart binary must exist for verify: point it at the one just built.
        let text = text.replace("/usr/local/bin/dsync", env!("CARGO_BIN_EXE_dsync"));
        std::fs::write(dir.join(dst), text).unwrap();
    }
    let o = Command::new("systemd-analyze")
        .arg("verify")
        // The man pages are generated, not installed, here.
        .arg("--man=no")
        .arg(dir.join("dsync-backup@vm.img.service"))
        .arg(dir.join("dsync-backup@vm.img.timer"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "systemd-analyze verify failed: {err}");
    assert!(
        !err.contains("dsync-backup"),
        "systemd-analyze complains about our units: {err}"
    );
}
